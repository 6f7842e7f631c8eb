"""Score stage: one registered function per pruning score (the lowest scores are pruned). See method.md."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from stade_cli.base.errors import StadeError
from stade_cli.stats.accumulators import LayerStats

T = TypeVar("T")
ScoreFn = Callable[[torch.Tensor, LayerStats, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Score:
    name: str
    description: str
    needs: tuple[str, ...]  # statistics read: () for weights only, ("mean", "m2")
    fn: ScoreFn


SCORES: dict[str, Score] = {}


def register(name: str, description: str, needs: tuple[str, ...] = ()) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under `name` (a new score is this decorator plus one function)."""

    def deco(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = Score(name, description, needs, fn)
        return fn

    return deco


def lookup(registry: dict[str, T], kind: str, name: str, option: str) -> T:
    """`registry[name]` with normalised spelling; a miss names the closest entry and lists them all."""
    key = name.strip().lower().replace("-", "_")
    if key not in registry:
        close = difflib.get_close_matches(key, registry, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise StadeError(f"Unknown {kind} {name!r} ({option}).", f"{hint}available: {', '.join(registry)}")
    return registry[key]


def get_score(name: str) -> Score:
    return lookup(SCORES, "score", name, "--method")


def _f32(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=torch.float32)


@register("random", "i.i.d. uniform noise from a seeded generator (a floor to beat)")
def random_score(w: torch.Tensor, _st: LayerStats, gen: torch.Generator) -> torch.Tensor:
    # Drawn on the generator's device (the CPU), so that a seed gives the same masks on every device.
    return torch.rand(w.shape, generator=gen, device=gen.device).to(w.device)


@register("magnitude", "|W|: no calibration data")
def magnitude(w: torch.Tensor, _st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.abs()


@register("wanda", "|W| * ||x_j||: weights times input-channel norms (Sun et al. 2023)", ("mean", "m2"))
def wanda(w: torch.Tensor, st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.abs().mul_(_f32(st.norm, w))  # in place: a layer-sized temporary fewer


@register("stade", "|W| * std(x_j): the error left when the bias absorbs the pruned mean (STADE)", ("mean", "m2"))
def stade(w: torch.Tensor, st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.abs().mul_(_f32(st.std, w))


@register(
    "stade_plus",
    "W^2 * (var + mean^2): the paper's STADE* ablation, STADE without the bias update (ranks like wanda)",
    ("mean", "m2"),
)
def stade_plus(w: torch.Tensor, st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.square() * _f32(st.var + st.mean.square(), w)
