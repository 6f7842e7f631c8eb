"""What several test files share: running the CLI in-process and reading its output."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner, Result

from stade_cli.cli import app


def invoke(*args: object, **kwargs: Any) -> Result:
    """`stade ARGS...` in-process; paths and numbers may be given as they are."""
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="stade", **kwargs)


def said(res: Result) -> str:
    """The output with Rich's line wrapping undone."""
    return " ".join(res.output.split())


def recorded_versions() -> dict[str, str]:
    """What every artifact's "versions" must say, read from the installed distributions directly."""
    import platform
    from importlib.metadata import version

    from stade_cli import __version__

    libraries = ("torch", "transformers", "safetensors", "datasets", "lm_eval")
    return {"stade": __version__, "python": platform.python_version(), **{lib: version(lib) for lib in libraries}}
