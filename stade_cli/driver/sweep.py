"""The prune stage's entry: several checkpoints from one loaded model and one statistics artifact.

Where each checkpoint goes (`--out` itself for one, `out/method-pattern-sparsity` for several, plus a `summary.json`
index), everything that can be refused before any weight changes, the choice of sink, and the passes of the one
block loop (loop.py): one pass for the whole sweep where each checkpoint is streamed into its shards, one pass per
checkpoint where save_pretrained must write it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stade_cli.base.artifacts import SWEEP_SUMMARY, PruneRecord, SweepRun, SweepSummary
from stade_cli.base.errors import StadeError
from stade_cli.base.files import atomic_dir, check_space, check_writable, write_json
from stade_cli.driver.checkpoint import bias_plan, finish_checkpoint, prune_record, uses_bias
from stade_cli.driver.dense import Snapshot, outside_tensors
from stade_cli.driver.loop import Run, Sink, prune_blocks, refuse_unsupported, start_runs
from stade_cli.driver.reports import PruneReport
from stade_cli.driver.sinks import Layout, SaveSink, ShardSink, plan_layout
from stade_cli.models import hf
from stade_cli.models.blocks import iterate_blocks
from stade_cli.models.experts import prunable_layers
from stade_cli.models.layers import get_weight
from stade_cli.models.loading import LoadedModel, load_model
from stade_cli.stages.config import PruneConfig
from stade_cli.stages.pattern import check_divisible
from stade_cli.stats.artifact import Statistics
from stade_cli.stats.distributed import Group

IN_MEMORY = "so it is pruned in memory (the whole model in host RAM)"


# ----------------------------------------------------------------------------------------------- outputs


def output_paths(out: Path, configs: list[PruneConfig]) -> dict[PruneConfig, Path]:
    """One config writes `out` itself; a sweep writes out/method-pattern-sparsity for each."""
    if len(configs) == 1:
        return {configs[0]: out}
    return {c: out / c.name for c in configs}


def written_paths(out: Path, configs: list[PruneConfig]) -> list[Path]:
    """Every path a run writes: each checkpoint, and a sweep's summary."""
    return [*output_paths(out, configs).values(), *([out / SWEEP_SUMMARY] if len(configs) > 1 else [])]


def check_outputs(out: Path, configs: list[PruneConfig], force: bool) -> dict[PruneConfig, Path]:
    """Refuse a sweep naming a combination twice, or an existing output without --force; returns the outputs."""
    if len(set(configs)) != len(configs):
        raise StadeError("The sweep names the same combination twice.", "remove the duplicate method/pattern/ratio")
    paths = output_paths(out, configs)
    if len(set(paths.values())) != len(paths):
        twice = next(c.name for c in configs if list(paths.values()).count(paths[c]) > 1)
        raise StadeError(f"Two runs of the sweep would both write {twice!r}.", "prune them with separate --out")
    for p in written_paths(out, configs):
        check_writable(p, force)
    return paths


def sweep_summary(results: list[tuple[Path, PruneRecord]]) -> SweepSummary:
    """summary.json of a sweep: one line per checkpoint."""
    runs = [
        SweepRun(
            path=str(p),
            method=r.method,
            pattern=r.pattern,
            sparsity=r.sparsity,
            achieved_sparsity=r.achieved_sparsity,
            sequential=r.sequential,
        )
        for p, r in results
    ]
    return SweepSummary(runs=runs)


def checkpoint_bytes(model: nn.Module, dtype: torch.dtype | None) -> int:
    """About what one checkpoint of `model` takes on disk (weights in `dtype`, else their own)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once, as safetensors stores them
    return sum(p.numel() * (dtype if dtype is not None and p.is_floating_point() else p.dtype).itemsize for p in params)


# ----------------------------------------------------------------------------------------------- checks


def check_fingerprint(stats: Statistics, model_fingerprint: str) -> None:
    if stats.manifest.model.fingerprint != model_fingerprint:
        raise StadeError(
            f"The statistics in {str(stats.path)!r} were computed on another model "
            f"({stats.manifest.model.spec!r}; weights fingerprint differs).",
            "run `stade calibrate` on this model",
        )


def check_whole(stats: Statistics) -> None:
    """A shard holds some of the run's windows: pruning from it would silently use a fraction of the data."""
    windows = stats.manifest.whole_windows
    if windows.shard is not None:
        index, count = windows.shard
        raise StadeError(
            f"The statistics in {str(stats.path)!r} are shard {index}/{count} of a calibration "
            f"(windows {windows.start}-{windows.stop - 1} of {windows.drawn}).",
            "merge every shard first: stade stats merge SHARD... --out stats/",
        )


def check_compatible(loaded: LoadedModel, stats: Statistics, configs: list[PruneConfig]) -> None:
    """Everything that can be wrong is found here, before any weight changes: another model (its fingerprint, from
    strided samples of the files where the blocks are on disk), a shard, a layer that does not match, a pattern that
    does not divide a layer, and Hessians a one-shot run needs but the statistics lack."""
    check_fingerprint(stats, loaded.fingerprint())
    check_whole(stats)
    layers = stats.layers
    for i, prefix, block in iterate_blocks(loaded.model):
        for name, mod in prunable_layers(block).items():
            full = f"{prefix}.{name}"
            shape = list(get_weight(mod).shape)
            if full not in layers or layers[full].shape != shape:
                raise StadeError(
                    f"The statistics do not match this model's layer {full} {shape} (block {i}).",
                    "run `stade calibrate` on this model",
                )
            for c in configs:
                check_divisible(c.parsed_pattern, full, shape[1])
    for c in configs:
        if "hessian" in c.needs and not c.sequential and not stats.has_hessian:
            raise StadeError(
                f"{c.label!r} needs second-moment matrices, which {str(stats.path)!r} lacks.",
                "re-run `stade calibrate --hessian`, or use --sequential",
            )


# ----------------------------------------------------------------------------------------------- pruning


def prune_model(
    loaded: LoadedModel,
    stats: Statistics,
    config: PruneConfig,
    device: torch.device,
    batch_size: int = 8,
    group: Group | None = None,
) -> PruneReport:
    """Prune `loaded.model` in place with one config, block by block on `device`, and write nothing: the library's
    one verb for a model in memory. Under torchrun (`group`, sequential only) each rank runs its own windows."""
    if loaded.lazy:
        raise StadeError(
            "prune_model prunes a model held in memory, and this one's blocks are on disk.",
            "load it whole (load_model(..., lazy=False)), or write checkpoints with prune_checkpoints",
        )
    refuse_unsupported([config], group is not None)
    check_compatible(loaded, stats, [config])
    runs = start_runs(loaded, stats, [config], device, batch_size, group)
    prune_blocks(loaded, stats, runs, device, group)
    return runs[0].report


def _layouts(
    loaded: LoadedModel, configs: list[PruneConfig], switched: dict[PruneConfig, dict[str, bool]], dtype: torch.dtype
) -> tuple[LoadedModel, dict[PruneConfig, Layout] | None]:
    """The planned shards of each checkpoint; None (and the model loaded whole) where save_pretrained would rename
    or convert its tensors, so that it must write them itself."""
    try:
        return loaded, {c: plan_layout(loaded.model, switched[c], dtype) for c in configs}
    except hf.Renamed as exc:
        whole = held_whole(loaded)
        whole.whole_reason = f"{exc}, {IN_MEMORY}"
        return whole, None


def held_whole(loaded: LoadedModel) -> LoadedModel:
    """The model held whole in memory (loaded again from its files where its blocks are on disk)."""
    if not loaded.lazy:
        return loaded
    whole = load_model(loaded.path, loaded.dtype, "cpu", loaded.cache_dir)
    whole.spec = loaded.spec
    return whole


def prune_checkpoints(
    loaded: LoadedModel,
    stats: Statistics,
    configs: list[PruneConfig],
    out: str | Path,
    device: torch.device,
    force: bool = False,
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    command: str | None = None,
    group: Group | None = None,
    save_pretrained: bool = False,
) -> list[tuple[Path, PruneRecord]]:
    """Prune and write every config's checkpoint; returns (path, stade.json) for each.

    Streamed into its shards block by block (from the files where the model was loaded lazily, else from memory),
    or by save_pretrained where it would rename the tensors (or where asked: `save_pretrained`). `dtype`: the saved
    dtype (None: the checkpoint's own); `command`: the command line, for the model cards. Under torchrun (`group`)
    every rank prunes and rank 0 alone writes; the other ranks return nothing. A model in memory is left pruned by
    the last config.
    """
    out, dtype = Path(out), dtype or loaded.own_dtype or loaded.dtype
    paths = check_outputs(out, configs, force)
    refuse_unsupported(configs, group is not None)
    check_compatible(loaded, stats, configs)
    if group is not None:  # each node reads its own files: the same command line is not enough
        group.same_everywhere(stats.fingerprint, "--stats", "each rank read its own copy: give every node the same")
    switches = bias_plan(loaded.model, stats, configs)
    switched = {c: switches if uses_bias(stats, c) else {} for c in configs}
    loaded, layouts = (held_whole(loaded), None) if save_pretrained else _layouts(loaded, configs, switched, dtype)
    lead = group is None or group.lead
    if loaded.whole_reason and lead:
        from stade_cli.base.console import err

        err.print(f"[yellow]Note:[/] {loaded.whole_reason}.", highlight=False, soft_wrap=True)
    each = checkpoint_bytes(loaded.model, dtype)
    check_space(out, sum(lay.bytes for lay in layouts.values()) if layouts else len(configs) * each)
    passes = [configs] if layouts is not None else [[c] for c in configs]
    snap = Snapshot(loaded.model) if len(passes) > 1 else None
    results = []
    with contextlib.ExitStack() as stack:
        sinks: dict[PruneConfig, Sink] = {}
        for c in configs if lead else []:
            folder = stack.enter_context(atomic_dir(paths[c], force))
            sinks[c] = (
                ShardSink(folder, layouts[c], switched[c], dtype) if layouts else SaveSink(folder, switched[c], dtype)
            )
            stack.callback(sinks[c].abort)  # closes what an error left open, before its folder is removed
        for k, p in enumerate(passes):
            if k and snap is not None:
                snap.restore()
            runs = start_runs(loaded, stats, p, device, batch_size, group, sinks)
            for sink in (r.sink for r in runs if r.sink is not None):
                sink.open(outside_tensors(loaded.model))
            prune_blocks(loaded, stats, runs, device, group)
            planned = bool(switches)
            results += [
                _finish(loaded, stats, r, paths[r.config], device, dtype, command, planned) for r in runs if lead
            ]
    if len(configs) > 1 and lead:
        write_json(out / SWEEP_SUMMARY, sweep_summary(results).dump())
    return results


def _finish(
    loaded: LoadedModel,
    stats: Statistics,
    run: Run,
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    command: str | None,
    planned_bias: bool,
) -> tuple[Path, PruneRecord]:
    """Close a run's sink (its weights and config), then write its tokenizer, stade.json and model card."""
    sink = run.sink
    assert sink is not None
    if planned_bias and run.report.bias_updated != bool(sink.switches):
        raise StadeError(f"Internal error: {run.config.name} added biases other than planned.")
    t0 = time.perf_counter()
    sink.close(loaded)
    tokenizer: Any = loaded.tokenizer
    tokenizer.save_pretrained(sink.folder)
    run.report.timings["write_s"] = round(time.perf_counter() - t0, 3)
    record = prune_record(loaded, run.report, stats, device, dtype)
    finish_checkpoint(sink.folder, record, command)
    return path, record
