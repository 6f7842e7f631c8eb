"""Defects found in review (issue 9): SparseGPT's N:M groups at block edges, a --sparsity list that contradicts an
N:M pattern, and stadew's "fed by a norm" checked against the layer names of docs/methods.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from stade_cli.cli import app

runner = CliRunner()


def random_problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) * torch.rand(cols, generator=g)
    return torch.randn(rows, cols, generator=g), 2.0 / x.shape[0] * x.t() @ x


@pytest.mark.parametrize("n,m", [(3, 6), (5, 10), (2, 6)])
def test_sparsegpt_nm_groups_never_straddle_blocks(n: int, m: int) -> None:
    """384 columns = 3 blocks of 128, which M=6 and M=10 do not divide: every group of M columns starting at
    an absolute multiple of M must still have exactly N pruned in every row."""
    from stade_cli.stages.pattern import Pattern
    from stade_cli.stages.solvers.sparsegpt import sparsegpt_prune

    cols = 3 * 128 if 3 * 128 % m == 0 else 390
    w, h = random_problem(24, cols)
    res = sparsegpt_prune(w, h, n / m, Pattern(n, m))
    per_group = res.mask.reshape(w.shape[0], cols // m, m).sum(-1)
    assert torch.all(per_group == n), f"groups with {per_group.unique().tolist()} pruned, not {n}"
    assert torch.all(res.weight[res.mask] == 0)


def test_sparsegpt_block_size_rounds_to_a_multiple_of_m() -> None:
    """A block size M does not divide is rounded down to one it does: 130 columns a block at 2:4 solve exactly
    like 128 (before the fix, a group straddled the edge and the result differed); 2:4 at 128 is untouched."""
    from stade_cli.stages.pattern import Pattern
    from stade_cli.stages.solvers.sparsegpt import sparsegpt_prune

    w, h = random_problem(32, 384, seed=3)
    at_128 = sparsegpt_prune(w, h, 0.5, Pattern(2, 4), blocksize=128)
    at_130 = sparsegpt_prune(w, h, 0.5, Pattern(2, 4), blocksize=130)
    assert torch.equal(at_128.weight, at_130.weight) and torch.equal(at_128.mask, at_130.mask)
    assert torch.equal(sparsegpt_prune(w, h, 0.5, Pattern(2, 4)).weight, at_128.weight)


@pytest.mark.parametrize("sparsity", ["0.6,0.7", "0.5,0.7", "0.7"])
def test_nm_pattern_refuses_contradicting_sparsity_list(tiny_llama_dir: Path, tmp_path: Path, sparsity: str) -> None:
    stats = tmp_path / "no-stats"  # the check comes before the statistics are read
    res = runner.invoke(
        app,
        [
            "prune",
            str(tiny_llama_dir),
            "--stats",
            str(stats),
            "--method",
            "wanda",
            "--pattern",
            "2:4",
            "--sparsity",
            sparsity,
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert res.exit_code != 0
    assert "contradicts pattern 2:4" in res.output, res.output
    assert not (tmp_path / "out").exists()


class _Block(nn.Module):
    """q_proj reads the raw input (docs/methods.md says norm-fed), o_proj reads a norm's output (says not),
    gate_proj reads a norm's output (agrees), mystery is a name docs/methods.md does not list."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(8)
        self.q_proj, self.o_proj, self.gate_proj, self.mystery = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.q_proj(x) + self.o_proj(y) + self.gate_proj(y) + self.mystery(y)


def test_norm_feed_disagreement_with_names_warns() -> None:
    from stade_cli.models.layers import linear_layers
    from stade_cli.stats.accumulators import BlockCollector
    from stade_cli.stats.collectors import norm_feed_warnings

    block = _Block()
    collector = BlockCollector(block, linear_layers(block), torch.device("cpu"), hessian=False)
    block(torch.randn(2, 5, 8))
    collector.remove()
    assert collector.fed_by_norm == {"q_proj": False, "o_proj": True, "gate_proj": True, "mystery": True}
    warnings = norm_feed_warnings("model.layers.0", collector.fed_by_norm)
    assert len(warnings) == 2
    assert warnings[0].startswith("model.layers.0.q_proj: its input is not a norm's output")
    assert warnings[1].startswith("model.layers.0.o_proj: its input is a norm's output")


def calibrate(model: Path, out: Path) -> tuple[str, dict]:
    res = runner.invoke(
        app,
        [
            "calibrate",
            str(model),
            "--data",
            "sample-news",
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    return res.output, json.loads((out / "manifest.json").read_text())


def test_calibrate_warns_only_where_names_disagree(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama agrees with docs/methods.md everywhere: no warning. Declare q_proj not norm-fed by name, and each
    block's q_proj is reported in the output, the manifest, and the stade.json of a prune from it."""
    from stade_cli.models import layers

    output, manifest = calibrate(tiny_llama_dir, tmp_path / "agree")
    assert manifest["warnings"] == [] and "warning" not in output
    monkeypatch.setattr(layers, "NORM_FED_NAMES", tuple(n for n in layers.NORM_FED_NAMES if n != "q_proj"))
    monkeypatch.setattr(layers, "NOT_NORM_FED_NAMES", (*layers.NOT_NORM_FED_NAMES, "q_proj"))
    output, manifest = calibrate(tiny_llama_dir, tmp_path / "disagree")
    assert [w.split(":")[0] for w in manifest["warnings"]] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert "warning: model.layers.0.self_attn.q_proj" in " ".join(output.split())
    res = runner.invoke(
        app,
        [
            "prune",
            str(tiny_llama_dir),
            "--stats",
            str(tmp_path / "disagree"),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "pruned"),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "pruned" / "stade.json").read_text())
    assert sum("self_attn.q_proj: its input is a norm's output" in w for w in report["warnings"]) == 2


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2000, 3000), (2, 3, 700_000)])
def test_all_finite_finds_one_bad_value_anywhere(shape: tuple[int, ...]) -> None:
    """The chunked check agrees with torch.isfinite on a bad value at the start, the end and a chunk's edge."""
    from stade_cli.base.finite import CHUNK, all_finite

    t = torch.ones(shape)
    assert all_finite(t)
    flat = t.view(-1)
    for at in {0, flat.numel() - 1, min(CHUNK, flat.numel() - 1)}:
        for bad in (float("nan"), float("inf"), float("-inf")):
            flat[at] = bad
            assert not all_finite(t) and not bool(torch.isfinite(t).all())
            flat[at] = 1.0
    assert all_finite(t.t() if t.dim() == 2 else t)  # a transposed view reads the same values
