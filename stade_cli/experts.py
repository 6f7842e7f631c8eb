"""Mixture-of-experts blocks: routed experts as prunable layers, their per-expert statistics, and routers.

transformers 5 keeps the experts of one MoE layer fused, as 3-D parameters of one module
(`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) in Mixtral, Qwen2/3-MoE, ...). Each expert's
(out, in) slice is a layer of its own here: it is scored, masked and solved alone, on the statistics of
exactly the tokens the router sends to that expert, with the expert's own input (for `down_proj`, the
activated intermediate of those tokens). Routers are never pruned (method.md).

An expert that saw fewer than MIN_EXPERT_TOKENS calibration tokens has no statistics worth the name;
it is pruned by magnitude instead (FALLBACK), which needs none, and every such layer is named in stade.json.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .accumulators import BlockCollector, Hessian, LayerStats, Moments
from .errors import StadeError
from .layers import is_router, layer_kind, linear_layers, named_fed_by_norm

MIN_EXPERT_TOKENS = 16
FALLBACK = "magnitude"
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


def underfed(name: str, count: int) -> bool:
    """Whether an expert layer saw too few tokens for its statistics: then it is pruned by FALLBACK."""
    return layer_kind(name) == "expert" and count < MIN_EXPERT_TOKENS


# ----------------------------------------------------------------------------------------------- statistics


class ExpertCollector:
    """Per-expert input statistics, from a pre-hook on each fused-experts module.

    The hook sees the module's own call arguments: the tokens and the router's top-k choice. For each
    expert it takes the tokens routed to it, and its down projection's input is recomputed from the
    expert's own weights with the module's own gating (what any experts implementation computes).
    """

    def __init__(self, block: nn.Module, device: torch.device, hessian: bool) -> None:
        self.device = device
        self.want_hessian = hessian
        self.moments: dict[str, Moments] = {}
        self.hessians: dict[str, Hessian] = {}
        self.layers = expert_layers(block)
        for name, layer in self.layers.items():
            dim = int(layer.weight.shape[1])
            self.moments[name] = Moments(dim, device)
            if hessian:
                self.hessians[name] = Hessian(dim, device)
        self._handles = [
            mod.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, mod in fused_experts(block).items()
        ]

    def _hook(self, prefix: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            call = dict(zip(names, args, strict=False)) | kwargs
            x, index = call["hidden_states"], call["top_k_index"]
            x = x.reshape(-1, x.shape[-1])
            index = index.reshape(x.shape[0], -1)
            first = "gate_up_proj" if hasattr(mod, "gate_up_proj") else "up_proj"
            with torch.no_grad():
                for e in range(getattr(mod, first).shape[0]):
                    routed = x[(index == e).any(-1)]
                    if routed.shape[0] == 0:
                        continue
                    layer = self.layers[f"{prefix}.{e}.{first}"]
                    self._add(f"{prefix}.{e}.{first}", routed)
                    h = F.linear(routed, layer.weight, layer.bias)
                    gating: Callable[[torch.Tensor], torch.Tensor] = getattr(
                        mod, "_apply_gate" if first == "gate_up_proj" else "act_fn"
                    )
                    inner = gating(h)
                    self._add(f"{prefix}.{e}.down_proj", inner)

        return hook

    def _add(self, name: str, x: torch.Tensor) -> None:
        self.moments[name].update(x)
        if self.want_hessian:
            self.hessians[name].update(x)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def layer_stats(self, name: str) -> LayerStats:
        m = self.moments[name]
        h = self.hessians[name].value() if self.want_hessian else None
        return LayerStats(m.count, m.mean, m.m2, bool(named_fed_by_norm(name)), h, name)


class LayerCollector:
    """Statistics of every prunable layer of one block: BlockCollector's linear layers and the experts."""

    def __init__(self, block: nn.Module, device: torch.device, hessian: bool) -> None:
        self.linear = BlockCollector(block, linear_layers(block), device, hessian)
        self.experts = ExpertCollector(block, device, hessian)
        self.layers: dict[str, Any] = {**self.linear.layers, **self.experts.layers}

    def end_batch(self) -> None:
        self.linear.end_batch()

    def remove(self) -> None:
        self.linear.remove()
        self.experts.remove()

    def group(self, name: str) -> str:
        return name if name in self.experts.layers else self.linear.group_of[name]

    def layer_stats(self, name: str) -> LayerStats:
        if name in self.experts.layers:
            return self.experts.layer_stats(name)
        return self.linear.layer_stats(name)


def norm_feed_warnings(prefix: str, fed_by_norm: dict[str, bool]) -> list[str]:
    """Where the measured "fed by a norm" (tensor identity) contradicts method.md's layer names: stadew's
    choice of score for that layer rests on the measurement, and the user should know."""
    out = []
    for name, measured in fed_by_norm.items():
        named = named_fed_by_norm(name)
        if named is not None and named != measured:
            out.append(
                f"{prefix}.{name}: its input is {'' if measured else 'not '}a norm's output, but method.md's name "
                f"{name.rsplit('.', 1)[-1]!r} says it is {'not ' if measured else ''}norm-fed; stadew follows the "
                "measurement"
            )
    return out


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
