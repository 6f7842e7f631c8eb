"""Typed records for the artifacts on disk: dataclasses that load from JSON with every field checked against its type,
and dump back to the same JSON. An artifact is one Record with a `kind` and a `schema` version; an older version is
upgraded on load, a newer one refused with a clear message (artifacts.py defines them all)."""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, ClassVar, TypeVar, Union

from stade_cli.base.errors import StadeError

R = TypeVar("R", bound="Record")
NON_FINITE = ("inf", "-inf", "nan")


class Invalid(Exception):
    """A field that is missing or of the wrong type: the message names it (and the artifact's loader the file)."""


@dataclasses.dataclass
class Record:
    """A dataclass read from and written to JSON; `None` fields are left out when written."""

    def dump(self) -> dict[str, Any]:
        return {
            f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def parse(cls: type[R], data: Any, where: str = "") -> R:
        """`data` checked field by field against the annotations; raises Invalid naming the first bad field."""
        if not isinstance(data, dict):
            raise Invalid(f"has {where or 'an entry'} that is not an object")
        hints = _hints(cls)  # type: ignore[arg-type]
        values = {}
        for f in dataclasses.fields(cls):
            name = f"{where}.{f.name}" if where else f.name
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise Invalid(f"has no {name!r}")
                continue
            values[f.name] = _parse(hints[f.name], data[f.name], name)
        return cls(**values)


class Artifact(Record):
    """A record that is a whole artifact: it names its kind and its schema version."""

    KIND: ClassVar[str]
    SCHEMA: ClassVar[int]
    WHAT: ClassVar[str]  # how messages name it: "Statistics manifest", "Pruning report", ...

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: int) -> dict[str, Any]:
        """The document of an older schema in the current one (each artifact says how)."""
        return data

    @classmethod
    def parse(cls: type[R], data: Any, where: str = "") -> R:
        """As Record.parse, an older schema upgraded first (also where the artifact is inside another)."""
        assert issubclass(cls, Artifact)
        schema = data.get("schema", 1) if isinstance(data, dict) else None
        if isinstance(schema, int) and schema < cls.SCHEMA:
            try:
                data = cls.upgrade(dict(data), schema)
            except (KeyError, AttributeError, TypeError, ValueError):
                raise Invalid(f"of schema {schema} cannot be read: its fields are damaged") from None
        return super().parse(data, where)

    @classmethod
    def load(cls: type[R], data: dict[str, Any], where: str) -> R:
        """The artifact in `data` (read from `where`), of this kind, upgraded from an older schema, checked."""
        assert issubclass(cls, Artifact)
        noun = cls.WHAT.lower()
        if data.get("kind") != cls.KIND:
            raise StadeError(f"{where!r} is not a stade {noun} (kind {data.get('kind')!r}).")
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or schema > cls.SCHEMA:
            raise StadeError(
                f"{where!r} has {noun} schema {schema!r}; this stade reads schema {cls.SCHEMA} and older.",
                "upgrade stade: pip install -U stade",
            )
        try:
            return cls.parse(data)
        except Invalid as exc:
            raise StadeError(f"{cls.WHAT} {where!r} {exc}.", "it was edited or damaged: write it again") from None


@cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.dump()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    return value


def _parse(hint: Any, value: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _parse(next(a for a in args if a is not type(None)), value, name)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.parse(value, name)
    if origin is list:
        if not isinstance(value, list):
            raise Invalid(f"has a {name!r} that is not a list")
        return [_parse(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise Invalid(f"has a {name!r} that is not an object")
        return {k: _parse(args[1], v, f"{name}.{k}") for k, v in value.items()}
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and value in NON_FINITE:  # strict JSON's non-finite numbers (files.strict_json)
        return float(value)
    if not ok:
        raise Invalid(f"has a {name!r} of the wrong type ({type(value).__name__})")
    return value
