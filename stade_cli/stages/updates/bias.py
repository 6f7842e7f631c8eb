"""bias: STADE's bias compensation, b_i += sum over pruned j of W_ij mean_j, from the original weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stade_cli.stages.stage import UpdateJob, update

if TYPE_CHECKING:
    import torch

    from stade_cli.stats.accumulators import LayerStats


@update(
    "bias",
    "b_i += sum over pruned j of W_ij mean_j, from the original weights (STADE)",
    needs=("mean",),
    adds_bias=True,
    paper="bias-compensation",
)
def bias_update(ws: list[torch.Tensor], masks: list[torch.Tensor] | None, st: LayerStats, _job: UpdateJob) -> list:
    import torch

    assert masks is not None
    mean = st.mean.to(ws[0].device, torch.float32)
    # From the ORIGINAL weights, before zeroing: the pruned weights' expected contribution.
    return [(w.masked_fill(m, 0.0), m, (w * m) @ mean, None) for w, m in zip(ws, masks, strict=True)]
