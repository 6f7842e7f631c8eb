"""Where a model keeps its decoder blocks and prunable linear layers, and their weights as (out, in).

A leaf module: every other module may import it, it imports none of them but errors.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import StadeError

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
    """Every prunable linear layer inside one block, by its name relative to the block."""
    return {name: mod for name, mod in block.named_modules() if name and is_linear(mod)}


def weight_param(module: nn.Module) -> nn.Parameter:
    """The weight Parameter as stored; typed, where `module.weight` reads as Tensor | Module to a type checker."""
    return module.get_parameter("weight")


def bias_param(module: nn.Module) -> nn.Parameter | None:
    """The bias Parameter, or None for a layer without one."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, nn.Parameter) else None


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
