"""Statistics of every prunable layer of one block: the linear layers' (accumulators.BlockCollector) and each
routed expert's, from exactly the tokens the router sends to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stade_cli.models.experts import expert_layers, fused_experts
from stade_cli.models.layers import linear_layers, named_fed_by_norm
from stade_cli.stats.accumulators import BlockCollector, Hessian, LayerStats, Moments


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
    """Where the measured "fed by a norm" (tensor identity) contradicts the layer names of docs/methods.md#presets:
    stadew's choice of score for that layer rests on the measurement, and the user should know."""
    out = []
    for name, measured in fed_by_norm.items():
        named = named_fed_by_norm(name)
        if named is not None and named != measured:
            out.append(
                f"{prefix}.{name}: its input is {'' if measured else 'not '}a norm's output, but its name "
                f"{name.rsplit('.', 1)[-1]!r} says it is {'not ' if measured else ''}norm-fed; stadew follows the "
                "measurement (docs/methods.md#presets)"
            )
    return out
