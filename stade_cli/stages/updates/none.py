"""none: the kept weights stay as they are."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stade_cli.stages.stage import UpdateJob, update

if TYPE_CHECKING:
    import torch

    from stade_cli.stats.accumulators import LayerStats


NO_UPDATE = "none"  # what an update that --no-bias-update turns off becomes


@update(NO_UPDATE, "the kept weights stay as they are", paper="updates")
def no_update(ws: list[torch.Tensor], masks: list[torch.Tensor] | None, _st: LayerStats, _job: UpdateJob) -> list:
    assert masks is not None
    return [(w.masked_fill(m, 0.0), m, None, None) for w, m in zip(ws, masks, strict=True)]
