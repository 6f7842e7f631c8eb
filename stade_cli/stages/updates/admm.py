"""admm: the least-squares optimum of the kept weights by ADMM on H, on a scored mask or with the mask grown
gradually as it goes (Boža, "Fast and Effective Weight Update for Pruned Large Language Models", TMLR 2024).
The maths: solvers/admm.py; the definition: docs/methods.md#admm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stade_cli.base.errors import StadeError, at_least
from stade_cli.stages.stage import Settings, UpdateJob, setting, update

if TYPE_CHECKING:
    import torch

    from stade_cli.stats.accumulators import LayerStats


@dataclass(frozen=True)
class AdmmSettings(Settings):
    """The paper's defaults: 20 iterations, the mask grown over the first 15, rho = 1 on the rescaled problem."""

    iters: int = setting(20, "ADMM iterations.")
    rho: float = setting(1.0, "ADMM penalty rho (on H scaled to unit diagonal).")
    rho_growth: float = setting(1.0, "Multiply rho by this each iteration once the mask is fixed.")
    mask_iters: int = setting(15, "Iterations that grow the mask (--method admm).")
    damping: float = setting(0.01, "Damping added to H, as a fraction of mean(diag H).", cli=False)

    def check(self) -> None:
        at_least("--admm-iters", self.iters, 1, "the paper uses 20")
        if self.rho <= 0 or self.rho_growth < 1:
            raise StadeError(
                f"ADMM's rho {self.rho:g} must be > 0 and its growth {self.rho_growth:g} >= 1.",
                "the paper uses --admm-rho 1 with no growth",
            )
        if not 0 < self.mask_iters <= self.iters:
            raise StadeError(
                f"--admm-mask-iters {self.mask_iters} must be between 1 and --admm-iters {self.iters}.",
                "the paper grows the mask over 15 of 20 iterations",
            )
        if self.damping < 0:
            raise StadeError(f"ADMM damping {self.damping:g} is negative.", "use 0.01 (1% of mean(diag H))")


@update(
    "admm",
    "ADMM on ||(W - W')X||^2 with the mask fixed: the least-squares optimum of the kept weights; with no score, "
    "the mask is grown gradually as it goes (Boza 2024)",
    needs=("hessian",),
    settings=AdmmSettings,
    selects_mask=True,
    paper="admm",
    memory=lambda w, _s: w.masked + 6 * 4 * w.weights + 4 * 4 * w.cols**2,  # W0, target, W, U, Z; H, its inverse
)
def admm_update(ws: list[torch.Tensor], masks: list[torch.Tensor] | None, st: LayerStats, job: UpdateJob) -> list:
    import torch

    from stade_cli.stages.solvers.admm import admm_prune

    assert st.hessian is not None
    settings: AdmmSettings = job.settings
    rows = [w.shape[0] for w in ws]
    # Rows are independent least-squares problems on one H: solve the group stacked, one inverse for all.
    stacked = None if masks is None else torch.cat(masks)
    res = admm_prune(torch.cat(ws), st.hessian, stacked, settings, job.ratio, job.pattern)
    return [
        (w_new, mask, None, settings.damping)
        for w_new, mask in zip(res.weight.split(rows), res.mask.split(rows), strict=True)
    ]
