"""Masked low-rank adapters (LoRA, Hu et al. 2021, "LoRA: Low-rank adaptation of large language models"), whose
update keeps the pruned weights at zero: the layer computes x (W + s (B A) ⊙ K)^T + b, with W the pruned weight
(frozen), K its keep mask (1 where a weight is kept), A (r, in) and B (out, r) the adapters and s = alpha / r.

Merging writes W + s (B A) ⊙ K into the weight: the pruned weights stay exactly zero, so the merged checkpoint has
the same sparse pattern as the one fine-tuned (a plain LoRA merge, W + s B A, would fill every zero).

The masked update does not factor through the rank, so the layer needs its full-size W + s (B A) ⊙ K; autograd would
keep that for the backward pass of every layer at once (a second copy of the model's weights). _MaskedLinear keeps
only the layer's input and makes it again in the backward pass, one layer at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _update(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """s (B A) ⊙ K in `dtype`."""
    return ((b @ a) * scale).to(dtype) * keep


def _effective(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, scale: float
) -> torch.Tensor:
    """W + s (B A) ⊙ K in W's dtype."""
    return weight + _update(a, b, keep, scale, weight.dtype)


class _MaskedLinear(torch.autograd.Function):
    """y = x (W + s (B A) ⊙ K)^T + b, its gradients for x, A and B (W and b are frozen)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight, a, b, keep)
        ctx.scale = scale
        return nn.functional.linear(x, _effective(weight, a, b, keep, scale), bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, keep = ctx.saved_tensors
        assert not ctx.needs_input_grad[1] and not ctx.needs_input_grad[2], "W and its bias are frozen"
        w = _effective(weight, a, b, keep, ctx.scale)
        grad_x = (grad.to(w.dtype) @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
        del w
        flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_update = (flat_grad.t().float() @ flat_x.float()) * keep * ctx.scale  # d loss / d (B A), masked
        return grad_x, None, None, b.t() @ grad_update, grad_update @ a.t(), None, None


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
        return _update(self.lora_a, self.lora_b, self.keep, self.scale, self.base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _MaskedLinear.apply(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, self.keep, self.scale)
        return out

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
