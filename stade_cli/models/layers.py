"""Where a model keeps its decoder blocks and prunable linear layers, and their weights as (out, in).

A leaf module: every other module may import it, it imports none of them but errors.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from stade_cli.base.errors import StadeError

NORM_CLASS_HINT = "norm"  # RMSNorm, LayerNorm, LlamaRMSNorm, ...


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of num_hidden_layers identical modules (layers, h, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or not linear_layers(mod[0]):
            continue
        if (n is None or len(mod) == n) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise StadeError(
            f"Unsupported architecture {type(model).__name__}: no list of {n} decoder blocks with linear layers "
            "was found.",
            "stade supports decoder-only models whose blocks form one layer list (Llama, Qwen2, OPT, ...)",
        )
    return best


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Every prunable linear layer inside one block, by its name relative to the block (routers excluded)."""
    return {name: mod for name, mod in block.named_modules() if name and is_linear(mod) and not is_router(name)}


def weight_param(module: Any) -> torch.Tensor:
    """The weight as stored (a Parameter, or an expert's slice of a fused one); typed, where `module.weight`
    reads as Tensor | Module to a type checker."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def bias_param(module: Any) -> torch.Tensor | None:
    """The bias as stored, or None for a layer without one."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the storage (GPT-2's Conv1D keeps (in, out))."""
    w = weight_param(module)
    return w.t() if type(module).__name__ == "Conv1D" else w


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy in place: weights loaded from a mapped file then become private pages in place of the file's,
    where rebinding would keep the file's pages resident beside the new ones (twice the memory)."""
    w = weight.t() if type(module).__name__ == "Conv1D" else weight
    stored = weight_param(module)
    stored.data.copy_(w.to(stored.dtype))


def in_features(module: nn.Module) -> int:
    return int(get_weight(module).shape[1])


def is_norm(module: nn.Module) -> bool:
    return NORM_CLASS_HINT in type(module).__name__.lower()


# ----------------------------------------------------------------------------------------------- layer names

# A mixture-of-experts router picks the experts of each token: pruning it changes the routing itself, so it
# is never pruned (docs/methods.md#masks): Mixtral/Qwen-MoE `mlp.gate`, Qwen2-MoE `shared_expert_gate`, `router` and
# whatever a `router` module holds (DBRX's `router.layer`).
ROUTER_NAME = re.compile(r"(^|\.)(gate|shared_expert_gate|router)$|(^|\.)router\.")
# The layer names of docs/methods.md#presets: those whose input is a normalisation layer's output, and those
# whose input is not.
NORM_FED_NAMES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj")
NORM_FED_NAMES += ("fc1", "query_key_value", "c_attn", "c_fc", "w1", "w3", "in_proj")
NOT_NORM_FED_NAMES = ("o_proj", "out_proj", "dense", "down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h")


def is_router(name: str) -> bool:
    """Whether the layer at `name` (relative or qualified) is a mixture-of-experts router, by its name."""
    return ROUTER_NAME.search(name) is not None


def layer_kind(name: str) -> str:
    """`expert` (routed experts), `attention` or `mlp` (everything else, shared experts included)."""
    parts = name.split(".")
    if "experts" in parts:
        return "expert"
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    return "mlp"


def named_fed_by_norm(name: str) -> bool | None:
    """Whether the names of docs/methods.md#presets say the layer's input is a norm's output; None for a name it
    does not list."""
    last = name.rsplit(".", 1)[-1]
    if last in NORM_FED_NAMES:
        return True
    if last in NOT_NORM_FED_NAMES:
        return False
    return None
