"""Pruning metrics: one registered function per method (the lowest scores are pruned). See method.md."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import StadeError
from .stats import LayerStats

ScoreFn = Callable[[torch.Tensor, LayerStats, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    needs: tuple[str, ...]  # statistics read: () for weights only, ("mean", "m2"), ("hessian",)
    score: ScoreFn | None  # None: the mask comes from a solver (sparsegpt)
    bias_update: Callable[[LayerStats], bool]  # whether this layer gets STADE's bias compensation

    @property
    def solver(self) -> bool:
        return self.score is None


METRICS: dict[str, Metric] = {}


def _never(_st: LayerStats) -> bool:
    return False


def register(
    name: str, description: str, needs: tuple[str, ...] = (), bias_update: Callable[[LayerStats], bool] = _never
) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under `name` (a new method is this decorator plus one function)."""

    def deco(fn: ScoreFn) -> ScoreFn:
        METRICS[name] = Metric(name, description, needs, fn, bias_update)
        return fn

    return deco


def get_metric(name: str) -> Metric:
    key = name.strip().lower().replace("-", "_")
    if key not in METRICS:
        close = difflib.get_close_matches(key, METRICS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise StadeError(f"Unknown method {name!r}.", f"{hint}available: {', '.join(METRICS)}")
    return METRICS[key]


def _f32(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=torch.float32)


@register("random", "i.i.d. uniform noise from a seeded generator (a floor to beat)")
def random_score(w: torch.Tensor, _st: LayerStats, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(w.shape, generator=gen).to(w.device)


@register("magnitude", "|W|: no calibration data")
def magnitude(w: torch.Tensor, _st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.abs()


@register("wanda", "|W| * ||x_j||: weights times input-channel norms (Sun et al. 2023)", ("mean", "m2"))
def wanda(w: torch.Tensor, st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.abs() * _f32(st.norm, w)


@register(
    "stade",
    "|W| * std(x_j) and a bias update that absorbs the pruned weights' mean contribution (STADE)",
    ("mean", "m2"),
    bias_update=lambda _st: True,
)
def stade(w: torch.Tensor, st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.abs() * _f32(st.std, w)


@register(
    "stadew",
    "stade on layers not fed by a norm (o_proj, down_proj, ...), wanda on norm-fed ones (q/k/v, gate/up, ...)",
    ("mean", "m2"),
    bias_update=lambda st: not st.fed_by_norm,
)
def stadew(w: torch.Tensor, st: LayerStats, gen: torch.Generator) -> torch.Tensor:
    return wanda(w, st, gen) if st.fed_by_norm else stade(w, st, gen)


@register(
    "stade_plus",
    "W^2 * (var + mean^2): the paper's STADE* ablation, STADE without the bias update (ranks like wanda)",
    ("mean", "m2"),
)
def stade_plus(w: torch.Tensor, st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.square() * _f32(st.var + st.mean.square(), w)


METRICS["sparsegpt"] = Metric(
    "sparsegpt",
    "SparseGPT's OBS solver: mask and update of the kept weights from the Hessian (Frantar & Alistarh 2023)",
    ("hessian",),
    None,
    _never,
)
