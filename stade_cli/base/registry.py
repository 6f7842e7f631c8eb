"""One registry type for everything registered by name: scores, updates, allocations, reconstructions, presets,
result kinds. Names are normalised (`-` and `_` alike, case-insensitive), a second entry under a taken name is
refused, and a miss names the closest entry and lists them all (lm-evaluation-harness's habit)."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from stade_cli.base.errors import StadeError

T = TypeVar("T")


def normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Entries of one kind by name. `discover`: a package whose modules register themselves on import; they are
    imported on first use, so that a new entry is one new module and nothing else changes."""

    def __init__(self, kind: str, option: str, discover: str | None = None) -> None:
        self.kind = kind
        self.option = option
        self._entries: dict[str, T] = {}
        self._discover = discover
        self._discovered = discover is None

    def add(self, name: str, entry: T) -> T:
        key = normalise(name)
        if key in self._entries:
            raise ValueError(f"a {self.kind} named {key!r} is registered twice")
        self._entries[key] = entry
        return entry

    def register(self, name: str, make: Callable[[Callable], T]) -> Callable[[Callable], Callable]:
        """A decorator: `make(fn)` builds the entry from the decorated function, which is returned unchanged."""

        def deco(fn: Callable) -> Callable:
            self.add(name, make(fn))
            return fn

        return deco

    def _load(self) -> dict[str, T]:
        if not self._discovered:
            package = importlib.import_module(self._discover or "")
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
                importlib.import_module(f"{package.__name__}.{info.name}")
            self._discovered = True  # after: a module that failed to import is tried again, not skipped
        return self._entries

    def get(self, name: str) -> T:
        entries = self._load()
        key = normalise(name)
        if key not in entries:
            close = difflib.get_close_matches(key, entries, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise StadeError(f"Unknown {self.kind} {name!r} ({self.option}).", f"{hint}available: {', '.join(entries)}")
        return entries[key]

    def __contains__(self, name: str) -> bool:
        return normalise(name) in self._load()

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._load().values()))

    def names(self) -> list[str]:
        return list(self._load())
