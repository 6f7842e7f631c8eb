"""The architecture matrix: every family users prune, as a tiny random model, against plain transformers.

For each family: calibration (lazy and eager) equals statistics taken by hooks in one plain full-model
forward; `--sequential` wanda equals a hand-written loop over full forwards; the pruned checkpoint
reloads with plain transformers and gives the same logits. Layer types differ within a model where
the family has them (sliding and full attention, local and global rotary tables, no-RoPE layers),
with a sliding window shorter than the windows, so that a block run with another block's arguments
would show. Mixture-of-experts families (Mixtral, Qwen3-MoE) are in the matrix too: each expert's
(out, in) slice is a layer whose statistics are those of the tokens routed to it (the routing redone in
plain torch from the MoE module's input, `conftest.routed_inputs`), routers stay dense, and an expert
that fewer than MIN_EXPERT_TOKENS tokens reach is pruned by magnitude. Adding a family is one entry in
ARCHITECTURES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import (
    MIN_EXPERT_TOKENS,
    MOE_EXPERTS,
    MOE_TOP_K,
    moe_config,
    moe_modules,
    routed_inputs,
    starve,
    tiny_config,
)
from safetensors.torch import save_file
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.driver.calibrate import CalibrationConfig, calibrate
from stade_cli.driver.sweep import prune_checkpoints
from stade_cli.models.blocks import capture_inputs, run_block
from stade_cli.models.loading import load_model
from stade_cli.stages.config import PruneConfig
from stade_cli.stats.artifact import Statistics

from helpers import assert_rel_close

CPU = torch.device("cpu")
RTOL = 1e-5
NSAMPLES, SEQLEN, BATCH = 6, 32, 4  # two batches, the second one short
WINDOW = 8  # sliding window, shorter than SEQLEN
HIDDEN = dict(vocab_size=260, hidden_size=64, num_attention_heads=4, max_position_embeddings=128)


@dataclass(frozen=True)
class Arch:
    config: Callable[[], object]  # a transformers config of a tiny model
    blocks: str  # where the model keeps its decoder blocks (written out here, not found by stade)
    moe: bool = False  # fused experts: last experts underfed (see `save_model`), saved under fused names


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        **HIDDEN, num_hidden_layers=2, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False
    )


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(
        **HIDDEN, num_hidden_layers=2, intermediate_size=128, num_key_value_heads=2, sliding_window=WINDOW
    )


def _qwen2():
    from transformers import Qwen2Config

    # Tied embeddings, and biased q/k/v (checked below).
    return Qwen2Config(
        **HIDDEN, num_hidden_layers=2, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True
    )


def _qwen3():
    from transformers import Qwen3Config

    # Block 0 full attention, block 1 sliding (`max_window_layers`): layer types differ.
    return Qwen3Config(
        **HIDDEN,
        num_hidden_layers=2,
        intermediate_size=128,
        num_key_value_heads=2,
        head_dim=16,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
    )


def _gemma2():
    from transformers import Gemma2Config

    return Gemma2Config(
        **HIDDEN,
        num_hidden_layers=2,
        intermediate_size=128,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )


def _gemma3():
    from transformers import Gemma3TextConfig

    # Local (sliding window, local rotary table) and global (full mask, global rotary table) layers.
    return Gemma3TextConfig(
        **HIDDEN,
        num_hidden_layers=3,
        intermediate_size=128,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


def _cohere2():
    from transformers import Cohere2Config

    # Sliding layers use RoPE, the full-attention layer none.
    return Cohere2Config(
        **HIDDEN,
        num_hidden_layers=3,
        intermediate_size=128,
        num_key_value_heads=2,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=260, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=128)


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(
        **HIDDEN,
        num_hidden_layers=2,
        intermediate_size=128,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(_llama, "model.layers"),
    "mistral": Arch(_mistral, "model.layers"),
    "qwen2": Arch(_qwen2, "model.layers"),
    "qwen3": Arch(_qwen3, "model.layers"),
    "gemma2": Arch(_gemma2, "model.layers"),
    "gemma3": Arch(_gemma3, "model.layers"),
    "cohere2": Arch(_cohere2, "model.layers"),
    "opt": Arch(lambda: tiny_config("opt"), "model.decoder.layers"),
    "gpt2": Arch(_gpt2, "transformer.h"),
    "phi3": Arch(_phi3, "model.layers"),
    "mixtral": Arch(lambda: moe_config("mixtral"), "model.layers", moe=True),
    "qwen3_moe": Arch(lambda: moe_config("qwen3_moe"), "model.layers", moe=True),
}


def save_model(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny random float32 model of `family` (larger initial weights than usual, so that layers interact)."""
    from conftest import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    config = ARCHITECTURES[family].config()
    config.initializer_range = 0.1
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if ARCHITECTURES[family].moe:
        # The magnitude fallback, both ways: block 1's last expert is reached by no token, block 0's by a few
        # (a small random router row: 4 tokens in Mixtral, 9 in Qwen3-MoE; checked in the tests).
        starve(model.model.layers[1].mlp.gate.weight)
        starve(model.model.layers[0].mlp.gate.weight)
        rare = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(2))
        model.model.layers[0].mlp.gate.weight.data[-1] = 0.2 * rare
    model.save_pretrained(path)
    if ARCHITECTURES[family].moe:
        # transformers writes per-expert names, which stade loads whole (test_moe); under the fused names the
        # checkpoint is read block by block, so that lazy calibration is lazy here too.
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    tiny_tokenizer().save_pretrained(path)
    return path


def windows(path: Path, seed: int = 0) -> Path:
    """Random calibration windows as a token-id file."""
    ids = torch.randint(0, 260, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(seed))
    save_file({"input_ids": ids}, str(path))
    return path


# ----------------------------------------------------------------------------------------------- references


def prunable(model: nn.Module, blocks: str) -> dict[str, nn.Module]:
    """Every nn.Linear or GPT-2 Conv1D inside the decoder blocks, by full name."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if name.startswith(blocks + ".") and (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D")
    }


def weight(mod: nn.Module) -> torch.Tensor:
    """(out, in); GPT-2's Conv1D stores (in, out)."""
    return mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight


class Hooks:
    """Inputs of the given layers in plain full-model forwards, summed in float64; and of every expert of the
    given MoE modules, `<moe>.experts.<e>.<param>`, from the routing redone on each MoE module's input."""

    def __init__(self, layers: dict[str, nn.Module], moes: dict[str, nn.Module] | None = None) -> None:
        self.count: dict[str, int] = {}
        self.sum: dict[str, torch.Tensor] = {}
        self.sumsq: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.handles = [mod.register_forward_hook(self._hook(name)) for name, mod in layers.items()]
        self.handles += [mod.register_forward_hook(self._moe_hook(name)) for name, mod in (moes or {}).items()]

    def _hook(self, name: str):
        def hook(_mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            self._add(name, args[0])

        return hook

    def _moe_hook(self, prefix: str):
        def hook(mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            for local, x in routed_inputs(mod, args[0]).items():
                self._add(f"{prefix}.{local}", x)

        return hook

    def _add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if name not in self.count:
            self.count[name] = 0
            self.sum[name] = torch.zeros(x.shape[1], dtype=torch.float64)
            self.sumsq[name] = torch.zeros(x.shape[1], dtype=torch.float64)
            self.xtx[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.count[name] += x.shape[0]
        self.sum[name] += x.sum(0)
        self.sumsq[name] += x.square().sum(0)
        self.xtx[name] += x.t() @ x

    def run(self, model: nn.Module, ids: torch.Tensor) -> Hooks:
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            for h in self.handles:
                h.remove()
        return self


def expert_weights(moes: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Each expert's (out, in) slice of the fused 3-D parameters, a view, by `<moe>.experts.<e>.<param>`."""
    return {
        f"{prefix}.experts.{e}.{param}": getattr(moe.experts, param).data[e]
        for prefix, moe in moes.items()
        for param in ("gate_up_proj", "down_proj")
        for e in range(getattr(moe.experts, param).shape[0])
    }


def wanda_sequential_by_hand(path: Path, blocks: str, ids: torch.Tensor, sparsity: float) -> tuple[nn.Module, set[str]]:
    """Block k is pruned from hooks in a full forward of the model whose blocks 0..k-1 are already pruned:
    its linear layers by Wanda, each expert by Wanda on its routed tokens, or by magnitude where fewer than
    MIN_EXPERT_TOKENS tokens reach it (docs/methods.md#mixture-of-experts-models); routers are not touched.
    Returns the model and the experts pruned by magnitude."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fallback: set[str] = set()
    for block in model.get_submodule(blocks):
        inside = {id(m) for m in block.modules()}
        layers = {name: mod for name, mod in prunable(model, blocks).items() if id(mod) in inside}
        moes = {name: mod for name, mod in moe_modules(model, blocks).items() if id(mod) in inside}
        seen = Hooks(layers, moes).run(model, ids)
        targets = {name: weight(mod) for name, mod in layers.items()} | expert_weights(moes)
        with torch.no_grad():
            for name, w in targets.items():
                if ".experts." in name and seen.count[name] < MIN_EXPERT_TOKENS:
                    scores = w.abs().double()  # the fallback: magnitude
                    fallback.add(name)
                else:
                    scores = w.abs().double() * seen.sumsq[name].sqrt()  # |W_ij| * ||x_j||, per output row
                order = torch.sort(scores, dim=1, stable=True).indices[:, : int(w.shape[1] * sparsity)]
                w.scatter_(1, order, 0.0)
    return model, fallback


# ----------------------------------------------------------------------------------------------- the matrix


@dataclass
class Family:
    name: str
    path: Path  # the saved model
    data: Path  # its calibration windows
    stats: Statistics  # eager calibration with Hessians


def calibration(data: Path) -> CalibrationConfig:
    return CalibrationConfig(data=str(data), nsamples=None, seqlen=None, hessian=True, batch_size=BATCH)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    tmp = tmp_path_factory.mktemp(request.param)
    path = save_model(request.param, tmp / "model")
    data = windows(tmp / "ids.safetensors")
    eager = load_model(str(path), dtype="float32", device="cpu")
    assert not eager.lazy
    return Family(request.param, path, data, calibrate(eager, calibration(data), tmp / "eager", CPU))


def test_statistics_equal_full_forward(family: Family, tmp_path: Path) -> None:
    blocks = ARCHITECTURES[family.name].blocks
    lazy = load_model(str(family.path), dtype="float32", device="cpu", lazy=True)
    assert lazy.lazy
    lazy_stats = calibrate(lazy, calibration(family.data), tmp_path / "lazy", CPU)
    model = load_model(str(family.path), dtype="float32", device="cpu").model
    ids = family.stats.token_ids()
    assert torch.equal(lazy_stats.token_ids(), ids)
    moes = moe_modules(model, blocks)
    assert bool(moes) == ARCHITECTURES[family.name].moe
    expected = Hooks(prunable(model, blocks), moes).run(model, ids)
    assert expected.count, "the reference saw no layer"
    experts = {name for name in expected.count if ".experts." in name}
    for prefix in moes:  # every token goes to top-k experts; block 0's last one a few, block 1's none
        routed = [expected.count[f"{prefix}.experts.{e}.gate_up_proj"] for e in range(MOE_EXPERTS)]
        assert sum(routed) == NSAMPLES * SEQLEN * MOE_TOP_K
        assert 0 < routed[-1] < MIN_EXPERT_TOKENS if prefix == f"{blocks}.0.mlp" else routed[-1] == 0, routed
    for mode, stats in (("eager", family.stats), ("lazy", lazy_stats)):
        assert set(stats.layers) == set(expected.count), f"{mode}: the artifact must cover exactly the block layers"
        for name in sorted(expected.count):
            n = expected.count[name]
            mean = expected.sum[name] / max(n, 1)
            got = stats.layer(name, hessian=True)
            assert got.count == n, f"{mode} {name} count"
            assert name in experts or n == NSAMPLES * SEQLEN, f"{mode} {name} count"
            var = (expected.sumsq[name] - n * mean.square()) / max(n - 1, 1)
            assert_rel_close(got.mean, mean, f"{mode} {name} mean", RTOL)
            assert_rel_close(got.var, var, f"{mode} {name} var", RTOL)
            assert_rel_close(got.hessian, expected.xtx[name] * (2.0 / max(n, 1)), f"{mode} {name} hessian", RTOL)


def test_sequential_wanda_equals_loop_by_hand_and_checkpoint_reloads(family: Family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    blocks = ARCHITECTURES[family.name].blocks
    ids = family.stats.token_ids()
    loaded = load_model(str(family.path), dtype="float32", device="cpu")
    config = PruneConfig("wanda", 0.5, sequential=True)
    [(out, record)] = prune_checkpoints(loaded, family.stats, [config], tmp_path / "pruned", CPU, batch_size=BATCH)
    assert record.sequential

    by_hand, fallback = wanda_sequential_by_hand(family.path, blocks, ids, 0.5)
    ours = dict(loaded.model.named_parameters())
    theirs = dict(by_hand.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in theirs.items():
        assert torch.equal(ours[name], p), f"{family.name}: {name} differs from the loop by hand"
    moes = moe_modules(by_hand, blocks)
    targets = {name: weight(mod) for name, mod in prunable(by_hand, blocks).items()} | expert_weights(moes)
    for name, w in targets.items():
        assert (w == 0).float().mean().item() >= 0.5, name
    dense = AutoModelForCausalLM.from_pretrained(family.path, dtype=torch.float32)
    for prefix in moes:  # routers stay dense (and equal the loop by hand's, above)
        assert torch.equal(ours[f"{prefix}.gate.weight"], dense.get_submodule(prefix).gate.weight), prefix
    if moes:  # the fallback ran where the loop by hand took it (at least the last experts), and only there
        last = [f"{blocks}.{k}.mlp.experts.{MOE_EXPERTS - 1}" for k in (0, 1)]
        assert {f"{e}.{p}" for e in last for p in ("gate_up_proj", "down_proj")} <= fallback
        assert record.expert_fallback is not None and set(record.expert_fallback["layers"]) == fallback
    else:
        assert not fallback

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = loaded.model(input_ids=ids, use_cache=False).logits
        got = reloaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_families_have_what_they_are_here_for(tmp_path: Path) -> None:
    """The configs exercise what they claim: differing layer types, tied embeddings, biases, Conv1D, fused qkv."""
    from transformers import AutoModelForCausalLM

    def build(family: str) -> nn.Module:
        return AutoModelForCausalLM.from_config(ARCHITECTURES[family].config())

    for family in ("qwen3", "gemma2", "gemma3", "cohere2"):
        config = ARCHITECTURES[family].config()
        assert len(set(config.layer_types)) == 2 and config.sliding_window < SEQLEN, family
    assert ARCHITECTURES["gemma3"].config().layer_types.index("full_attention") == 1
    qwen2 = build("qwen2")
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert type(build("gpt2").transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert hasattr(build("phi3").model.layers[0].self_attn, "qkv_proj")


# ----------------------------------------------------------------------------------------------- refusals


class _Block(nn.Module):
    """Returns a tuple, as older decoder layers do, and takes a per-block argument."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor, scale: float) -> tuple[torch.Tensor, None]:
        return self.proj(h) * scale, None


class _Loop(nn.Module):
    """A decoder loop; `between` is what it does between blocks besides taking `[0]` of each block's output."""

    def __init__(self, between: str = "") -> None:
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": 3})()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(_Block() for _ in range(3))
        self.between = between

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, scale=i + 1.0)[0]
            if self.between == "scale":
                h = h * 2
            elif self.between == "twice":
                h = layer(h, scale=1.0)[0]
        return h


def test_tuple_returning_blocks_replay_with_their_own_arguments() -> None:
    torch.manual_seed(0)
    model, ids = _Loop(), torch.randint(0, 10, (3, 5))
    inputs = capture_inputs(model, ids, 2, CPU)
    assert [[kw["scale"] for _args, kw in per_block] for per_block in inputs.calls] == [[1.0] * 2, [2.0] * 2, [3.0] * 2]
    for i, block in enumerate(model.layers):
        inputs.hidden = run_block(block, inputs, CPU, i)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(inputs.hidden), model(ids))


@pytest.mark.parametrize("between", ["scale", "twice"])
def test_architecture_that_cannot_be_replayed_is_refused(between: str) -> None:
    with pytest.raises(StadeError, match="Cannot run _Loop one block at a time"):
        capture_inputs(_Loop(between), torch.zeros(2, 4, dtype=torch.long), 1, CPU)
