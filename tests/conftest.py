"""Shared fixtures: tiny random models (fast) and the real SmolLM2 (slow tests), all offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


def tiny_config(family: str):
    """A two-block model of the given family, small enough that a test runs in well under a second."""
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    common = dict(
        vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128
    )
    if family == "llama":
        return LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2)
    if family == "opt":
        return OPTConfig(
            vocab_size=260,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )
    raise ValueError(family)


def save_tiny_model(family: str, path: Path, seed: int = 0) -> Path:
    """Write a tiny random model and a byte-level tokenizer to `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_tokenizer():
    """A byte-level tokenizer (one id per byte, plus an end-of-text id 256), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep converted models and prepared text in one per-session cache, never the user's."""
    home = os.environ.get("STADE_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "stade-home")
    monkeypatch.setenv("STADE_HOME", home)


@pytest.fixture(scope="session", params=["llama", "qwen2", "opt"])
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return DATA / "reference-smollm2"
