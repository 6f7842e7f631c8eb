"""The one collector loop: a block run on its inputs batch by batch, every prunable layer's inputs accumulated.

calibrate runs it on the dense model, block after block; a sequential prune runs it on each block's inputs from
the already-pruned blocks before it (the published protocol). Under torchrun the ranks then merge the block's
statistics, so every rank holds those of all windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.models.blocks import BlockInputs, run_block
from stade_cli.stats.collectors import LayerCollector

if TYPE_CHECKING:
    from stade_cli.stats.distributed import Group


def collect_block(
    block: nn.Module,
    inputs: BlockInputs,
    device: torch.device,
    index: int,
    hessian: bool,
    keep_outputs: bool = True,
    group: Group | None = None,
) -> tuple[LayerCollector, list[torch.Tensor]]:
    """Block `index` (on `device`) run on every batch of `inputs`: the statistics of its layers' inputs, and its
    outputs per batch where `keep_outputs` (the next block's inputs, or a reconstruction's targets)."""
    collector = LayerCollector(block, device, hessian)
    outs: list[torch.Tensor] = []
    try:
        for batch in inputs.batches():
            out = run_block(block, batch, device, index)
            collector.end_batch()
            if keep_outputs:
                outs += out
    finally:
        collector.remove()
    if group is not None:
        group.merge_collector(collector)
    _check_finite(collector, index)
    return collector, outs


def _check_finite(collector: LayerCollector, index: int) -> None:
    """Refuse statistics with a NaN or Inf where they are made, naming the layer: they would become NaN biases,
    scores and weights in a checkpoint that looks fine."""
    seen: set[int] = set()
    for name in collector.layers:
        st = collector.layer_stats(name)
        if id(st.mean) in seen:  # layers fed the same input share their statistics
            continue
        seen.add(id(st.mean))
        problem = st.problem()
        if problem is not None:
            raise StadeError(
                f"Block {index}, layer {name}: {problem}; the inputs it was fed are not finite.",
                "the model's weights hold NaN or Inf, or its activations overflow in this dtype: check the weights, "
                "or run in float32 or bfloat16 (--dtype)",
            )
