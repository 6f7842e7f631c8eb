"""A new stage is one module and nothing else changes (docs/architecture.md, "Adding a stage").

An update stage with one setting of its own is dropped into the update package of a copy of stade_cli, and only
there: the copy then offers its option in `stade prune --help` and `stade plan`, lists it in `stade methods`, refuses
a bad value by the stage's own rule, prunes with it, and records it in stade.json; the weights are the plain wanda
checkpoint's, scaled as the stage says (an independent check of what ran).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_weights

ROOT = Path(__file__).resolve().parent.parent
SHRINK = '''"""shrink: the kept weights scaled by --shrink-factor (an example: one module, nothing else changed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stade_cli.base.errors import StadeError
from stade_cli.stages.stage import Settings, UpdateJob, setting, update


@dataclass(frozen=True)
class ShrinkSettings(Settings):
    factor: float = setting(0.9, "Multiply the kept weights by this.")

    def check(self) -> None:
        if not 0 < self.factor <= 1:
            raise StadeError(f"--shrink-factor must be in (0, 1], got {self.factor:g}.", "e.g. --shrink-factor 0.9")


@update("shrink", "the kept weights times a factor", settings=ShrinkSettings)
def shrink(ws: list[Any], masks: list[Any] | None, _st: Any, job: UpdateJob) -> list:
    assert masks is not None
    return [(w.masked_fill(m, 0.0) * job.settings.factor, m, None, None) for w, m in zip(ws, masks, strict=True)]
'''


def files(package: Path) -> dict[Path, bytes]:
    return {p.relative_to(package): p.read_bytes() for p in package.rglob("*.py")}


@pytest.mark.slow
def test_a_new_update_stage_is_one_module(tiny_llama_dir: Path, tmp_path: Path) -> None:
    package = tmp_path / "stade_cli"
    shutil.copytree(ROOT / "stade_cli", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "stages" / "updates" / "shrink.py").write_text(SHRINK)
    mine, theirs = files(package), files(ROOT / "stade_cli")
    assert {p for p in mine.keys() | theirs.keys() if mine.get(p) != theirs.get(p)} == {
        Path("stages/updates/shrink.py")
    }

    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def stade(*args: object) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "stade_cli", *map(str, args)]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert "--shrink-factor" in stade("prune", "--help").stdout
    rows = json.loads(stade("methods", "--json").stdout)
    assert {"kind": "update", "name": "shrink"}.items() <= next(r for r in rows if r["name"] == "shrink").items()
    assert stade("plan", tiny_llama_dir, "--update", "shrink", "--no-time", "--device", "cpu").returncode == 0
    stats = tmp_path / "stats"
    cal = stade("calibrate", tiny_llama_dir, "--data", "sample-news", "--nsamples", 4, "--seqlen", 32, "--out", stats)
    assert cal.returncode == 0, cal.stderr
    common = ["prune", tiny_llama_dir, "--stats", stats, "--method", "wanda", "--sparsity", 0.5, "--device", "cpu"]
    res = stade(*common, "--update", "shrink", "--shrink-factor", 0.5, "--out", tmp_path / "shrunk")
    assert res.returncode == 0, res.stderr
    assert stade(*common, "--out", tmp_path / "plain").returncode == 0
    report = json.loads((tmp_path / "shrunk" / "stade.json").read_text())
    assert report["stages"]["update"] == {"name": "shrink", "settings": {"factor": 0.5}}
    assert report["method"] == "wanda" and report["stages"]["score"] == ["wanda"]
    shrunk, plain = read_weights(tmp_path / "shrunk"), read_weights(tmp_path / "plain")
    key = "model.layers.1.mlp.down_proj.weight"
    assert (shrunk[key] == plain[key] * 0.5).all() and (plain[key] == 0).float().mean() == 0.5
    bad = stade(*common, "--update", "shrink", "--shrink-factor", 2, "--out", tmp_path / "bad")
    assert bad.returncode == 1 and "--shrink-factor must be in (0, 1], got 2" in bad.stderr
    assert not (tmp_path / "bad").exists()
