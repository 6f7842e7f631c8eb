"""The calibrate stage: stream calibration windows through the model block by block and keep statistics."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stade_cli.base.artifacts import DataRecord, Distributed, LayerEntry, ModelRecord, StatsManifest, Windows
from stade_cli.base.console import progress
from stade_cli.base.dtypes import HESSIAN_DTYPES, dtype_name, parse_dtype
from stade_cli.base.errors import StadeError, at_least
from stade_cli.base.files import atomic_dir, check_writable
from stade_cli.base.heap import bound_heap
from stade_cli.base.shards import Part
from stade_cli.base.tensorfiles import SafetensorsWriter
from stade_cli.base.versions import library_versions
from stade_cli.data.sources import (
    Documents,
    calibration_windows,
    check_token_ids,
    documents,
    ids_sha256,
    is_token_file,
    load_token_file,
)
from stade_cli.models.blocks import capture_inputs, iterate_blocks, on_device
from stade_cli.models.experts import prunable_layers
from stade_cli.models.layers import get_weight, in_features, layer_kind
from stade_cli.models.loading import LoadedModel, check_seqlen, config_summary, default_seqlen, vocab_size
from stade_cli.models.weights import outside_on_disk
from stade_cli.stages.presets import FALLBACK, MIN_EXPERT_TOKENS
from stade_cli.stats.artifact import HESSIAN_FILE, Statistics
from stade_cli.stats.collect import collect_block
from stade_cli.stats.collectors import LayerCollector, norm_feed_warnings
from stade_cli.stats.distributed import Group
from stade_cli.stats.resume import HESSIAN_PREFIX, SCRATCH, BlockLog


@dataclass(frozen=True)
class CalibrationConfig:
    data: str = "c4"  # as published; offline: a local file, or sample-wiki (the demo extra)
    nsamples: int | None = 128
    seqlen: int | None = None  # None: min(model context, 2048), as published
    seed: int = 0
    hessian: bool = False
    batch_size: int = 8
    hessian_dtype: str = "float32"  # how Hessians are stored; accumulated and solved in float32 whatever this is
    shard: str | None = None  # "I/N": only part I of N of the drawn windows (a job array's task)

    def __post_init__(self) -> None:
        if self.shard is not None:
            Part.parse(self.shard)
        at_least("--nsamples", self.nsamples, 1)
        at_least("--seqlen", self.seqlen, 2)
        at_least("--batch-size", self.batch_size, 1)
        parse_dtype(self.hessian_dtype, HESSIAN_DTYPES, "--hessian-dtype")


def load_data(config: CalibrationConfig, cache_dir: str | None = None) -> Documents | None:
    """The calibration text, loaded before the model: an unreachable or missing source fails in seconds,
    not after a model download. None for a token-id file (checked here, read again by `calibrate`)."""
    if is_token_file(config.data):
        load_token_file(Path(config.data).expanduser(), "[n, seqlen]")
        return None
    return documents(config.data, "train", cache_dir)


def draw_windows(loaded: LoadedModel, config: CalibrationConfig, cache_dir: str | None, docs: Documents | None) -> Any:
    """The calibration windows, as published (random windows of random documents, seeded) or from a token-id file,
    checked against the model's context and vocabulary."""
    model = loaded.model
    seqlen = config.seqlen
    if seqlen is None and not config.data.endswith(".safetensors"):
        seqlen = default_seqlen(model)
    if seqlen is not None:
        check_seqlen(model, seqlen)
    windows = calibration_windows(config.data, loaded.tokenizer, config.nsamples, seqlen, config.seed, cache_dir, docs)
    check_seqlen(model, windows.input_ids.shape[1])
    check_token_ids(windows.input_ids, vocab_size(model), windows.source)
    return windows


def calibrate(
    loaded: LoadedModel,
    config: CalibrationConfig,
    out: str | Path,
    device: torch.device,
    force: bool = False,
    cache_dir: str | None = None,
    docs: Documents | None = None,
    resume: bool = False,
    group: Group | None = None,
) -> Statistics | None:
    """Calibrate `loaded` on `config.data` (its documents `docs`, if loaded already) and write the statistics
    artifact to `out`.

    `config.shard` computes one part of the windows; `group` (under torchrun) splits them over the ranks,
    which merge their statistics after each block; rank 0 alone writes, and the others return None.
    With `resume`, the blocks committed by a killed run in `out`.incomplete are taken as they are.
    """
    out = Path(out)
    lead = group is None or group.lead
    if group is not None and config.shard is not None:
        raise StadeError("--shard cannot be combined with torchrun: the ranks split the windows themselves.")
    if group is not None and resume:
        raise StadeError("--resume is not supported under torchrun yet.", "resume with a single process")
    if lead:
        check_writable(out, force)
    t0 = time.perf_counter()
    windows = draw_windows(loaded, config, cache_dir, docs)
    if group is not None:  # the same command line is not enough: each node reads its own --data file
        why = "each rank read its own --data: give every node the same file"
        group.same_everywhere(ids_sha256(windows.input_ids), "the calibration windows", why)
    t_data = time.perf_counter() - t0
    drawn = windows.input_ids.shape[0]
    shard = Part.parse(config.shard) if config.shard is not None else None
    part = group.part if group is not None else shard or Part()
    start, stop = part.take(drawn, "rank" if group is not None else "shard")
    mine = windows.input_ids[start:stop]  # what this process computes
    if group is not None:  # the artifact holds every rank's windows
        start, stop = 0, drawn
    with atomic_dir(out, force, keep=resume, scratch=SCRATCH) if lead else contextlib.nullcontext(None) as tmp:
        log = None if tmp is None else _block_log(tmp, loaded, config, windows, (start, stop), mine, resume)
        try:
            layers, warnings, t_run = collect(loaded, mine, device, config.hessian, config.batch_size, log, group)
        except BaseException:
            if log is not None:
                log.abort()
            raise
        if tmp is None or log is None:
            return None
        tensors = log.finish()  # the committed blocks become the artifact's files
        kept = windows.input_ids[start:stop]
        manifest = _manifest(loaded, config, device, windows, kept, (start, stop, shard), layers, warnings, group)
        manifest.timings |= {
            "data_s": round(t_data, 3),
            "calibrate_s": round(t_run, 3),
            "commit_s": round(log.commit_s, 3),
        }
        if log.hessians is not None:
            manifest.hessian_dtype, manifest.hessian_sha256 = config.hessian_dtype, log.hessians.hashes
        manifest = Statistics.write_files(tmp, manifest, tensors, kept)
    return Statistics(out, manifest)


def _block_log(
    tmp: Path,
    loaded: LoadedModel,
    config: CalibrationConfig,
    windows: Any,
    bounds: tuple[int, int],
    mine: torch.Tensor,
    resume: bool,
) -> BlockLog:
    """The run's commit log, keyed by everything that must match for a resume, and its Hessians file."""
    key = {
        "model": loaded.fingerprint(),
        "dtype": str(loaded.dtype),
        "data": windows.source,
        "source_sha256": windows.source_sha256,
        "seed": config.seed,
        "hessian": config.hessian,
        "hessian_dtype": config.hessian_dtype if config.hessian else None,
        "batch_size": config.batch_size,
        "windows": list(bounds),
        "token_ids_sha256": ids_sha256(mine),  # last: any other difference is named first
    }
    hdtype = parse_dtype(config.hessian_dtype, HESSIAN_DTYPES, "--hessian-dtype")
    assert hdtype is not None
    hessians = (tmp / HESSIAN_FILE, hessian_room(loaded.model, hdtype), hdtype) if config.hessian else None
    return BlockLog(tmp, key, resume, hessians)


def _manifest(
    loaded: LoadedModel,
    config: CalibrationConfig,
    device: torch.device,
    windows: Any,
    kept: torch.Tensor,
    part: tuple[int, int, Part | None],
    layers: list[LayerEntry],
    warnings: list[str],
    group: Group | None,
) -> StatsManifest:
    """The statistics manifest, but for its files (Statistics.write_files adds them)."""
    start, stop, shard = part
    drawn = windows.input_ids.shape[0]
    manifest = StatsManifest(
        versions=library_versions(),
        model=ModelRecord(
            spec=loaded.spec, path=loaded.path, fingerprint=loaded.fingerprint(), **config_summary(loaded.model)
        ),
        dtype=dtype_name(loaded.dtype),
        device=str(device),
        data=DataRecord(
            source=windows.source,
            source_sha256=windows.source_sha256,
            token_ids_sha256=ids_sha256(kept),
            nsamples=int(kept.shape[0]),
            seqlen=int(kept.shape[1]),
            seed=config.seed,
            notes=windows.notes,
        ),
        windows=Windows(
            drawn=drawn,
            drawn_sha256=windows.sha256,
            start=start,
            stop=stop,
            shard=[shard.index, shard.count] if shard else None,
        ),
        statistics=["count", "mean", "m2"] + (["hessian"] if config.hessian else []),
        count=kept.numel(),
        layers=layers,
        experts={"min_tokens": MIN_EXPERT_TOKENS, "fallback": FALLBACK},
        warnings=warnings,
        files={},
    )
    if group is not None:
        ranks = group.part.all_bounds(drawn)
        manifest.distributed = Distributed(world_size=group.world, backend=group.backend, windows=ranks)
        manifest.timings |= {"collectives_s": round(group.collective_s, 3), "wait_s": round(group.wait_s, 3)}
    return manifest


def hessian_room(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Header room for the Hessians: one per linear layer or expert at most (layers sharing an input share one)."""
    entries = {}
    for _i, prefix, block in iterate_blocks(model):
        for name, mod in prunable_layers(block).items():
            n = in_features(mod)
            entries[f"{prefix}.{name}"] = (dtype, [n, n])
    return SafetensorsWriter.room_for(entries)


def _block_record(
    prefix: str, index: int, collector: LayerCollector
) -> tuple[dict[str, torch.Tensor], list[LayerEntry]]:
    """A block's statistics by group (each group's once; its Hessian as `hessian:<group>`) and its manifest entries."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for name, mod in collector.layers.items():
        st = collector.layer_stats(name)
        full, group = f"{prefix}.{name}", f"{prefix}.{collector.group(name)}"
        if f"{group}.mean" not in tensors:
            tensors[f"{group}.mean"], tensors[f"{group}.m2"] = st.mean.cpu(), st.m2.cpu()
            if st.hessian is not None:
                tensors[f"{HESSIAN_PREFIX}{group}"] = st.hessian.cpu()
        shape = list(get_weight(mod).shape)  # (out, in)
        kind = layer_kind(full)
        layers.append(
            LayerEntry(
                name=full, block=index, shape=shape, fed_by_norm=st.fed_by_norm, group=group, kind=kind, count=st.count
            )
        )
    return tensors, layers


def collect(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    device: torch.device,
    hessian: bool,
    batch_size: int,
    log: BlockLog | None,
    group: Group | None = None,
) -> tuple[list[LayerEntry], list[str], float]:
    """One dense pass, block by block: every linear layer's and expert's input statistics, committed block by
    block to `log`, and warnings where a layer's measured norm feed contradicts its name.

    Under torchrun (`group`), each rank runs its own windows and the ranks merge each block's statistics;
    rank 0 (the one with a `log`) commits them. Blocks that `log` already holds are skipped.
    """
    model = loaded.model
    bound_heap()
    t0 = time.perf_counter()
    inputs = capture_inputs(model, input_ids, batch_size, device)
    done = log.done if log is not None else 0
    if log is not None and done:
        hidden = log.hidden(inputs.hidden[0].device)
        assert hidden is not None and len(hidden) == len(inputs.hidden)
        inputs.hidden = hidden
    layers: list[LayerEntry] = list(log.layers) if log is not None else []
    warnings: list[str] = []
    n_blocks = len(list(iterate_blocks(model)))
    lead = group is None or group.lead
    with outside_on_disk(model, loaded.files, loaded.dtype), progress(not lead) as bar:
        task = bar.add_task("calibrate", total=n_blocks, info="", completed=done)
        for i, prefix, block in iterate_blocks(model):
            if i < done:
                continue
            with on_device(loaded, prefix, block, device):
                collector, inputs.hidden = collect_block(block, inputs, device, i, hessian, group=group)
            warnings += norm_feed_warnings(prefix, collector.linear.fed_by_norm)
            tensors, block_layers = _block_record(prefix, i, collector)
            layers += block_layers
            if log is not None:
                log.commit(i, tensors, block_layers, inputs.hidden)
            del tensors, collector  # the last group's statistics hold its Hessian
            rate = input_ids.numel() * (i + 1 - done) / n_blocks / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, info=f"{rate:,.0f} tok/s")
    return layers, warnings, time.perf_counter() - t0
