"""The one user-facing error type: a message plus the next step to take."""

from __future__ import annotations


class StadeError(Exception):
    """An error the user can fix; the CLI prints it as one line plus a hint, never a traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class Terminated(BaseException):
    """SIGTERM (from `timeout` or a job scheduler), raised like KeyboardInterrupt so that cleanups run."""
