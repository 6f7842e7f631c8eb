"""What stade relies on in transformers' internals (models/hf.py), pinned: a transformers release that changes one of
these fails here, by name, before streaming writes a checkpoint that save_pretrained would not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import moe_config, tiny_config
from transformers import AutoModelForCausalLM

from stade_cli.models import hf


def model(family: str, tied: bool = False) -> torch.nn.Module:
    cfg = moe_config(family) if family == "mixtral" else tiny_config(family)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def test_saved_state_drops_a_tied_head_only() -> None:
    assert "lm_head.weight" not in hf.saved_state(model("qwen2", tied=True))
    assert "lm_head.weight" in hf.saved_state(model("llama"))


@pytest.mark.parametrize(("family", "shard"), [("llama", "40KB"), ("qwen2", "2GB")])
def test_saved_names_and_shards_are_save_pretrained_s(family: str, shard: str, tmp_path: Path) -> None:
    """The names and order save_pretrained writes for a model loaded from its files (conversions recorded, none of
    them applied), and its split into shards; for a model built from a config (none recorded) the same names, and the
    attribute stays unset."""
    m = model(family, tied=family == "qwen2")
    state = hf.saved_state(m)
    assert set(hf.saved_names(m, state)) == set(state) and not hasattr(m, "_weight_conversions")
    m.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert hasattr(loaded, "_weight_conversions")
    loaded.save_pretrained(tmp_path / "resaved", max_shard_size=shard)
    state = hf.saved_state(loaded)
    names = hf.saved_names(loaded, state)
    split = hf.shard_plan({n: state[n] for n in names}, shard)
    if split.is_sharded:
        index = json.loads((tmp_path / "resaved" / "model.safetensors.index.json").read_text())
        assert split.tensor_to_filename == index["weight_map"] and split.metadata["total_size"] > 0
    else:
        assert list(split.filename_to_tensors) == ["model.safetensors"]


def test_per_expert_names_are_mapped_with_transformers_conversion_and_saved_back(tmp_path: Path) -> None:
    """Mixtral's experts are stored per expert, stacked on load and saved back per expert: stored_names makes the
    model's tensors from the stored ones as from_pretrained does, and saved_names gives save_pretrained's names."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    model("mixtral").save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        on_disk = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    state = hf.saved_state(loaded)
    assert on_disk.keys() != state.keys()  # per-expert names on disk, stacked in memory
    blocks = [f"model.layers.{i}" for i in range(loaded.config.num_hidden_layers)]
    assert set(hf.saved_names(loaded, state, blocks)) == set(on_disk)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(loaded.config)
    mapped = hf.stored_names(empty, {k: v.to("meta") for k, v in on_disk.items()})
    assert mapped is not None and set(mapped.group_of) == set(state)
    assert empty._weight_conversions  # recorded, as from_pretrained records them: saving reverts them
    for key, conv in mapped.groups.items():
        made = mapped.convert(key, {n: on_disk[n] for _p, n in conv.sources})
        assert all(torch.equal(t, state[n]) for n, t in made.items()), key
    assert hf.covered(empty, on_disk) >= {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.gate.weight"}


def test_a_conversion_across_blocks_is_renamed() -> None:
    """A saved tensor made from two blocks' tensors cannot be written as each block comes by."""
    from transformers.core_model_loading import Chunk, WeightConverter

    m = model("llama")
    both = [f"model.layers.{i}.input_layernorm.weight" for i in (0, 1)]
    m._weight_conversions = [WeightConverter("model.both_norms.weight", both, operations=[Chunk(dim=0)])]
    state = hf.saved_state(m)
    assert "model.both_norms.weight" in hf.saved_names(m, state)
    with pytest.raises(hf.Renamed, match="across its blocks"):
        hf.saved_names(m, state, ["model.layers.0", "model.layers.1"])


def test_bias_switches_give_the_layers_stade_biases() -> None:
    """Llama's `attention_bias` and `mlp_bias` give every projection a bias (o_proj and down_proj included);
    Qwen2 has no switch for o_proj (so STADE's bias update there is refused, never dropped)."""
    llama = tiny_config("llama")
    switches = hf.bias_switches(llama)
    assert switches == {"attention_bias": True, "mlp_bias": True}
    biased = hf.biased_linears(llama, switches)
    assert {"model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"} <= biased
    assert hf.biased_linears(llama) == set()
    assert hf.bias_keys(llama) == {"attention_bias": False, "mlp_bias": False}
    qwen2 = tiny_config("qwen2")
    biased = hf.biased_linears(qwen2, hf.bias_switches(qwen2))
    assert "model.layers.0.self_attn.q_proj" in biased and "model.layers.0.self_attn.o_proj" not in biased


def test_a_hub_file_that_cannot_be_had_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hf.hub_file("stade-tests/not-a-model", "model.safetensors.index.json", str(tmp_path)) is None
