"""magnitude: |W|, which needs no calibration data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stade_cli.stages.stage import score

if TYPE_CHECKING:
    import torch

    from stade_cli.stats.accumulators import LayerStats


@score("magnitude", "|W|: no calibration data", paper="scores")
def magnitude(w: torch.Tensor, _st: LayerStats, _gen: torch.Generator) -> torch.Tensor:
    return w.abs()
