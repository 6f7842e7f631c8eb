"""The one collector loop: a block run on its inputs batch by batch, every prunable layer's inputs accumulated.

calibrate runs it on the dense model, block after block; a sequential prune runs it on each block's inputs from
the already-pruned blocks before it (the published protocol). Under torchrun the ranks then merge the block's
statistics, so every rank holds those of all windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

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
    return collector, outs
