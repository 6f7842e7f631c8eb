"""The mask held exactly while the kept weights train (Kurtic et al. 2023, "Sparse fine-tuning for inference
acceleration of large language models"; the recovery step of Frantar & Alistarh 2023 and Sun et al. 2023).

The mask is the checkpoint's own zeros in its pruned layers. A pruned weight's gradient is zeroed before every
optimizer step and the weight itself is zeroed again after it: AdamW's moments of a pruned weight stay zero, and
weight decay, rounding or an optimizer that moves zero weights cannot bring one back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from stade_cli.stages.pattern import Pattern


@dataclass
class HeldLayer:
    """One pruned layer: its weight parameter and `keep`, True where the weight is not pruned."""

    name: str
    weight: torch.Tensor
    keep: torch.Tensor


def mask_grads(layers: Iterable[HeldLayer]) -> None:
    """Zero the gradient of every pruned weight (before the optimizer step)."""
    for layer in layers:
        grad = layer.weight.grad
        if grad is not None:
            grad.mul_(layer.keep.to(grad.dtype))


@torch.no_grad()
def reapply(layers: Iterable[HeldLayer]) -> None:
    """Zero every pruned weight again (after the optimizer step)."""
    for layer in layers:
        layer.weight.mul_(layer.keep.to(layer.weight.dtype))


def kept_nonzero(weight: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` cast to `dtype` with the same zeros as `keep` says: a kept weight that trains to zero, or rounds to
    zero in a narrower dtype, becomes the smallest normal number of its sign (it would read as pruned)."""
    out = (weight * keep.to(weight.dtype)).to(dtype)
    lost = keep & (out == 0)
    if bool(lost.any()):
        tiny = torch.finfo(dtype).tiny
        sign = torch.where(weight[lost] < 0, -1.0, 1.0).to(dtype)
        out[lost] = sign * tiny
    return out


def pattern_break(zeros: torch.Tensor, pattern: Pattern) -> str | None:
    """Where the zeros (out, in) break an N:M pattern (a group with fewer than N zeros), in words; None if held."""
    if not pattern.structured:
        return None
    rows, cols = zeros.shape
    if cols % pattern.m:
        return f"{cols} input columns are not a multiple of M={pattern.m}"
    counts = zeros.reshape(rows, cols // pattern.m, pattern.m).sum(-1)
    bad = (counts < pattern.n).nonzero()
    if bad.numel() == 0:
        return None
    row, group = (int(v) for v in bad[0])
    first = group * pattern.m
    return f"row {row}, columns {first}..{first + pattern.m - 1} hold {int(counts[row, group])} zeros"


def zeros_differ(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Where two zero masks of one layer differ, in words; None where they are the same."""
    if got.shape != want.shape:
        return f"shape {list(got.shape)}, not {list(want.shape)}"
    diff = (got != want).nonzero()
    if diff.numel() == 0:
        return None
    row, col = (int(v) for v in diff[0])
    what = "a new zero" if bool(got[row, col]) else "a pruned weight came back"
    return f"{what} at [{row}, {col}] ({diff.shape[0]} entries differ)"
