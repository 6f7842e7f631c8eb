"""MoE checkpoints as the hub publishes them (tiny Mixtral and Qwen3-MoE, per-expert tensor names, as save_pretrained
writes them) are calibrated and pruned block by block: each block's experts are stacked from their per-expert tensors
with transformers' own conversion, and the pruned checkpoint is written back under the input's names. Checked against
the model loaded whole (statistics, and the same checkpoint files byte for byte) and against plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import moe_config, starve, tiny_tokenizer

from helpers import invoke, read_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def published(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoE checkpoint written by save_pretrained: per-expert names on disk, in two shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(request.param))
    starve(model.model.layers[0].mlp.gate.weight)  # an expert no token reaches: the magnitude fallback
    path = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(path)
    return path


def stored_names(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted(json.loads(index.read_text())["weight_map"])
    return sorted(read_weights(folder))


def files_digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if p.suffix == ".safetensors" or "index" in p.name}


def test_the_published_checkpoint_has_per_expert_names(published: Path) -> None:
    names = stored_names(published)
    assert any(".experts.0." in n for n in names) and not any("gate_up_proj" in n for n in names)
    assert (published / "model.safetensors.index.json").exists()  # a block's experts may span shards


def test_per_expert_checkpoint_calibrates_block_by_block(published: Path, tmp_path: Path) -> None:
    """The blocks stay on disk (meta) and the statistics and fingerprint are those of the model loaded whole."""
    from stade_cli.driver.calibrate import CalibrationConfig, calibrate
    from stade_cli.models.blocks import iterate_blocks
    from stade_cli.models.fingerprint import fingerprint
    from stade_cli.models.loading import load_model

    config = CalibrationConfig(data="sample-news", nsamples=4, seqlen=32, hessian=True, batch_size=2)
    lazy = load_model(str(published), dtype="float32", device="cpu", lazy=True)
    assert lazy.lazy and lazy.whole_reason is None
    assert all(p.is_meta for _i, _p, block in iterate_blocks(lazy.model) for p in block.parameters())
    eager = load_model(str(published), dtype="float32", device="cpu")
    a = calibrate(lazy, config, tmp_path / "lazy", CPU)
    b = calibrate(eager, config, tmp_path / "eager", CPU)
    assert a.manifest.model.fingerprint == b.manifest.model.fingerprint == fingerprint(eager.model)
    assert a.manifest.dump()["layers"] == b.manifest.dump()["layers"]
    assert any(".experts." in name for name in a.layers)
    for name in a.layers:
        x, y = a.layer(name, hessian=True), b.layer(name, hessian=True)
        assert torch.equal(x.mean, y.mean) and torch.equal(x.m2, y.m2) and torch.equal(x.hessian, y.hessian), name
    assert all(p.is_meta for _i, _p, block in iterate_blocks(lazy.model) for p in block.parameters())


@pytest.mark.parametrize("shard", ["2GB", "150KB"])
def test_per_expert_checkpoint_prunes_streaming_under_its_own_names(
    published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard: str
) -> None:
    """Streamed from the files, pruned in memory into planned shards, and written by transformers' save_pretrained:
    the same files byte for byte (one file, or shards that keep each stacked tensor's experts together, as
    save_pretrained does), under the input's per-expert names, and plain transformers loads them."""
    from transformers import AutoModelForCausalLM

    import stade_cli.driver.sinks as sinks
    from stade_cli.driver.sweep import prune_checkpoints
    from stade_cli.models.loading import load_model
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.artifact import Statistics

    monkeypatch.setattr(sinks, "MAX_SHARD_SIZE", shard)
    stats_dir = tmp_path / "stats"
    res = invoke(
        *("calibrate", published, "--data", "sample-news", "--nsamples", 4, "--seqlen", 32, "--hessian"),
        *("--device", "cpu", "--out", stats_dir),
    )
    assert res.exit_code == 0, res.output
    stats = Statistics.load(stats_dir)
    configs = [PruneConfig("wanda", 0.5), PruneConfig("sparsegpt", None, "2:4")]
    lazy = load_model(str(published), "auto", CPU, lazy=True)
    assert lazy.lazy
    streamed = prune_checkpoints(lazy, stats, configs, tmp_path / "str", CPU)
    shards = prune_checkpoints(load_model(str(published), "auto", CPU), stats, configs, tmp_path / "shards", CPU)
    whole = load_model(str(published), "auto", CPU)
    saved = prune_checkpoints(whole, stats, configs[1:], tmp_path / "mem", CPU, save_pretrained=True)
    assert [r.route for _p, r in streamed] == ["streaming"] * 2
    assert [r.route for _p, r in shards + saved] == ["in-memory"] * 3
    assert not any("in memory" in w for _p, r in streamed for w in r.warnings)
    for (a, ra), (b, rb) in zip(streamed, shards, strict=True):
        assert files_digest(a) == files_digest(b) and ra.layers == rb.layers
    assert files_digest(streamed[1][0]) == files_digest(saved[0][0])
    assert (len(files_digest(saved[0][0])) > 3) == (shard != "2GB")
    for path, _r in streamed:
        assert stored_names(path) == stored_names(published)
    pruned = read_weights(streamed[1][0])
    reference = read_weights(saved[0][0])
    assert pruned.keys() == reference.keys() and all(torch.equal(t, reference[k]) for k, t in pruned.items())
    plain = AutoModelForCausalLM.from_pretrained(streamed[1][0], dtype=torch.float32).state_dict()
    assert plain.keys() == whole.model.state_dict().keys()
    assert all(torch.equal(t, plain[k]) for k, t in whole.model.state_dict().items())  # left pruned by 2:4
    gate_up = plain["model.layers.1.mlp.experts.gate_up_proj"]
    assert float((gate_up == 0).float().mean()) == 0.5


def test_cli_prune_of_a_per_expert_checkpoint_streams(published: Path, tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    res = invoke(
        *("calibrate", published, "--data", "sample-news", "--nsamples", 2, "--seqlen", 32),
        *("--device", "cpu", "--out", stats),
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "pruned"
    res = invoke("prune", published, "--stats", stats, "--method", "wanda", "--sparsity", 0.5, "--device", "cpu",
                 "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "pruned in memory" not in res.output
    assert json.loads((out / "stade.json").read_text())["route"] == "streaming"
    assert stored_names(out) == stored_names(published)


def test_plan_reads_a_per_expert_checkpoint_lazily(published: Path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from stade_cli.models.weights import planned_loading

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(published))
    assert planned_loading(str(published), model) == "lazy"
