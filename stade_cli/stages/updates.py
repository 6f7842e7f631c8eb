"""Update stage: what happens to a layer's weights (and bias) once its mask is chosen, one registered function each.

An update gets the original float32 weights of layers that share one input (q/k/v, gate/up: one `LayerStats`)
and their masks (True where pruned), or `None` where it chooses the masks itself (`obs`; `admm` with gradual
selection). It returns, per layer, (new weight, mask, bias change or None, damping or None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from stade_cli.stages.admm import AdmmSettings, admm_prune
from stade_cli.stages.masks import Pattern
from stade_cli.stages.scores import lookup
from stade_cli.stages.sparsegpt import sparsegpt_prune
from stade_cli.stats.accumulators import LayerStats

Pruned = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]


@dataclass(frozen=True)
class UpdateJob:
    """What an update may read besides the weights: the target ratio and pattern, and its own settings."""

    ratio: float
    pattern: Pattern
    admm: AdmmSettings = field(default_factory=AdmmSettings)


UpdateFn = Callable[[list[torch.Tensor], list[torch.Tensor] | None, LayerStats, UpdateJob], list[Pruned]]


@dataclass(frozen=True)
class Update:
    name: str
    description: str
    needs: tuple[str, ...]  # statistics read beyond the score's: ("mean",), ("hessian",)
    selects_mask: bool  # True: can choose the mask itself (then no score is needed)
    takes_mask: bool  # True: can update the weights on a mask a score chose
    fn: UpdateFn


UPDATES: dict[str, Update] = {}


def register(
    name: str, description: str, needs: tuple[str, ...] = (), selects_mask: bool = False, takes_mask: bool = True
) -> Callable[[UpdateFn], UpdateFn]:
    """Register an update under `name` (a new update is this decorator plus one function)."""

    def deco(fn: UpdateFn) -> UpdateFn:
        UPDATES[name] = Update(name, description, needs, selects_mask, takes_mask, fn)
        return fn

    return deco


def get_update(name: str) -> Update:
    return lookup(UPDATES, "update", name, "--update")


@register("none", "the kept weights stay as they are")
def no_update(
    ws: list[torch.Tensor], masks: list[torch.Tensor] | None, _st: LayerStats, _job: UpdateJob
) -> list[Pruned]:
    assert masks is not None
    return [(w.masked_fill(m, 0.0), m, None, None) for w, m in zip(ws, masks, strict=True)]


@register("bias", "b_i += sum over pruned j of W_ij mean_j, from the original weights (STADE)", ("mean",))
def bias_update(
    ws: list[torch.Tensor], masks: list[torch.Tensor] | None, st: LayerStats, _job: UpdateJob
) -> list[Pruned]:
    assert masks is not None
    mean = st.mean.to(ws[0].device, torch.float32)
    # From the ORIGINAL weights, before zeroing: the pruned weights' expected contribution.
    return [(w.masked_fill(m, 0.0), m, (w * m) @ mean, None) for w, m in zip(ws, masks, strict=True)]


@register(
    "obs",
    "SparseGPT's OBS solver: chooses the mask and updates the kept weights from H (Frantar & Alistarh 2023)",
    ("hessian",),
    selects_mask=True,
    takes_mask=False,
)
def obs_update(
    ws: list[torch.Tensor], masks: list[torch.Tensor] | None, st: LayerStats, job: UpdateJob
) -> list[Pruned]:
    assert masks is None and st.hessian is not None
    rows = [w.shape[0] for w in ws]
    # One Hessian factor and one column sweep for the stacked rows (each row's update is its own).
    res = sparsegpt_prune(torch.cat(ws), st.hessian, job.ratio, job.pattern, segments=rows)
    return [
        (w_new, mask, None, res.damping)
        for w_new, mask in zip(res.weight.split(rows), res.mask.split(rows), strict=True)
    ]


@register(
    "admm",
    "ADMM on ||(W - W')X||^2 with the mask fixed: the least-squares optimum of the kept weights; with no score, "
    "the mask is grown gradually as it goes (Boza 2024)",
    ("hessian",),
    selects_mask=True,
)
def admm_update(
    ws: list[torch.Tensor], masks: list[torch.Tensor] | None, st: LayerStats, job: UpdateJob
) -> list[Pruned]:
    assert st.hessian is not None
    rows = [w.shape[0] for w in ws]
    # Rows are independent least-squares problems on one H: solve the group stacked, one inverse for all.
    res = admm_prune(
        torch.cat(ws), st.hessian, None if masks is None else torch.cat(masks), job.admm, job.ratio, job.pattern
    )
    return [
        (w_new, mask, None, job.admm.damping)
        for w_new, mask in zip(res.weight.split(rows), res.mask.split(rows), strict=True)
    ]
