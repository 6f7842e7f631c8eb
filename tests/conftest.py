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


MOE_EXPERTS, MOE_TOP_K, MOE_HIDDEN, MOE_INTER, MOE_BLOCKS = 5, 2, 64, 32, 2
MIN_EXPERT_TOKENS = 16  # experts.MIN_EXPERT_TOKENS, restated: docs/methods.md#mixture-of-experts-models


def moe_config(family: str):
    """A tiny Mixtral or Qwen3-MoE config: MOE_EXPERTS fused experts per block, top MOE_TOP_K routing."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=260,
        hidden_size=MOE_HIDDEN,
        num_hidden_layers=MOE_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_experts_per_tok=MOE_TOP_K,
        tie_word_embeddings=False,
    )
    if family == "mixtral":
        return MixtralConfig(**common, intermediate_size=MOE_INTER, num_local_experts=MOE_EXPERTS)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=MOE_INTER, num_experts=MOE_EXPERTS, head_dim=16
        )
    raise ValueError(family)


def starve(router_weight: torch.Tensor) -> None:
    """Rows v, -v, u, -u, 0: for every token two of the first four logits are >= 0, so the zero row (the last
    expert) never makes the top 2 (ties have probability zero)."""
    g = torch.Generator().manual_seed(1)
    v, u = torch.randn(2, router_weight.shape[1], generator=g)
    router_weight.data.copy_(torch.stack([v, -v, u, -u, torch.zeros_like(v)]))


def moe_modules(model: torch.nn.Module, blocks: str) -> dict[str, torch.nn.Module]:
    """The sparse-MoE modules (a router `gate` and fused `experts`) inside the decoder blocks, by full name."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if name.startswith(blocks + ".") and hasattr(mod, "gate") and hasattr(mod, "experts")
    }


def routed_inputs(moe: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each expert projection's input, by `experts.<e>.<param>`, the routing redone in plain torch from the MoE
    module's input `x`: the tokens whose top-k router logits include e, and SiLU(gate) * up of those tokens for
    the down projection."""
    x = x.detach().reshape(-1, x.shape[-1])
    gate_up = moe.experts.gate_up_proj.detach()  # (E, 2I, H): gate rows, then up rows
    inter = gate_up.shape[1] // 2
    chosen = torch.topk(x @ moe.gate.weight.detach().t(), MOE_TOP_K, dim=-1).indices
    out = {}
    for e in range(gate_up.shape[0]):
        xs = x[(chosen == e).any(-1)]
        out[f"experts.{e}.gate_up_proj"] = xs
        out[f"experts.{e}.down_proj"] = torch.nn.functional.silu(xs @ gate_up[e, :inter].t()) * (
            xs @ gate_up[e, inter:].t()
        )
    return out


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
