"""Prune computes in float32 on CPU, as calibrate does, and saves in the checkpoint's own dtype (or --dtype)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_tokenizer

import stade_cli.driver.prune

from helpers import invoke, read_weights


def ok(*args: object) -> None:
    res = invoke(*args)
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def bf16_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A bfloat16 checkpoint, the same weights saved in float32, and statistics (computed on either)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.bfloat16)
    model.save_pretrained(root / "bf16")
    tiny_tokenizer().save_pretrained(root / "bf16")
    model.float().save_pretrained(root / "f32")  # bfloat16 values are exact in float32
    tiny_tokenizer().save_pretrained(root / "f32")
    assert json.loads((root / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Story {i}. " + "A quiet river runs past the mill at night. " * 6 for i in range(30)))
    stats = root / "stats"
    ok(
        *("calibrate", root / "bf16", "--data", text, "--nsamples", 4, "--seqlen", 64),
        *("--device", "cpu", "--out", stats),
    )
    return root / "bf16", root / "f32", stats


def prune(model: Path, stats: Path, out: Path, *extra: str) -> dict:
    ok(
        *("prune", model, "--stats", stats, "--method", "wanda", "--sparsity", "0.5", "--sequential"),
        *("--device", "cpu", "--out", out, *extra),
    )
    return json.loads((out / "stade.json").read_text())


def test_bf16_checkpoint_prunes_in_float32_and_saves_bf16(
    bf16_setup: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bf16, f32, stats = bf16_setup
    seen: set[torch.dtype] = set()
    real = stade_cli.driver.prune.prune_block

    def spy(prefix, block, *args, **kwargs):  # the dtype each block is pruned (and run) in
        seen.update(p.dtype for p in block.parameters())
        return real(prefix, block, *args, **kwargs)

    monkeypatch.setattr(stade_cli.driver.prune, "prune_block", spy)
    report = prune(bf16, stats, tmp_path / "bf16-pruned")
    assert seen == {torch.float32}
    reference = prune(f32, stats, tmp_path / "f32-pruned")  # the float32 protocol on the same weights
    assert report["dtype"] == "bfloat16" and reference["dtype"] == "float32"
    assert json.loads((tmp_path / "bf16-pruned" / "config.json").read_text())["dtype"] == "bfloat16"
    got, want = read_weights(tmp_path / "bf16-pruned"), read_weights(tmp_path / "f32-pruned")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    for name, w in want.items():
        assert torch.equal(got[name] == 0, w == 0), name  # the same masks as the float32 run
        assert torch.equal(got[name], w.to(torch.bfloat16)), name


def test_dtype_option_is_the_saved_dtype(bf16_setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bf16, f32, stats = bf16_setup
    report = prune(bf16, stats, tmp_path / "as-f32", "--dtype", "float32")
    reference = prune(f32, stats, tmp_path / "f32-pruned")
    assert report["dtype"] == "float32"
    got, want = read_weights(tmp_path / "as-f32"), read_weights(tmp_path / "f32-pruned")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # float32 compute, float32 out: the float32 run itself
    assert reference["achieved_sparsity"] == report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
