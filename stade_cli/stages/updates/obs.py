"""obs: SparseGPT's OBS solver, which chooses the mask column block by column block and updates the kept weights
from H (Frantar & Alistarh, ICML 2023). Memory: the group's Hessian, and at its factorisation one more n x n float32
matrix (the factor, inverted and refactored in place) beside the stacked weights (pruned in place), their mask and
one update's product."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stade_cli.stages.stage import UpdateJob, update

if TYPE_CHECKING:
    import torch

    from stade_cli.stats.accumulators import LayerStats


@update(
    "obs",
    "SparseGPT's OBS solver: chooses the mask and updates the kept weights from H (Frantar & Alistarh 2023)",
    needs=("hessian",),
    selects_mask=True,
    takes_mask=False,
    paper="sparsegpt-solver",
    memory=lambda w, _s: max(w.masked + 4 * w.cols**2, w.copy + 9 * w.weights + 2 * 4 * w.cols**2),
)
def obs_update(ws: list[torch.Tensor], masks: list[torch.Tensor] | None, st: LayerStats, job: UpdateJob) -> list:
    import torch

    from stade_cli.stages.solvers.sparsegpt import sparsegpt_prune

    assert masks is None and st.hessian is not None
    rows = [w.shape[0] for w in ws]
    # One Hessian factor and one column sweep for the stacked rows (each row's update is its own).
    res = sparsegpt_prune(torch.cat(ws), st.hessian, job.ratio, job.pattern, segments=rows, consume=True)
    return [
        (w_new, mask, None, res.damping)
        for w_new, mask in zip(res.weight.split(rows), res.mask.split(rows), strict=True)
    ]
