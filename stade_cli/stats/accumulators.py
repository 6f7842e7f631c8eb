"""Streaming statistics of each linear layer's inputs: moments and Hessians, and the hooks that feed them.

Shared by `calibrate` (the dense pass), sequential `prune` (each block recalibrated on its pruned
predecessors' outputs) and `stats merge`; `artifact.Statistics` is what they become on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.base.finite import all_finite
from stade_cli.models.layers import is_norm


class Moments:
    """count, mean and m2 per channel, merged batch by batch with Chan's update in float64."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """x: (..., dim) token vectors of one batch."""
        xb = x.reshape(-1, x.shape[-1]).float()  # (n_b, dim)
        nb = xb.shape[0]
        mean_b = xb.mean(0)
        m2_b = (xb - mean_b).square_().sum(0)
        self.merge(nb, mean_b.double(), m2_b.double())

    def merge(self, nb: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n = self.count
        total = n + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / total)
        self.m2 += m2_b + delta.square() * (n * nb / total)
        self.count = total


class Hessian:
    """H = 2/n * sum_t x_t x_t^T, accumulated in float32 (SparseGPT's second-moment matrix)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.count = 0
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.scaled = False

    def update(self, x: torch.Tensor) -> None:
        assert not self.scaled, "a Hessian was updated after its value was taken"
        xb = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(xb.t(), xb)
        self.count += xb.shape[0]

    def value(self) -> torch.Tensor:
        """The sum scaled in place, once: a scaled copy would hold a block's largest Hessian twice."""
        if not self.scaled:
            self.sum.mul_(2.0 / max(self.count, 1))  # an expert no token reached: zeros, not NaN
            self.scaled = True
        return self.sum


@dataclass(frozen=True)
class LayerStats:
    """What the scores and updates read for one linear layer; every derived statistic follows
    docs/methods.md#input-statistics."""

    count: int
    mean: torch.Tensor  # (in,) float64
    m2: torch.Tensor  # (in,) float64
    fed_by_norm: bool
    hessian: torch.Tensor | None = None  # (in, in) float32
    group: str = ""  # layers with the same group share one input, hence these statistics

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def sumsq(self) -> torch.Tensor:
        return self.m2 + self.count * self.mean.square()

    @property
    def norm(self) -> torch.Tensor:
        return self.sumsq.sqrt()

    def problem(self, width: int | None = None) -> str | None:
        """What makes these statistics unusable, in words (None: nothing): a tensor not of the layer's input
        `width`, or a NaN or Inf, which would become NaN scores, biases and weights downstream."""
        parts = {"mean": self.mean, "m2": self.m2, "Hessian": self.hessian}
        for what, t in parts.items():
            want = None if width is None else [width] * (2 if what == "Hessian" else 1)
            if t is not None and want is not None and list(t.shape) != want:
                return f"its {what} has shape {list(t.shape)}, not {want} (the layer's inputs)"
            if t is not None and not all_finite(t):
                return f"its {what} holds NaN or Inf"
        return None


class BlockCollector:
    """Forward hooks on one block's linear layers that stream their inputs into accumulators.

    Layers that receive the very same input tensor (q/k/v; gate/up) form one group and the
    group's statistics are computed once. A layer whose input is a normalisation layer's output
    is marked `fed_by_norm` (this decides what `stadew` does with it).
    """

    def __init__(self, block: nn.Module, layers: dict[str, nn.Module], device: torch.device, hessian: bool) -> None:
        self.layers = layers
        self.device = device
        self.want_hessian = hessian
        self.group_of: dict[str, str] = {}
        self.fed_by_norm: dict[str, bool] = {}
        self.moments: dict[str, Moments] = {}
        self.hessians: dict[str, Hessian] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._norm_outputs: list[torch.Tensor] = []
        self._first_batch = True
        self._handles = [mod.register_forward_hook(self._layer_hook(name)) for name, mod in layers.items()]
        self._handles += [m.register_forward_hook(self._norm_hook) for m in block.modules() if is_norm(m)]

    def _norm_hook(self, _mod: nn.Module, _args: tuple, out: Any) -> None:
        if self._first_batch and isinstance(out, torch.Tensor):  # only needed on the first batch
            self._norm_outputs.append(out)

    def _layer_hook(self, name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0]
            if name not in self.group_of:  # first batch: find groups and norm-fed layers
                self.fed_by_norm[name] = any(x is t for t in self._norm_outputs)
                if self._last is not None and self._last[0] is x:
                    self.group_of[name] = self._last[1]
                    return
                self.group_of[name] = name
                self.moments[name] = Moments(x.shape[-1], self.device)
                if self.want_hessian:
                    self.hessians[name] = Hessian(x.shape[-1], self.device)
                self._last = (x, name)
            if self.group_of[name] != name:
                return
            self.moments[name].update(x)
            if self.want_hessian:
                self.hessians[name].update(x)

        return hook

    def end_batch(self) -> None:
        self._first_batch = False
        self._last = None
        self._norm_outputs = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.end_batch()

    def layer_stats(self, name: str) -> LayerStats:
        g = self.group_of.get(name)
        if g is None:
            raise StadeError(f"Layer {name} never ran during calibration.", "is it used by the model's forward?")
        m = self.moments[g]
        h = self.hessians[g].value() if self.want_hessian else None
        return LayerStats(m.count, m.mean, m.m2, self.fed_by_norm[name], h, g)
