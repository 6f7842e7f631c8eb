"""The calibrate stage: stream calibration windows through the model block by block and keep statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .blocks import capture_inputs, iterate_blocks, on_device, run_block
from .console import progress
from .data import Documents, calibration_windows, check_token_ids, documents, is_token_file, load_token_file
from .errors import StadeError
from .experts import FALLBACK, MIN_EXPERT_TOKENS, LayerCollector, norm_feed_warnings, prunable_layers
from .files import SafetensorsWriter, atomic_dir, check_writable
from .layers import get_weight, in_features, layer_kind
from .models import LoadedModel, check_seqlen, config_summary, default_seqlen, vocab_size
from .stats import ARTIFACT_KIND, HESSIAN_FILE, SCHEMA_VERSION, Statistics
from .versions import library_versions

HESSIAN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CalibrationConfig:
    data: str = "c4"  # as published; offline: a local file, or sample-wiki (the demo extra)
    nsamples: int | None = 128
    seqlen: int | None = None  # None: min(model context, 2048), as published
    seed: int = 0
    hessian: bool = False
    batch_size: int = 8
    hessian_dtype: str = "float32"  # how Hessians are stored; accumulated and solved in float32 whatever this is

    def __post_init__(self) -> None:
        if self.nsamples is not None and self.nsamples < 1:
            raise StadeError(f"--nsamples must be at least 1, got {self.nsamples}.")
        if self.seqlen is not None and self.seqlen < 2:
            raise StadeError(f"--seqlen must be at least 2, got {self.seqlen}.")
        if self.batch_size < 1:
            raise StadeError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise StadeError(
                f"--hessian-dtype {self.hessian_dtype!r} is not supported.", f"use one of {', '.join(HESSIAN_DTYPES)}"
            )


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
) -> Statistics:
    """Calibrate `loaded` on `config.data` (its documents `docs`, if loaded already) and write the statistics
    artifact to `out`."""
    out = Path(out)
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
    n, length = windows.input_ids.shape
    with atomic_dir(out, force) as tmp:
        # Each block's Hessians go to disk as soon as the block is done: they need not fit in memory.
        hdtype = HESSIAN_DTYPES[config.hessian_dtype]
        hessians = SafetensorsWriter(tmp / HESSIAN_FILE, hessian_room(model, hdtype)) if config.hessian else None
        tensors, layers, warnings, t_run = collect(
            loaded, windows.input_ids, device, hessians, config.batch_size, hdtype
        )
        if hessians is not None:
            hessians.close()
        manifest = {
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
                "token_ids_sha256": windows.sha256,
                "nsamples": n,
                "seqlen": length,
                "seed": config.seed,
                "notes": windows.notes,
            },
            "statistics": ["count", "mean", "m2"] + (["hessian"] if config.hessian else []),
            **({"hessian_dtype": config.hessian_dtype, "hessian_sha256": hessians.hashes} if hessians else {}),
            "count": n * length,
            "layers": layers,
            "experts": {"min_tokens": MIN_EXPERT_TOKENS, "fallback": FALLBACK},
            "warnings": warnings,
            "timings": {"data_s": round(t_data, 3), "calibrate_s": round(t_run, 3)},
        }
        manifest = Statistics.write_files(tmp, manifest, tensors, windows.input_ids)
    return Statistics(out, manifest)


def hessian_room(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Header room for the Hessians: one per linear layer or expert at most (layers sharing an input share one)."""
    entries = {}
    for _i, prefix, block in iterate_blocks(model):
        for name, mod in prunable_layers(block).items():
            n = in_features(mod)
            entries[f"{prefix}.{name}"] = (dtype, [n, n])
    return SafetensorsWriter.room_for(entries)


def collect(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    device: torch.device,
    hessians: SafetensorsWriter | None,
    batch_size: int,
    hessian_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], list[dict], list[str], float]:
    """One dense pass, block by block: every linear layer's and expert's input statistics (Hessians into
    `hessians`), and warnings where a layer's measured norm feed contradicts its name."""
    model = loaded.model
    t0 = time.perf_counter()
    inputs = capture_inputs(model, input_ids, batch_size, device)
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict] = []
    warnings: list[str] = []
    n_blocks = len(list(iterate_blocks(model)))
    tokens = input_ids.numel()
    with progress() as bar:
        task = bar.add_task("calibrate", total=n_blocks, info="")
        for i, prefix, block in iterate_blocks(model):
            with on_device(loaded, prefix, block, device):
                collector = LayerCollector(block, device, hessians is not None)
                try:
                    outs = []
                    for batch in inputs.batches():
                        outs += run_block(block, batch, device, i)
                        collector.end_batch()
                finally:
                    collector.remove()
            inputs.hidden = outs
            warnings += norm_feed_warnings(prefix, collector.linear.fed_by_norm)
            for name, mod in collector.layers.items():
                st = collector.layer_stats(name)
                full = f"{prefix}.{name}"
                group = f"{prefix}.{collector.group(name)}"
                if f"{group}.mean" not in tensors:  # a group's statistics are stored once
                    tensors[f"{group}.mean"] = st.mean.cpu()
                    tensors[f"{group}.m2"] = st.m2.cpu()
                    if hessians is not None:
                        assert st.hessian is not None  # the collector keeps Hessians when hessians are written
                        hessians.add(group, st.hessian.to(hessian_dtype))
                shape = list(get_weight(mod).shape)  # (out, in)
                layers.append(
                    {
                        "name": full,
                        "block": i,
                        "shape": shape,
                        "fed_by_norm": st.fed_by_norm,
                        "group": group,
                        "kind": layer_kind(full),
                        "count": st.count,
                    }
                )
            rate = tokens * (i + 1) / n_blocks / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, info=f"{rate:,.0f} tok/s")
    return tensors, layers, warnings, time.perf_counter() - t0
