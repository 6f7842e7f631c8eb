"""A sweep: several pruned checkpoints from one loaded model and one statistics artifact, in memory.

Where each checkpoint goes (`--out` itself for one, `out/method-pattern-sparsity` for several, plus a
`summary.json` index), the refusals made before any work (a combination named twice, an existing output
without --force, too little disk), and the loop that restores the dense weights between checkpoints.
`streaming.stream_sweep` is the same sweep read and written block by block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.base.files import check_space, check_writable, write_json
from stade_cli.driver.checkpoint import Snapshot, bias_plan, finish_biases, save_checkpoint
from stade_cli.driver.prune import check_compatible, prune_model
from stade_cli.models.loading import LoadedModel
from stade_cli.models.weights import WeightFiles
from stade_cli.stages.config import PruneConfig
from stade_cli.stats.artifact import Statistics
from stade_cli.stats.distributed import Group


def checkpoint_bytes(model: nn.Module, dtype: torch.dtype | None) -> int:
    """About what one checkpoint of `model` takes on disk (weights in `dtype`, else their own)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once, as safetensors stores them
    return sum(p.numel() * (dtype if dtype is not None and p.is_floating_point() else p.dtype).itemsize for p in params)


SWEEP_SUMMARY = "summary.json"  # a sweep's index of its checkpoints, in the --out folder


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
    for p in written_paths(out, configs):
        check_writable(p, force)
    return output_paths(out, configs)


def prune_sweep(
    loaded: LoadedModel,
    stats: Statistics,
    configs: list[PruneConfig],
    out: str | Path,
    device: torch.device,
    force: bool = False,
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    route_note: str | None = None,
    command: str | None = None,
    group: Group | None = None,
) -> list[tuple[Path, dict[str, Any]]]:
    """Prune once per config from one loaded model and one statistics artifact; returns (path, stade.json).

    `route_note` says why this model is pruned in memory rather than streamed (recorded in stade.json).
    `dtype`: the dtype the checkpoints are saved in; None keeps the checkpoint's own, whatever it computed in.

    Under torchrun (`group`) only rank 0 writes; the other ranks return nothing.
    """
    out = Path(out)
    dtype = dtype or loaded.own_dtype
    paths = check_outputs(out, configs, force)
    model = loaded.model
    check_compatible(model, stats, configs)
    check_space(out, len(configs) * checkpoint_bytes(model, dtype))
    switches = bias_plan(model, stats, configs)
    snap = Snapshot(model, WeightFiles.find(loaded.path, loaded.cache_dir)) if len(configs) > 1 else None
    results = []
    for idx, config in enumerate(configs):
        if idx and snap:
            snap.restore()
        report = prune_model(loaded, stats, config, device, batch_size, group=group)
        if route_note:
            report.warnings.append(route_note)
        finish_biases(model, switches if any(r.bias_updated for r in report.layers) else {})
        if group is not None and not group.lead:
            continue
        saved = save_checkpoint(loaded, report, stats, paths[config], force, device, dtype, command)
        results.append((paths[config], saved))
    if snap:
        snap.restore()
    if snap and results:
        write_json(out / SWEEP_SUMMARY, sweep_summary(results))
    return results


def sweep_summary(results: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """summary.json of a sweep: one line per checkpoint."""
    keys = ("method", "pattern", "sparsity", "achieved_sparsity", "sequential")
    return {"kind": "stade-prune-sweep", "runs": [{"path": str(p), **{k: r[k] for k in keys}} for p, r in results]}
