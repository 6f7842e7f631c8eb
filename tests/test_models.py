"""Resolving, loading and inspecting models: specs, devices, dtypes, blocks and linear layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stade_cli.base.dtypes import parse_dtype
from stade_cli.base.errors import StadeError
from stade_cli.models.fingerprint import fingerprint
from stade_cli.models.layers import find_blocks, in_features, linear_layers
from stade_cli.models.loading import load_model, max_context, resolve_device, resolve_model

BLOCK_LAYERS = {
    "llama": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    },
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
}


def test_load_and_find_blocks(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert loaded.dtype == torch.float32 and loaded.path == str(tiny_model_dir)
    name, blocks = find_blocks(loaded.model)
    assert len(blocks) == 2 and name.endswith("layers")
    layers = linear_layers(blocks[0])
    family = "opt" if loaded.model.config.model_type == "opt" else "llama"
    assert set(layers) == BLOCK_LAYERS[family]
    # Every layer reads the hidden size (64) but the MLP's down projection, which reads the intermediate size (128).
    assert {n: in_features(m) for n, m in layers.items()} == {
        n: 128 if n.endswith(("down_proj", "fc2")) else 64 for n in layers
    }
    assert max_context(loaded.model) == 128


def test_load_dtype(tiny_llama_dir: Path) -> None:
    assert load_model(str(tiny_llama_dir), dtype="bfloat16").dtype == torch.bfloat16


def test_fingerprint_tells_weights_apart(tiny_llama_dir: Path) -> None:
    a = load_model(str(tiny_llama_dir)).model
    b = load_model(str(tiny_llama_dir)).model
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).mul_(2)
    assert fingerprint(a) != fingerprint(b)


def test_resolve_model(tmp_path: Path, tiny_llama_dir: Path) -> None:
    assert resolve_model(str(tiny_llama_dir)) == str(tiny_llama_dir)
    assert resolve_model("org/name") == "org/name"  # a hub id, passed on
    (tmp_path / "file.bin").write_bytes(b"")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    cases = [
        (str(tmp_path / "file.bin"), "is a file, not a model"),
        (str(tmp_path), "has no config.json"),
        (str(tmp_path / "noweights"), "no weights"),
        (str(tmp_path / "missing"), "does not exist"),
        ("./missing", "does not exist"),
        (str(tmp_path / "x.gguf"), "GGUF file"),
    ]
    for spec, match in cases:
        with pytest.raises(StadeError, match=match):
            resolve_model(spec)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")  # this machine
    for available, expected in ((True, "cuda"), (False, "cpu")):  # and both answers, whatever this machine has
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert resolve_device("auto") == torch.device(expected)
    monkeypatch.undo()
    with pytest.raises(StadeError, match="tpu"):
        resolve_device("tpu")
    with pytest.raises(StadeError, match="gpu9000"):
        resolve_device("gpu9000")
    if not torch.cuda.is_available():
        with pytest.raises(StadeError, match="no CUDA GPU"):
            resolve_device("cuda:0")


@pytest.mark.requires_gpu
def test_resolve_device_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert resolve_device("cuda").type == "cuda"
    with pytest.raises(StadeError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_parse_dtype() -> None:
    assert parse_dtype(None) is None and parse_dtype("float16") == torch.float16
    with pytest.raises(StadeError, match="int8"):
        parse_dtype("int8")


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(tmp_path)
    with pytest.raises(StadeError, match="T5Config"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_builtin_model() -> None:
    from stade_cli.models.fingerprint import full_fingerprint

    loaded = load_model("smollm2-135m")
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.dtype == torch.float32
    assert len(find_blocks(loaded.model)[1]) == 30
    assert full_fingerprint(loaded.model) == "785e20b3e653276b0579b744214a1186d730ba80af04f397f642d6432e5e0154"
