"""Block-wise reconstruction: the mask is kept, the block error drops, runs repeat bit for bit, stade.json reports
held-out losses that a plain transformers forward reproduces, and the checkpoint reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import calibrate, invoke, read_weights

STEPS = "8"


@pytest.fixture(scope="module")
def stats8(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 windows of 64 tokens: one is held out."""
    return calibrate(tiny_llama_dir, tmp_path_factory.mktemp("stats8") / "s", nsamples=8)


def prune(model: Path, stats: Path, out: Path, *extra: str) -> dict:
    res = invoke(
        "prune", model, "--stats", stats, "--method", "wanda", "--pattern", "2:4", "-b", 4, "--out", out, *extra
    )
    assert res.exit_code == 0, res.output
    return json.loads((out / "stade.json").read_text())


def block_outputs(folder: Path, ids: torch.Tensor, swap: dict[int, Path] | None = None) -> list[torch.Tensor]:
    """Every block's output in a plain transformers forward; `swap` puts other checkpoints' blocks in place."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for k, other in (swap or {}).items():
        model.model.layers[k] = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).model.layers[k]
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return outs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().sum() / b.double().square().sum())


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path, stats8: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recon")
    out = {
        "plain": root / "plain",
        "block": root / "block",
        "again": root / "again",
        "seed1": root / "seed1",
        "seq": root / "seq",
    }
    prune(tiny_llama_dir, stats8, out["plain"])
    prune(tiny_llama_dir, stats8, out["block"], "--reconstruct", "block", "--reconstruct-steps", STEPS)
    prune(tiny_llama_dir, stats8, out["again"], "--reconstruct", "block", "--reconstruct-steps", STEPS)
    prune(tiny_llama_dir, stats8, out["seed1"], "--reconstruct", "block", "--reconstruct-steps", STEPS, "--seed", "1")
    prune(tiny_llama_dir, stats8, out["seq"], "--reconstruct", "block", "--reconstruct-steps", STEPS, "--sequential")
    return out


def test_mask_is_kept_and_weights_move(runs: dict[str, Path]) -> None:
    plain, block = read_weights(runs["plain"]), read_weights(runs["block"])
    linear = [k for k in plain if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert len(linear) == 14
    for k in linear:
        assert torch.equal(plain[k] == 0, block[k] == 0), f"{k}: the reconstruction changed the mask"
        assert (plain[k] == 0).float().mean() == 0.5
    assert any(not torch.equal(plain[k], block[k]) for k in linear)
    for k in plain:  # norms and embeddings are not trained
        if k not in linear:
            assert torch.equal(plain[k], block[k]), k


def test_same_seed_same_bits_other_seed_other_weights(runs: dict[str, Path]) -> None:
    a, b, c = read_weights(runs["block"]), read_weights(runs["again"]), read_weights(runs["seed1"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_block_error_drops_on_calibration_windows(tiny_llama_dir: Path, stats8: Path, runs: dict[str, Path]) -> None:
    """One-shot: block k sees the dense model's inputs; its error against the dense block must drop."""
    from stade_cli.stats.artifact import Statistics

    ids = Statistics.load(stats8).token_ids()
    dense = block_outputs(tiny_llama_dir, ids)
    for k in range(2):
        plain = block_outputs(tiny_llama_dir, ids, {k: runs["plain"]})[k]
        block = block_outputs(tiny_llama_dir, ids, {k: runs["block"]})[k]
        assert rel(block, dense[k]) < 0.7 * rel(plain, dense[k])
    logits_err = []
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits
        for name in ("plain", "block"):
            logits_err.append(rel(AutoModelForCausalLM.from_pretrained(runs[name])(ids).logits, ref))
    assert logits_err[1] < logits_err[0]


def test_heldout_losses_in_stade_json_match_a_plain_forward(
    tiny_llama_dir: Path, stats8: Path, runs: dict[str, Path]
) -> None:
    """The reported held-out losses, recomputed with hooks on transformers models: before = the masked block,
    after = the saved block; targets = the dense block on the same inputs (dense one-shot, pruned sequential)."""
    from stade_cli.stages.solvers.reconstruction import split_windows
    from stade_cli.stats.artifact import Statistics

    ids = Statistics.load(stats8).token_ids()
    for mode in ("block", "seq"):
        report = json.loads((runs[mode] / "stade.json").read_text())
        stage = report["stages"]["reconstruct"]
        assert stage["name"] == "block" and stage["settings"]["steps"] == int(STEPS)
        assert [b["block"] for b in report["reconstruction"]] == ["model.layers.0", "model.layers.1"]
        for k, entry in enumerate(report["reconstruction"]):
            _, held = split_windows([4, 4], 0 * 1_000_003 + k)
            rows = torch.tensor([4 * b + r for b, rs in held for r in rs])
            assert entry["heldout_windows"] == len(rows) == 1 and entry["train_windows"] == 7
            x = ids[rows]
            assert 0 < entry["heldout_after"] < entry["heldout_before"]
            if mode == "block":
                dense = block_outputs(tiny_llama_dir, x)[k]
                after = block_outputs(tiny_llama_dir, x, {k: runs["block"]})[k]
                before = block_outputs(tiny_llama_dir, x, {k: runs["plain"]})[k]
                assert rel(before, dense) == pytest.approx(entry["heldout_before"], rel=1e-4)
            else:  # the pruned model's own inputs to block k, through the dense block k and the saved one
                dense = block_outputs(runs["seq"], x, {k: tiny_llama_dir})[k]
                after = block_outputs(runs["seq"], x)[k]
            assert rel(after, dense) == pytest.approx(entry["heldout_after"], rel=1e-4)
    plain = json.loads((runs["plain"] / "stade.json").read_text())
    assert plain["stages"]["reconstruct"] == {"name": "none"} and "reconstruction" not in plain


def test_checkpoint_reloads_with_same_logits(tiny_llama_dir: Path, stats8: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from stade_cli.driver.sweep import prune_checkpoints
    from stade_cli.models.loading import load_model, resolve_device
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stages.reconstructions.block import BlockSettings
    from stade_cli.stats.artifact import Statistics

    loaded = load_model(str(tiny_llama_dir), "float32", "cpu")
    stats = Statistics.load(stats8)
    cfg = PruneConfig("stade", 0.5, reconstruct="block", settings=(BlockSettings(steps=5),))
    ((path, _report),) = prune_checkpoints(loaded, stats, [cfg], tmp_path / "out", resolve_device("cpu"))
    ids = stats.token_ids()[:2]
    with torch.no_grad():
        in_memory = loaded.model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits
    assert torch.allclose(in_memory, reloaded, atol=1e-5, rtol=1e-5)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_bfloat16_block_keeps_dtype_device_and_mask(device: str) -> None:
    """Float32 master weights inside, the block's own dtype, device and storage outside."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from stade_cli.models.blocks import capture_inputs, run_block
    from stade_cli.stages.reconstructions.block import BlockSettings
    from stade_cli.stages.solvers.reconstruction import reconstruct_block

    torch.manual_seed(0)
    dev = torch.device(device)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.bfloat16)
    ids = torch.randint(0, 256, (8, 32))
    inputs = capture_inputs(model, ids, 4, dev)
    block = model.model.layers[0].to(dev)
    dense = run_block(block, inputs, dev, 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in block.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.masked_fill_((torch.rand(mod.weight.shape, generator=g) < 0.5).to(dev), 0)
    storage = {n: p.data.data_ptr() for n, p in block.named_parameters()}
    zeros = {n: p == 0 for n, p in block.named_parameters()}
    res = reconstruct_block(block, inputs.of_block(0), dense, dev, BlockSettings(steps=10), seed=0)
    for n, p in block.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == dev.type and p.data.data_ptr() == storage[n]
        assert not p.requires_grad and p.grad is None
        if n.endswith("proj.weight"):
            assert torch.equal(p == 0, zeros[n]), n
    assert res["heldout_after"] < res["heldout_before"]


def test_unknown_reconstruction_is_refused_before_work(tiny_llama_dir: Path, stats8: Path, tmp_path: Path) -> None:
    res = invoke(
        "prune", tiny_llama_dir, "--stats", stats8, "--method", "wanda", "--reconstruct", "blocks", "--out", tmp_path
    )
    assert res.exit_code == 1 and "Unknown reconstruction 'blocks'" in res.output and "block, none" in res.output
