"""stade: |W_ij| * std(x_j), the error left when the bias absorbs the pruned weights' mean contribution (STADE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stade_cli.stages.stage import score

if TYPE_CHECKING:
    import torch

    from stade_cli.stats.accumulators import LayerStats


@score(
    "stade",
    "|W| * std(x_j): the error left when the bias absorbs the pruned mean (STADE)",
    needs=("mean", "m2"),
    paper="scores",
)
def stade(w: torch.Tensor, st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.abs().mul_(st.std.to(w.device, w.dtype))
