"""random: i.i.d. uniform noise from a seeded generator, a floor any real score must beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stade_cli.stages.stage import score

if TYPE_CHECKING:
    import torch

    from stade_cli.stats.accumulators import LayerStats


@score("random", "i.i.d. uniform noise from a seeded generator (a floor to beat)", paper="scores")
def random_score(w: torch.Tensor, _st: LayerStats, gen: torch.Generator) -> torch.Tensor:
    import torch

    # Drawn on the generator's device (the CPU), so that a seed gives the same masks on every device.
    return torch.rand(w.shape, generator=gen, device=gen.device).to(w.device)
