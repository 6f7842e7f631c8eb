"""What several test files share: running the CLI in-process and reading its output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from typer.testing import CliRunner, Result

from stade_cli.cli import app


def invoke(*args: object, **kwargs: Any) -> Result:
    """`stade ARGS...` in-process; paths and numbers may be given as they are."""
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="stade", **kwargs)


def calibrate(model: Path | str, out: Path, *extra: object, nsamples: int = 4, seqlen: int = 64) -> Path:
    """`stade calibrate` on the built-in sample text on the CPU; fails the test if it fails."""
    args = ["--data", "sample-news", "--nsamples", nsamples, "--seqlen", seqlen, "--device", "cpu", "--out", out]
    res = invoke("calibrate", model, *args, *extra)
    assert res.exit_code == 0, res.output
    return out


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with safetensors alone (not through stade or transformers)."""
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    return tensors


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float) -> None:
    """Within rtol of each value, or of the tensor's largest value for entries near zero."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


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
