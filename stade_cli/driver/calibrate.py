"""The calibrate stage: stream calibration windows through the model block by block and keep statistics."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stade_cli.base.console import progress
from stade_cli.base.dtypes import HESSIAN_DTYPES, parse_dtype
from stade_cli.base.errors import StadeError, at_least
from stade_cli.base.files import atomic_dir, check_writable
from stade_cli.base.heap import bound_heap
from stade_cli.base.shards import Part, windows_record
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
from stade_cli.models.blocks import capture_inputs, iterate_blocks, on_device, run_block
from stade_cli.models.experts import FALLBACK, MIN_EXPERT_TOKENS, prunable_layers
from stade_cli.models.layers import get_weight, in_features, layer_kind
from stade_cli.models.loading import LoadedModel, check_seqlen, config_summary, default_seqlen, vocab_size
from stade_cli.models.weights import outside_on_disk
from stade_cli.stats.artifact import ARTIFACT_KIND, HESSIAN_FILE, SCHEMA_VERSION, Statistics
from stade_cli.stats.collectors import LayerCollector, norm_feed_warnings
from stade_cli.stats.distributed import Group
from stade_cli.stats.resume import BlockLog


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
    model = loaded.model
    seqlen = config.seqlen
    if seqlen is None and not config.data.endswith(".safetensors"):
        seqlen = default_seqlen(model)
    if seqlen is not None:
        check_seqlen(model, seqlen)
    t0 = time.perf_counter()
    windows = calibration_windows(config.data, loaded.tokenizer, config.nsamples, seqlen, config.seed, cache_dir, docs)
    check_seqlen(model, windows.input_ids.shape[1])
    check_token_ids(windows.input_ids, vocab_size(model), windows.source)
    t_data = time.perf_counter() - t0
    drawn, length = windows.input_ids.shape
    shard = Part.parse(config.shard) if config.shard is not None else None
    part = Part(group.rank, group.world) if group is not None else shard or Part()
    part.check(drawn, "rank" if group is not None else "shard")
    start, stop = part.bounds(drawn)
    mine = windows.input_ids[start:stop]  # what this process computes
    kept = windows.input_ids if group is not None else mine  # what the artifact holds
    if group is not None:
        start, stop = 0, drawn
    with atomic_dir(out, force, keep=resume) if lead else contextlib.nullcontext(None) as tmp:
        log = None
        if tmp is not None:
            key = {
                "model": loaded.fingerprint(),
                "dtype": str(loaded.dtype),
                "data": windows.source,
                "source_sha256": windows.source_sha256,
                "seed": config.seed,
                "hessian": config.hessian,
                "batch_size": config.batch_size,
                "windows": [start, stop],
                "token_ids_sha256": ids_sha256(mine),  # last: any other difference is named first
            }
            log = BlockLog(tmp, key, resume)
        layers, warnings, t_run = collect(loaded, mine, device, config.hessian, config.batch_size, log, group)
        if tmp is None or log is None:
            return None
        # The committed blocks become the artifact's files; each block's Hessians go to disk one at a time.
        hdtype = parse_dtype(config.hessian_dtype, HESSIAN_DTYPES, "--hessian-dtype")
        assert hdtype is not None
        hessians = SafetensorsWriter(tmp / HESSIAN_FILE, hessian_room(model, hdtype)) if config.hessian else None
        tensors = log.finish(_no_hessians if hessians is None else lambda g, h: hessians.add(g, h.to(hdtype)))
        if hessians is not None:
            hessians.close()
        manifest: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "kind": ARTIFACT_KIND,
            "versions": library_versions(),
            "model": {
                "spec": loaded.spec,
                "path": loaded.path,
                "fingerprint": loaded.fingerprint(),
                **config_summary(model),
            },
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "device": str(device),
            "data": {
                "source": windows.source,
                "source_sha256": windows.source_sha256,
                "token_ids_sha256": ids_sha256(kept),
                "nsamples": int(kept.shape[0]),
                "seqlen": length,
                "seed": config.seed,
                "notes": windows.notes,
            },
            "windows": windows_record(drawn, windows.sha256, start, stop, shard),
            "statistics": ["count", "mean", "m2"] + (["hessian"] if config.hessian else []),
            **({"hessian_dtype": config.hessian_dtype, "hessian_sha256": hessians.hashes} if hessians else {}),
            "count": kept.numel(),
            "layers": layers,
            "experts": {"min_tokens": MIN_EXPERT_TOKENS, "fallback": FALLBACK},
            "warnings": warnings,
            "timings": {"data_s": round(t_data, 3), "calibrate_s": round(t_run, 3), "commit_s": round(log.commit_s, 3)},
        }
        if group is not None:
            ranks = [list(Part(r, group.world).bounds(drawn)) for r in range(group.world)]
            manifest["distributed"] = {"world_size": group.world, "backend": group.backend, "windows": ranks}
            manifest["timings"] |= {"collectives_s": round(group.collective_s, 3), "wait_s": round(group.wait_s, 3)}
        manifest = Statistics.write_files(tmp, manifest, tensors, kept)
    return Statistics(out, manifest)


def hessian_room(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Header room for the Hessians: one per linear layer or expert at most (layers sharing an input share one)."""
    entries = {}
    for _i, prefix, block in iterate_blocks(model):
        for name, mod in prunable_layers(block).items():
            n = in_features(mod)
            entries[f"{prefix}.{name}"] = (dtype, [n, n])
    return SafetensorsWriter.room_for(entries)


def _no_hessians(_group: str, _tensor: torch.Tensor) -> None:
    raise AssertionError("Hessians were committed by a run without --hessian")


def collect(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    device: torch.device,
    hessian: bool,
    batch_size: int,
    log: BlockLog | None,
    group: Group | None = None,
) -> tuple[list[dict], list[str], float]:
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
    layers: list[dict] = list(log.layers) if log is not None else []
    warnings: list[str] = []
    n_blocks = len(list(iterate_blocks(model)))
    tokens = input_ids.numel()
    with (
        outside_on_disk(model, loaded.files, loaded.dtype),
        progress(disable=group is not None and not group.lead) as bar,
    ):
        task = bar.add_task("calibrate", total=n_blocks, info="", completed=done)
        for i, prefix, block in iterate_blocks(model):
            if i < done:
                continue
            with on_device(loaded, prefix, block, device):
                collector = LayerCollector(block, device, hessian)
                try:
                    outs = []
                    for batch in inputs.batches():
                        outs += run_block(block, batch, device, i)
                        collector.end_batch()
                finally:
                    collector.remove()
            inputs.hidden = outs
            if group is not None:
                group.merge_collector(collector)
            warnings += norm_feed_warnings(prefix, collector.linear.fed_by_norm)
            tensors: dict[str, torch.Tensor] = {}
            block_layers = []
            for name, mod in collector.layers.items():
                st = collector.layer_stats(name)
                full = f"{prefix}.{name}"
                group_name = f"{prefix}.{collector.group(name)}"
                if f"{group_name}.mean" not in tensors:  # a group's statistics are stored once
                    tensors[f"{group_name}.mean"] = st.mean.cpu()
                    tensors[f"{group_name}.m2"] = st.m2.cpu()
                    if st.hessian is not None:
                        tensors[f"hessian:{group_name}"] = st.hessian.cpu()
                shape = list(get_weight(mod).shape)  # (out, in)
                block_layers.append(
                    {
                        "name": full,
                        "block": i,
                        "shape": shape,
                        "fed_by_norm": st.fed_by_norm,
                        "group": group_name,
                        "kind": layer_kind(full),
                        "count": st.count,
                    }
                )
            layers += block_layers
            if log is not None:
                log.commit(i, tensors, block_layers, outs)
            del tensors, collector
            st = None  # type: ignore[assignment]  # the last group's statistics hold its Hessian
            rate = tokens * (i + 1 - done) / n_blocks / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, info=f"{rate:,.0f} tok/s")
    return layers, warnings, time.perf_counter() - t0
