"""stade_plus: W^2 * (var + mean^2), the STADE paper's STADE* ablation (its derivation without the bias update)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stade_cli.stages.stage import score

if TYPE_CHECKING:
    import torch

    from stade_cli.stats.accumulators import LayerStats


@score(
    "stade_plus",
    "W^2 * (var + mean^2): the paper's STADE* ablation, STADE without the bias update (ranks like wanda)",
    needs=("mean", "m2"),
    paper="scores",
)
def stade_plus(w: torch.Tensor, st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.square() * (st.var + st.mean.square()).to(w.device, w.dtype)
