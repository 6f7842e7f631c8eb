"""bench/gpu.sh's Python helper runs its CPU-testable parts here (the script itself is for a CUDA machine)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
assert spec is not None and spec.loader is not None
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")]).returncode == 0


def test_speed_times_dense_layers_and_refuses_a_checkpoint_that_is_not_2_4(tmp_path: Path) -> None:
    w = torch.randn(8, 16)
    w.view(8, 4, 4)[..., :2] = 0  # 2:4 along the input dimension
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(tmp_path / "model.safetensors"))
    doc = gpu.speed(str(tmp_path), str(tmp_path / "speed.json"), reps=1)
    assert [r["tokens"] for r in doc["rows"]] == [1, 16, 2048]
    assert all(r["layers"] == 1 and r["dense_ms"] > 0 for r in doc["rows"])
    if not torch.cuda.is_available():
        assert all("CUDA" in r["error"] for r in doc["rows"])
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(8, 16)}, str(tmp_path / "model.safetensors"))
    try:
        gpu.speed(str(tmp_path), str(tmp_path / "speed.json"), reps=1)
    except SystemExit as exc:
        assert "not 2:4" in str(exc)
    else:
        raise AssertionError("a dense checkpoint was timed as 2:4")


def test_report_checks_perplexities_within_tolerance(tmp_path: Path) -> None:
    def results(name: str, ppl: float) -> None:
        (tmp_path / name).write_text(json.dumps({"perplexity": {"sample-news": {"ppl": ppl}}}))

    results("eval-wanda-cuda.json", 20.5)
    results("eval-wanda-cpu.json", 20.0)
    assert gpu.report(str(tmp_path)) == 0  # 2.5% apart
    results("eval-sparsegpt-cuda.json", 23.0)
    results("eval-sparsegpt-cpu.json", 20.0)
    assert gpu.report(str(tmp_path)) == 1  # 15% apart
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["model"] for c in summary["ppl"]] == ["wanda", "sparsegpt"]


def test_peak_runs_a_command_and_records_it(tmp_path: Path) -> None:
    assert gpu.peak(str(tmp_path / "peak.json"), ["methods", "--json"]) == 0
    doc = json.loads((tmp_path / "peak.json").read_text())
    assert doc["rc"] == 0 and doc["args"] == ["methods", "--json"]
    assert (doc["peak_device_bytes"] is None) == (not torch.cuda.is_available())
