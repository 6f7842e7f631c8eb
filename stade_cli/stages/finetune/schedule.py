"""The learning-rate schedule: linear warmup, then cosine decay to zero (Loshchilov & Hutter 2017, SGDR)."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
