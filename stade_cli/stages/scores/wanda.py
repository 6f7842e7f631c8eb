"""wanda: |W_ij| * ||x_j||, weights times the L2 norms of their input channels (Sun et al., ICLR 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stade_cli.stages.stage import score

if TYPE_CHECKING:
    import torch

    from stade_cli.stats.accumulators import LayerStats


@score(
    "wanda", "|W| * ||x_j||: weights times input-channel norms (Sun et al. 2023)", needs=("mean", "m2"), paper="scores"
)
def wanda(w: torch.Tensor, st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.abs().mul_(st.norm.to(w.device, w.dtype))  # in place: a layer-sized temporary fewer
