"""Masked low-rank adapters (LoRA, Hu et al. 2021, "LoRA: Low-rank adaptation of large language models"), whose
update keeps the pruned weights at zero: the layer computes x (W + s (B A) ⊙ K)^T + b, with W the pruned weight
(frozen), K its keep mask (1 where a weight is kept), A (r, in) and B (out, r) the adapters and s = alpha / r.

Merging writes W + s (B A) ⊙ K into the weight: the pruned weights stay exactly zero, so the merged checkpoint has
the same sparse pattern as the one fine-tuned (a plain LoRA merge, W + s B A, would fill every zero).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MaskedLoRA(nn.Module):
    """An nn.Linear whose update is low-rank and masked; `merged()` gives the plain nn.Linear back."""

    def __init__(self, base: nn.Linear, keep: torch.Tensor, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        out_features, in_features = base.weight.shape
        self.keep: torch.Tensor
        # bool: a float mask would take as much memory as the weights (the product with it is in their dtype)
        self.register_buffer("keep", keep.to(base.weight.device, torch.bool), persistent=False)
        self.scale = (alpha if alpha is not None else float(rank)) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as Hu et al.: A random, B zero, so the start is W

    def delta(self) -> torch.Tensor:
        """s (B A) ⊙ K, in the base weight's dtype."""
        return ((self.lora_b @ self.lora_a) * self.scale).to(self.base.weight.dtype) * self.keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.base.weight + self.delta(), self.base.bias)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the masked update merged into its weight."""
        self.base.weight.add_(self.delta())
        self.base.weight.mul_(self.keep)  # exact zeros where pruned, whatever the rounding
        return self.base


def attach(model: nn.Module, keeps: dict[str, torch.Tensor], rank: int, alpha: float | None = None) -> None:
    """Replace each pruned nn.Linear named in `keeps` by its MaskedLoRA; every other parameter is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, keep in keeps.items():
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, MaskedLoRA(getattr(holder, child), keep, rank, alpha))


def merge(model: nn.Module) -> None:
    """Put every MaskedLoRA's merged nn.Linear back in its place."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedLoRA)]
    for name, mod in found:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, mod.merged())
