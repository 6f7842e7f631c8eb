"""Statistics at scale: sizes checked at load, hashes only for what a run reads, bfloat16 Hessians, --cache-dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import stade_cli.stats.artifact
from stade_cli.cli import app

import helpers

runner = CliRunner()


def invoke(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def calibrate(model: Path | str, out: Path, *extra: object) -> Path:
    return helpers.calibrate(model, out, *extra, seqlen=32)


def prune(model: Path | str, stats: Path, out: Path, method: str, *extra: object) -> object:
    return invoke(
        "prune", model, "--stats", stats, "--method", method, "--sparsity", 0.5, "--device", "cpu", "--out", out,
        *extra,
    )  # fmt: skip


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def hessian_stats(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrate(tiny_llama_dir, tmp_path_factory.mktemp("hs") / "stats", "--hessian")


def test_wanda_never_hashes_the_hessians_and_a_bad_hessian_is_caught_when_read(
    tiny_llama_dir: Path, hessian_stats: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(hessian_stats, broken)
    hessians = broken / "hessians.safetensors"
    flip_byte(hessians, hessians.stat().st_size - 100)  # same size: only a hash can tell
    hashed: list[str] = []
    real = stade_cli.stats.artifact.sha256_file
    monkeypatch.setattr(stade_cli.stats.artifact, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    res = prune(tiny_llama_dir, broken, tmp_path / "w", "wanda")
    assert res.exit_code == 0, res.output
    assert "hessians.safetensors" not in hashed and "stats.safetensors" in hashed
    res = prune(tiny_llama_dir, broken, tmp_path / "s", "sparsegpt")
    assert res.exit_code == 1 and "corrupted" in res.output and "Hessian" in res.output
    assert not (tmp_path / "s").exists()


def test_load_checks_sizes_and_reading_checks_hashes(hessian_stats: Path, tmp_path: Path) -> None:
    from stade_cli.stats.artifact import Statistics

    broken = tmp_path / "broken"
    shutil.copytree(hessian_stats, broken)
    stats_file = broken / "stats.safetensors"
    flip_byte(stats_file, stats_file.stat().st_size - 4)
    stats = Statistics.load(broken)  # sizes agree: loading does not read the data
    with pytest.raises(Exception, match="corrupted"):
        stats.layer(stats.manifest.dump()["layers"][0]["name"])
    (broken / "hessians.safetensors").write_bytes((broken / "hessians.safetensors").read_bytes()[:-4])
    with pytest.raises(Exception, match="corrupted or truncated"):
        Statistics.load(broken)


def test_bfloat16_hessians_are_half_the_disk_and_solved_in_float32(
    tiny_llama_dir: Path, hessian_stats: Path, tmp_path: Path
) -> None:
    from stade_cli.stats.artifact import Statistics

    half = calibrate(tiny_llama_dir, tmp_path / "bf16", "--hessian", "--hessian-dtype", "bfloat16")
    full_m = json.loads((hessian_stats / "manifest.json").read_text())
    half_m = json.loads((half / "manifest.json").read_text())
    assert (full_m["hessian_dtype"], half_m["hessian_dtype"]) == ("float32", "bfloat16")

    def data_bytes(folder: Path) -> int:
        with safe_open(str(folder / "hessians.safetensors"), framework="pt") as f:
            return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118

    assert data_bytes(half) * 2 == data_bytes(hessian_stats)
    with safe_open(str(half / "hessians.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    full, low = Statistics.load(hessian_stats), Statistics.load(half)
    for name in full.layers:
        h_full, h_low = full.layer(name, hessian=True).hessian, low.layer(name, hessian=True).hessian
        assert h_low is not None and h_full is not None and h_low.dtype == torch.float32
        assert torch.equal(h_low, h_full.bfloat16().float())  # the same accumulation, rounded once when stored
    res = prune(tiny_llama_dir, half, tmp_path / "p", "sparsegpt")
    assert res.exit_code == 0, res.output
    res = invoke("calibrate", tiny_llama_dir, "--hessian-dtype", "float16", "--out", tmp_path / "x")
    assert res.exit_code == 1 and "--hessian-dtype" in res.output


def test_hub_model_is_read_from_the_given_cache_dir(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A hub id with --cache-dir: calibrate and a sweep's streamed prune find the weights in that cache."""
    cache = tmp_path / "cache"
    repo = cache / "models--stade-test--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    stats = calibrate("stade-test/tiny-llama", tmp_path / "stats", "--cache-dir", cache)
    res = prune("stade-test/tiny-llama", stats, tmp_path / "sweep", "wanda,magnitude", "--cache-dir", cache)
    assert res.exit_code == 0, res.output
    for run in ("wanda-unstructured-0.5", "magnitude-unstructured-0.5"):
        assert json.loads((tmp_path / "sweep" / run / "stade.json").read_text())["route"] == "streaming"
