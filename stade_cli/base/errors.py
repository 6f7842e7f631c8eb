"""The one user-facing error type: a message plus the next step to take."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class StadeError(Exception):
    """An error the user can fix; the CLI prints it as one line plus a hint, never a traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


def at_least(option: str, value: int | None, minimum: int, hint: str | None = None) -> None:
    """Refuse `option` below `minimum` (None: not given, nothing to check), naming the value given."""
    if value is not None and value < minimum:
        raise StadeError(f"{option} must be at least {minimum}, got {value}.", hint)


def named_once(option: str, values: Sequence[object], keys: Sequence[object] | None = None) -> None:
    """The one rule for every list option: a value named twice (0.5,0.50; 2:4,2of4; wanda,Wanda, as `keys` say)
    is refused before any work, since the second would silently do nothing."""
    keys = list(values if keys is None else keys)
    for i, key in enumerate(keys):
        if key in keys[:i]:
            first = values[keys.index(key)]
            same = "" if values[i] == first else f" (the same as {first!r})"
            raise StadeError(f"{option} names {values[i]!r} twice{same}.", "give each value once")


class Terminated(BaseException):
    """SIGTERM (from `timeout` or a job scheduler), raised like KeyboardInterrupt so that cleanups run."""


def first_line(exc: BaseException) -> str:
    """An exception's first line (library messages run to pages), or its type's name when it says nothing."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


@contextmanager
def library_errors(message: str, hint: str) -> Iterator[None]:
    """Turn a library's exception into StadeError("message: its first line", hint); a StadeError passes as it is."""
    try:
        yield
    except StadeError:
        raise
    except Exception as exc:
        raise StadeError(f"{message}: {first_line(exc)}", hint) from exc
