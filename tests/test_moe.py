"""Mixture-of-experts models (tiny Mixtral and Qwen3-MoE): per-expert statistics against routing replicated in
plain torch from a full-model forward, routers left dense, every expert pruned, checkpoints that reload, the
fallback for an expert that no token reaches, and the counts in stade.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    MIN_EXPERT_TOKENS,
    MOE_BLOCKS,
    MOE_EXPERTS,
    MOE_HIDDEN,
    MOE_INTER,
    MOE_TOP_K,
    moe_config,
    moe_modules,
    routed_inputs,
    starve,
    tiny_tokenizer,
)
from safetensors import safe_open
from typer.testing import CliRunner

from stade_cli.cli import app

runner = CliRunner()
EXPERTS, TOP_K, HIDDEN, INTER, BLOCKS = MOE_EXPERTS, MOE_TOP_K, MOE_HIDDEN, MOE_INTER, MOE_BLOCKS
STARVED = EXPERTS - 1  # block 0's router can never pick this expert (see `starve`)
MIN_TOKENS = MIN_EXPERT_TOKENS


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(request.param))
    starve(model.model.layers[0].mlp.gate.weight)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    res = runner.invoke(
        app,
        [
            *("calibrate", str(root / "model"), "--data", "sample-news", "--nsamples", "4", "--seqlen", "64"),
            *("--device", "cpu", "--hessian", "--out", str(root / "stats")),
        ],
    )
    assert res.exit_code == 0, res.output
    return request.param, root / "model", root / "stats"


def read(folder: Path, fname: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob(fname)):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model's own parameters as plain transformers loads them (Mixtral's files keep per-expert names)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def reference_expert_stats(
    model_dir: Path, ids: torch.Tensor
) -> dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(count, mean, m2, H) of every expert projection's input, from hooks on each MoE module in a plain forward,
    the routing redone here: top-k of the router logits, SiLU(gate) * up for the down projection's input."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    routed: dict[str, torch.Tensor] = {}

    def hook(prefix: str):
        def record(mod: torch.nn.Module, args: tuple, _out: torch.Tensor) -> None:
            routed.update({f"{prefix}.{k}": v for k, v in routed_inputs(mod, args[0]).items()})

        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in moe_modules(model, "model.layers").items()]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    out = {}
    for name, t in routed.items():
        t64 = t.double().numpy()
        n = t64.shape[0]
        mean = t64.mean(0) if n else np.zeros(t64.shape[1])
        m2 = ((t64 - mean) ** 2).sum(0)
        out[name] = (n, mean, m2, 2.0 / max(n, 1) * t64.T @ t64)
    return out


def close(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> bool:
    return float(np.linalg.norm(a - b)) <= rel * max(float(np.linalg.norm(b)), 1e-12)


def test_expert_statistics_are_those_of_their_routed_tokens(moe: tuple[str, Path, Path]) -> None:
    _family, model_dir, stats_dir = moe
    manifest = json.loads((stats_dir / "manifest.json").read_text())
    stats, hessians = read(stats_dir, "stats.safetensors"), read(stats_dir, "hessians.safetensors")
    ref = reference_expert_stats(model_dir, read(stats_dir, "tokens.safetensors")["input_ids"])
    entries = {e["name"]: e for e in manifest["layers"]}
    assert {n for n, e in entries.items() if e["kind"] == "expert"} == set(ref)
    assert not any(".gate" in n and "gate_up" not in n for n in entries), "a router was calibrated as a layer"
    for name, (n, mean, m2, h) in ref.items():
        e = entries[name]
        assert e["count"] == n and e["group"] == name, name
        assert close(stats[f"{name}.mean"].numpy(), mean) and close(stats[f"{name}.m2"].numpy(), m2), name
        assert close(hessians[name].double().numpy(), h), name
    assert ref[f"model.layers.0.mlp.experts.{STARVED}.gate_up_proj"][0] == 0
    assert sum(ref[f"model.layers.1.mlp.experts.{e}.gate_up_proj"][0] for e in range(EXPERTS)) == 4 * 64 * TOP_K


def magnitude_or_wanda_mask(w: np.ndarray, norm: np.ndarray | None) -> np.ndarray:
    scores = np.abs(w) * (norm.astype(np.float32) if norm is not None else 1.0)
    k = w.shape[1] // 2
    mask = np.zeros_like(w, dtype=bool)
    np.put_along_axis(mask, np.argsort(scores, axis=1, kind="stable")[:, :k], True, axis=1)
    return mask


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_experts_pruned_routers_dense_checkpoint_reloads(
    moe: tuple[str, Path, Path], tmp_path: Path, method: str
) -> None:
    from transformers import AutoModelForCausalLM

    from stade_cli.driver.sweep import prune_checkpoints
    from stade_cli.evaluation.evaluate import measured_sparsity
    from stade_cli.models.loading import load_model, resolve_device
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.artifact import Statistics

    _family, model_dir, stats_dir = moe
    loaded = load_model(str(model_dir), "float32", "cpu")
    stats = Statistics.load(stats_dir)
    ((path, report),) = prune_checkpoints(
        loaded, stats, [PruneConfig(method, 0.5)], tmp_path / "out", resolve_device("cpu")
    )
    report = report.dump()  # stade.json as written
    ids = stats.token_ids()[:2]
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        in_memory = loaded.model(ids).logits
        reloaded = plain(ids).logits
    assert torch.allclose(in_memory, reloaded, atol=1e-5, rtol=1e-5)
    assert measured_sparsity(plain) == pytest.approx(0.5, abs=1e-6)  # what `stade eval` reports: experts count

    dense, pruned = weights(model_dir), weights(path)
    ref = reference_expert_stats(model_dir, stats.token_ids())
    starved = sorted(n for n, (count, *_rest) in ref.items() if count < MIN_TOKENS)
    assert f"model.layers.0.mlp.experts.{STARVED}.down_proj" in starved
    for b in range(BLOCKS):
        key = f"model.layers.{b}.mlp.gate.weight"
        assert torch.equal(pruned[key], dense[key]), f"router {key} changed"
        for param in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{b}.mlp.experts.{param}"
            for e in range(EXPERTS):
                name = f"model.layers.{b}.mlp.experts.{e}.{param}"
                w, got = dense[key][e].numpy(), pruned[key][e].numpy()
                zero = got == 0
                if method == "sparsegpt" and name not in starved:
                    assert zero.mean() == 0.5, name  # one 128-column block: exactly half of the expert
                    continue
                n, mean, m2, _h = ref[name]
                mask = magnitude_or_wanda_mask(w, None if name in starved else np.sqrt(m2 + n * mean**2))
                assert np.array_equal(zero, mask), f"{method}: {name} mask differs from its own tokens' scores"
                assert np.array_equal(got[~mask], w[~mask]), name

    counts = report["weights"]
    per_expert = 2 * INTER * HIDDEN + HIDDEN * INTER
    assert counts["expert"] == {
        "layers": 2 * EXPERTS * BLOCKS,
        "weights": per_expert * EXPERTS * BLOCKS,
        "pruned": per_expert * EXPERTS * BLOCKS // 2,
    }
    assert counts["router"] == {"layers": BLOCKS, "weights": EXPERTS * HIDDEN * BLOCKS, "pruned": 0}
    assert counts["attention"]["pruned"] * 2 == counts["attention"]["weights"] > 0
    assert sorted(report["expert_fallback"]["layers"]) == starved
    assert any(f"{len(starved)} expert layers" in w for w in report["warnings"])
    assert "magnitude" in report["expert_fallback"]["rule"]


def test_sequential_and_sweep_restore_experts(moe: tuple[str, Path, Path], tmp_path: Path) -> None:
    """A sweep restores the dense experts between runs (same bytes as a run alone); sequential pruning
    calibrates experts too (block 0 sees dense inputs either way, so its experts equal one-shot's)."""
    from stade_cli.driver.sweep import prune_checkpoints
    from stade_cli.models.loading import load_model, resolve_device
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.artifact import Statistics

    _family, model_dir, stats_dir = moe
    cpu = resolve_device("cpu")
    stats = Statistics.load(stats_dir)
    sweep = [PruneConfig("wanda", 0.5, sequential=True), PruneConfig("wanda", 0.3)]
    results = prune_checkpoints(load_model(str(model_dir), "float32", "cpu"), stats, sweep, tmp_path / "sweep", cpu)
    ((alone, _r),) = prune_checkpoints(
        load_model(str(model_dir), "float32", "cpu"), stats, sweep[1:], tmp_path / "1", cpu
    )
    ((one_shot, _r),) = prune_checkpoints(
        load_model(str(model_dir), "float32", "cpu"), stats, [PruneConfig("wanda", 0.5)], tmp_path / "2", cpu
    )
    second, sequential = weights(results[1][0]), weights(results[0][0])
    assert all(torch.equal(t, second[k]) for k, t in weights(alone).items())
    one = weights(one_shot)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(sequential[key], one[key])
    assert results[0][1].weights["expert"].pruned == results[0][1].weights["expert"].weights // 2


def test_bias_update_on_experts_is_refused(moe: tuple[str, Path, Path], tmp_path: Path) -> None:
    _family, model_dir, stats_dir = moe
    args = ["prune", str(model_dir), "--stats", str(stats_dir), "--method", "stadew", "--sparsity", "0.5"]
    res = runner.invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "a")])
    assert res.exit_code != 0 and "--no-bias-update" in res.output and "experts" in res.output
    assert not (tmp_path / "a").exists()
    res = runner.invoke(app, [*args, "--no-bias-update", "--device", "cpu", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output


def test_unknown_fused_layout_is_refused() -> None:
    from torch import nn

    from stade_cli.base.errors import StadeError
    from stade_cli.models.experts import prunable_layers

    block = nn.Module()
    block.experts = nn.Module()
    block.experts.w_in = nn.Parameter(torch.zeros(4, 8, 8))
    with pytest.raises(StadeError, match="w_in"):
        prunable_layers(block)


def test_lazy_calibration_of_fused_checkpoint_equals_eager(moe: tuple[str, Path, Path], tmp_path: Path) -> None:
    """A checkpoint stored under the fused names is read block by block, and gives the same statistics (the
    per-expert names transformers saves are read block by block too: test_moe_streaming)."""
    import shutil

    from safetensors.torch import save_file

    from stade_cli.models.loading import load_model

    _family, model_dir, stats_dir = moe
    fused = tmp_path / "fused"
    shutil.copytree(model_dir, fused, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file({k: v.contiguous() for k, v in weights(model_dir).items()}, str(fused / "model.safetensors"))
    assert load_model(str(fused), "float32", "cpu", lazy=True).lazy
    assert load_model(str(model_dir), "float32", "cpu", lazy=True).lazy
    res = runner.invoke(
        app,
        [
            *("calibrate", str(fused), "--data", "sample-news", "--nsamples", "4", "--seqlen", "64"),
            *("--device", "cpu", "--hessian", "--out", str(tmp_path / "stats")),
        ],
    )
    assert res.exit_code == 0, res.output
    for fname in ("stats.safetensors", "hessians.safetensors"):
        lazy, eager = read(tmp_path / "stats", fname), read(stats_dir, fname)
        assert lazy.keys() == eager.keys()
        assert all(torch.allclose(lazy[k], eager[k], rtol=1e-6, atol=1e-9) for k in eager), fname
    # A Snapshot (save_pretrained's sink) puts the fused experts back exactly.
    from stade_cli.driver.dense import Snapshot

    model = load_model(str(fused), "float32", "cpu").model
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    snap = Snapshot(model)
    for layer in model.model.layers:
        layer.mlp.experts.down_proj.data.zero_()
    snap.restore()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_shared_expert_gate_is_a_router_and_the_shared_expert_an_mlp() -> None:
    """Qwen2-MoE: the router (`mlp.gate`) and the shared expert's gate (`mlp.shared_expert_gate`, an nn.Linear)
    stay dense; the shared expert, which sees every token, is pruned like an MLP."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from stade_cli.models.experts import prunable_layers, routers
    from stade_cli.models.layers import layer_kind

    config = Qwen2MoeConfig(
        vocab_size=260,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        moe_intermediate_size=INTER,
        shared_expert_intermediate_size=48,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    block = AutoModelForCausalLM.from_config(config).model.layers[0]
    layers = prunable_layers(block)
    assert set(routers(block)) == {"mlp.gate", "mlp.shared_expert_gate"}
    assert not set(routers(block)) & set(layers)
    kinds = {name: layer_kind(name) for name in layers}
    shared = {f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert {n for n, k in kinds.items() if k == "mlp"} == shared
    assert sum(k == "expert" for k in kinds.values()) == 2 * EXPERTS
