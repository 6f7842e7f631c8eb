"""The one block loop of prune: each block is held on the device once (moved there from memory, or read from the
checkpoint's files), pruned once per run with the dense weights put back in between, and handed to each run's sink.

Whatever the route (in memory or streamed, one process or torchrun), the sweep, the sequential protocol, the
allocation, the reconstruction and MoE experts all go through `prune_blocks`: its progress and timings are the only
ones, and what the driver cannot do is refused here (refuse_unsupported), the rest in sweep.check_compatible.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from stade_cli.base.console import progress
from stade_cli.base.errors import StadeError
from stade_cli.base.heap import release_memory
from stade_cli.driver.dense import DenseBlock, drop_added_biases, linears_with_bias
from stade_cli.driver.prune import prune_step
from stade_cli.driver.reports import PruneReport
from stade_cli.models.blocks import BlockInputs, capture_inputs, iterate_blocks, on_device
from stade_cli.models.experts import router_counts
from stade_cli.models.loading import LoadedModel
from stade_cli.models.weights import outside_on_disk
from stade_cli.stages.config import PruneConfig
from stade_cli.stages.stage import ALLOCATIONS, INPUTS
from stade_cli.stats.artifact import Statistics
from stade_cli.stats.distributed import Group, rank_windows


class Sink(Protocol):
    """Where a run's checkpoint goes (sinks.py)."""

    folder: Path
    switches: dict[str, bool]  # the config's bias switches it writes

    def open(self, outside: dict[str, torch.Tensor]) -> None: ...
    def write_block(self, prefix: str, block: nn.Module) -> None: ...
    def abort(self) -> None: ...
    def close(self, loaded: LoadedModel) -> None: ...


@dataclass
class Run:
    """One config's pass through the blocks: its report, its own block inputs and where its checkpoint goes."""

    config: PruneConfig
    report: PruneReport
    block_config: Callable[[str], PruneConfig]  # the config each block is pruned with (the allocation's ratio)
    inputs: BlockInputs | None = None  # sequential or reconstructing: the current block's inputs
    sink: Sink | None = None
    seconds: float = field(default=0.0, compare=False)  # spent in its own pruning steps
    prepared: float = field(default=0.0, compare=False)  # shared: capturing the block inputs, the allocations


def refuse_unsupported(configs: list[PruneConfig], distributed: bool) -> None:
    """What the driver cannot do yet, refused before anything is loaded."""
    if not distributed:
        return
    if any(not c.sequential for c in configs):
        raise StadeError(
            "Under torchrun, prune splits the calibration windows over the ranks: that needs --sequential.",
            "add --sequential, or run a one-shot prune as a single process (it has no windows to split)",
        )
    if any(any(INPUTS in st.needs for st in c.stages if st.kind == "reconstruct") for c in configs):
        raise StadeError(
            "--reconstruct is not supported under torchrun yet: each rank would fit its own windows.",
            "reconstruct in a single process",
        )


def calibration_warnings(stats: Statistics, config: PruneConfig) -> list[str]:
    """The statistics' warnings, for a run that prunes from them (a sequential one measures anew)."""
    if config.sequential and config.needs:
        return []
    return [f"calibration: {w}" for w in stats.manifest.warnings]


def allocate_blocks(
    loaded: LoadedModel, stats: Statistics, config: PruneConfig, report: PruneReport, device: torch.device
) -> Callable[[str], PruneConfig]:
    """The config each block is pruned with: the run's own at the allocation stage's ratio for that block."""
    stage = ALLOCATIONS.get(config.allocation)
    ratios = stage.fn(loaded, stats, config.ratio, config.parsed_pattern, config.settings_for(stage), device)
    if config.allocation == PruneConfig.allocation:  # the default: every block at the run's ratio
        return lambda _prefix: config
    report.block_sparsity = {p: round(r, 6) for p, r in ratios.items()}
    uniform = PruneConfig.allocation  # the field's default: once allocated, each block has one ratio
    configs = {p: replace(config, sparsity=r, allocation=uniform) for p, r in ratios.items()}
    return lambda prefix: configs[prefix]


def start_runs(
    loaded: LoadedModel,
    stats: Statistics,
    configs: list[PruneConfig],
    device: torch.device,
    batch_size: int,
    group: Group | None = None,
    sinks: dict[PruneConfig, Sink] | None = None,
) -> list[Run]:
    """A Run per config: its report, its allocation, and (where it runs the blocks) the captured block inputs,
    captured once and copied for each further run (each run advances its own through its own pruned blocks)."""
    t0 = time.perf_counter()
    route = "streaming" if loaded.lazy else "in-memory"
    routers = router_counts([block for _i, _p, block in iterate_blocks(loaded.model)])
    captured: BlockInputs | None = None
    runs = []
    for c in configs:
        report = PruneReport(c, route=route, routers=routers, warnings=calibration_warnings(stats, c))
        if loaded.whole_reason:
            report.warnings.append(loaded.whole_reason)
        inputs = None
        if c.needs_inputs:
            if captured is None:
                ids = rank_windows(stats.token_ids(), group)
                inputs = captured = capture_inputs(loaded.model, ids, batch_size, device)
            else:
                inputs = BlockInputs(list(captured.hidden), captured.calls)
        block_config = allocate_blocks(loaded, stats, c, report, device)
        runs.append(Run(c, report, block_config, inputs, (sinks or {}).get(c)))
    for run in runs:
        run.prepared = time.perf_counter() - t0
    return runs


def _progress_label(runs: list[Run], loaded: LoadedModel) -> str:
    label = runs[0].config.name if len(runs) == 1 else f"{len(runs)} checkpoints"
    modes = [m for m, on in (("sequential", runs[0].config.sequential), ("streaming", loaded.lazy)) if on]
    return label + (f" ({', '.join(modes)})" if modes else "")


def _heldout(runs: list[Run]) -> str:
    """The last reconstructed block's held-out loss before and after, for the progress bar."""
    for run in runs:
        done = run.report.reconstruction[-1] if run.report.reconstruction else {}
        if done.get("heldout_before") is not None:
            return f"held-out {done['heldout_before']:.2e} → {done['heldout_after']:.2e}"
    return ""


def prune_blocks(
    loaded: LoadedModel, stats: Statistics, runs: list[Run], device: torch.device, group: Group | None = None
) -> None:
    """Prune every block once per run, in place, and hand each pruned block to the run's sink.

    Between runs the block goes back to its dense weights; after the last run it holds that run's pruned weights (a
    block read from the files is then dropped).
    """
    t0 = time.perf_counter()
    blocks = list(iterate_blocks(loaded.model))
    with (
        outside_on_disk(loaded.model, loaded.files, loaded.dtype),
        progress(group is not None and not group.lead) as bar,
    ):
        task = bar.add_task(_progress_label(runs, loaded), total=len(blocks), info="")
        for i, prefix, block in blocks:
            with on_device(loaded, prefix, block, device):
                biased = linears_with_bias(block)
                dense = DenseBlock(block) if len(runs) > 1 else None
                for k, run in enumerate(runs):
                    if k and dense is not None:
                        dense.restore(block)
                    t_run = time.perf_counter()
                    config = run.block_config(prefix)
                    run.report.layers += prune_step(
                        prefix, block, stats, config, device, run.inputs, i, run.report, group
                    )
                    run.seconds += time.perf_counter() - t_run
                    if run.sink is not None:
                        run.sink.write_block(prefix, block)
                if loaded.lazy:  # back to its on-disk shape before it is dropped (the fingerprint reads it)
                    drop_added_biases(block, biased)
            release_memory()
            bar.update(task, advance=1, info=_heldout(runs))
    shared = time.perf_counter() - t0 - sum(r.seconds for r in runs)  # reading and holding the blocks
    for run in runs:
        # what this run would have taken alone: the shared capture, allocations and reading, and its own steps
        run.report.timings["prune_s"] = round(run.prepared + shared + run.seconds, 3)
        run.report.note_findings()
