"""Mixture-of-experts blocks: routed experts as prunable layers, and routers (their statistics: stats/collectors.py).

transformers 5 keeps the experts of one MoE layer fused, as 3-D parameters of one module
(`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) in Mixtral, Qwen2/3-MoE, ...). Each expert's
(out, in) slice is a layer of its own here: it is scored, masked and solved alone, on the statistics of
exactly the tokens the router sends to that expert, with the expert's own input (for `down_proj`, the
activated intermediate of those tokens). Routers are never pruned (docs/methods.md#mixture-of-experts-models).

An expert that saw fewer than stages.presets.MIN_EXPERT_TOKENS calibration tokens is pruned by a fallback preset.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.models.layers import is_router, layer_kind, linear_layers

FUSED_INPUT = ("gate_up_proj", "up_proj")  # the first projection: gate and up fused, or up alone (has_gate False)


class ExpertLayer:
    """One expert's (out, in) slice of a fused 3-D parameter, seen like an nn.Linear by get/set_weight.

    The weight is read from the module at each access (a lazily loaded block swaps its parameters),
    and it is a view: writing into it writes the fused parameter.
    """

    def __init__(self, experts: nn.Module, param: str, index: int) -> None:
        self.experts = experts
        self.param = param
        self.index = index

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.experts, self.param).data[self.index]
        return w.t() if getattr(self.experts, "is_transposed", False) else w

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.experts, f"{self.param}_bias", None) if getattr(self.experts, "has_bias", False) else None
        return None if b is None else b.data[self.index]


def fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """The fused-experts modules of a block by local name; any other 3-D weight is refused, never skipped."""
    found: dict[str, nn.Module] = {}
    for name, mod in block.named_modules():
        three_d = [p for p, t in mod.named_parameters(recurse=False) if t.dim() == 3]
        if not three_d:
            continue
        first = [p for p in FUSED_INPUT if p in three_d]
        if "down_proj" not in three_d or len(first) != 1 or set(three_d) != {first[0], "down_proj"}:
            raise StadeError(
                f"{type(mod).__name__} at {name!r} stores weights {sorted(three_d)} as 3-D tensors in a layout stade "
                "does not know, so it could not prune them per expert.",
                "stade supports fused experts as gate_up_proj/up_proj and down_proj (Mixtral, Qwen-MoE, ...)",
            )
        if first[0] == "gate_up_proj" and not hasattr(mod, "_apply_gate"):
            raise StadeError(
                f"{type(mod).__name__} at {name!r} fuses gate and up projections without transformers' gating hook "
                "(_apply_gate), so stade cannot compute its down projection's inputs.",
                "upgrade transformers, or prune a model whose experts use use_experts_implementation",
            )
        found[name] = mod
    return found


def expert_layers(block: nn.Module) -> dict[str, ExpertLayer]:
    """Every expert's projections, named `<experts>.<e>.<param>` relative to the block."""
    out: dict[str, ExpertLayer] = {}
    for name, mod in fused_experts(block).items():
        first = "gate_up_proj" if hasattr(mod, "gate_up_proj") else "up_proj"
        for e in range(getattr(mod, first).shape[0]):
            for param in (first, "down_proj"):
                out[f"{name}.{e}.{param}"] = ExpertLayer(mod, param, e)
    return out


def prunable_layers(block: nn.Module) -> dict[str, Any]:
    """The linear layers and the expert slices of a block: everything the prune stage changes."""
    return {**linear_layers(block), **expert_layers(block)}


def routers(block: nn.Module) -> dict[str, torch.Tensor]:
    """Router weights (of nn.Linear or transformers' own top-k routers) by local name: they stay dense."""
    found = {name: getattr(mod, "weight", None) for name, mod in block.named_modules() if name and is_router(name)}
    return {name: w for name, w in found.items() if isinstance(w, torch.Tensor)}


def router_counts(blocks: list[nn.Module]) -> tuple[int, int]:
    """How many router layers and weights the blocks hold (reported as left dense)."""
    found = [w for block in blocks for w in routers(block).values()]
    return len(found), sum(w.numel() for w in found)


def underfed(name: str, count: int, minimum: int) -> bool:
    """Whether an expert layer saw fewer than `minimum` tokens, too few for its statistics."""
    return layer_kind(name) == "expert" and count < minimum


def kind_counts(layers: list[tuple[str, tuple[int, int], float]], router: tuple[int, int]) -> dict[str, dict[str, int]]:
    """Weights per kind of layer, and how many were pruned: (name, shape, achieved sparsity) per layer."""
    out: dict[str, dict[str, int]] = {}
    for name, shape, sparsity in layers:
        c = out.setdefault(layer_kind(name), {"layers": 0, "weights": 0, "pruned": 0})
        c["layers"] += 1
        c["weights"] += shape[0] * shape[1]
        c["pruned"] += round(sparsity * shape[0] * shape[1])
    out["router"] = {"layers": router[0], "weights": router[1], "pruned": 0}
    return out
