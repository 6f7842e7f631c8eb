"""The prune stage: score, mask and (for stade/sparsegpt) update every block's linear layers, then save.

One-shot (default) reads the cached dense statistics; `sequential` recalibrates block k on the
outputs of the already-pruned blocks 0..k-1, as the published code does.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from stade_cli.base.console import progress
from stade_cli.base.errors import StadeError
from stade_cli.base.shards import windows_of
from stade_cli.models.blocks import BlockInputs, capture_inputs, iterate_blocks, on_device, run_block
from stade_cli.models.experts import FALLBACK, MIN_EXPERT_TOKENS, prunable_layers, router_counts, underfed
from stade_cli.models.fingerprint import fingerprint
from stade_cli.models.layers import bias_param, get_weight, set_weight, weight_param
from stade_cli.models.loading import LoadedModel
from stade_cli.stages.allocation import get_allocation
from stade_cli.stages.config import LayerReport, PruneConfig, PruneReport
from stade_cli.stages.masks import check_divisible, mask_from_scores
from stade_cli.stages.reconstruct import get_reconstruction
from stade_cli.stages.scores import get_score
from stade_cli.stages.updates import Pruned, UpdateJob, get_update
from stade_cli.stats.accumulators import LayerStats
from stade_cli.stats.artifact import Statistics
from stade_cli.stats.collectors import LayerCollector, norm_feed_warnings
from stade_cli.stats.distributed import Group, rank_windows, tensor_digest

# ----------------------------------------------------------------------------------------------- one layer


def output_error(w: torch.Tensor, w_new: torch.Tensor, db: torch.Tensor | None, st: LayerStats) -> tuple[float, float]:
    """Estimated squared output error of the change per token, and the dense output energy.

    With H (= 2 E[x xᵀ]) at hand, exactly: error = tr(dW E[xxᵀ] dWᵀ) + 2 db·(dW mean) + |db|², which an update
    that uses the inputs' correlations (obs, admm) is judged by. Otherwise the diagonal approximation
    error_i = sum_j dW_ij^2 var_j + (sum_j dW_ij mean_j + db_i)^2, energy = sum_ij W_ij^2 E[x_j^2].
    """
    mean = st.mean.to(w.device, torch.float32)
    delta = w_new - w
    if st.hessian is not None:
        second = st.hessian.to(w.device, torch.float32) / 2  # E[x xᵀ]
        err = ((delta @ second) * delta).double().sum()
        if db is not None:
            err = err + 2 * (db.double() * (delta @ mean).double()).sum() + db.double().square().sum()
        energy = ((w @ second) * w).double().sum()
        return float(err), float(energy)
    var = st.var.to(w.device, torch.float32)
    residual = delta @ mean + (db if db is not None else 0.0)
    err = (delta.square() @ var).double().sum() + residual.double().square().sum()
    energy = (w.square() @ (var + mean.square())).double().sum()
    return float(err), float(energy)


def prune_group(ws: list[torch.Tensor], st: LayerStats, config: PruneConfig, names: list[str]) -> list[Pruned]:
    """(new weight, mask, bias change or None, damping) for layers that share one input and so `st`.

    `ws` are the original (out, in) float32 weights. The score stage chooses each layer's mask (unless the
    update chooses it itself), then the update stage changes the kept weights and biases.
    """
    score_name, update_name = config.stages(st)
    masks = None
    if score_name is not None:
        score = get_score(score_name)
        masks = []
        for w, name in zip(ws, names, strict=True):
            scores = score.fn(w, st, _layer_generator(config.seed, name))
            if scores.isnan().any():
                raise StadeError(
                    f"Layer {name} has NaN {score_name} scores: its weights or calibration statistics contain NaN.",
                    "check the model's weights, and calibrate in float32 (--dtype float32) if float16 overflowed",
                )
            masks.append(mask_from_scores(scores, config.ratio, config.parsed_pattern))
    job = UpdateJob(config.ratio, config.parsed_pattern, config.admm)
    return get_update(update_name).fn(ws, masks, st, job)


def prune_weight(w: torch.Tensor, st: LayerStats, config: PruneConfig, name: str = "layer") -> Pruned:
    """`prune_group` for one layer."""
    return prune_group([w], st, config, [name])[0]


def _layer_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def prune_block(
    prefix: str, block: nn.Module, stats_of: Any, config: PruneConfig, device: torch.device
) -> list[LayerReport]:
    """Prune every linear layer and expert of one block in place (the block is on `device`).

    An expert that too few calibration tokens reached is pruned by experts.FALLBACK instead.
    """
    groups: list[tuple[LayerStats, list[tuple[str, Any]]]] = []  # consecutive layers sharing an input
    for name, mod in prunable_layers(block).items():
        full = f"{prefix}.{name}"
        st: LayerStats = stats_of(name, full)
        if groups and st.group and groups[-1][0].group == st.group:
            groups[-1][1].append((full, mod))
        else:
            groups.append((st, [(full, mod)]))
    reports = []
    for st, members in groups:
        ws = [get_weight(mod).detach().to(torch.float32) for _, mod in members]
        names = [full for full, _ in members]
        fallback = FALLBACK if config.needs and underfed(names[0], st.count) else None
        group_config = replace(config, method=fallback, update=None) if fallback else config
        for (full, mod), w, (w_new, mask, db, damping) in zip(
            members, ws, prune_group(ws, st, group_config, names), strict=True
        ):
            err, energy = output_error(w, w_new, db, st)
            set_weight(mod, w_new)
            if db is not None:
                _add_bias(mod, db)
            reports.append(
                LayerReport(
                    full,
                    (w.shape[0], w.shape[1]),
                    float(mask.float().mean()),
                    err / max(energy, 1e-30),
                    db is not None,
                    damping,
                    fallback,
                )
            )
    return reports


def _add_bias(mod: nn.Module, db: torch.Tensor) -> None:
    bias = bias_param(mod)
    if bias is None:
        weight = weight_param(mod)
        bias = mod.bias = nn.Parameter(torch.zeros(db.shape[0], dtype=weight.dtype, device=weight.device))
    bias.data.add_(db.to(bias.dtype))


# ----------------------------------------------------------------------------------------------- checks


def check_fingerprint(stats: Statistics, model_fingerprint: str) -> None:
    if stats.manifest["model"]["fingerprint"] != model_fingerprint:
        raise StadeError(
            f"The statistics in {str(stats.path)!r} were computed on another model "
            f"({stats.manifest['model']['spec']!r}; weights fingerprint differs).",
            "run `stade calibrate` on this model",
        )


def check_whole(stats: Statistics) -> None:
    """A shard holds some of the run's windows: pruning from it would silently use a fraction of the data."""
    windows = windows_of(stats.manifest)
    if windows["shard"] is not None:
        index, count = windows["shard"]
        raise StadeError(
            f"The statistics in {str(stats.path)!r} are shard {index}/{count} of a calibration "
            f"(windows {windows['start']}-{windows['stop'] - 1} of {windows['drawn']}).",
            "merge every shard first: stade stats merge SHARD... --out stats/",
        )


def check_compatible(
    model: nn.Module, stats: Statistics, configs: list[PruneConfig], weights_in_memory: bool = True
) -> None:
    """Everything that can be wrong is found here, before any weight changes.

    A model whose blocks stay on disk (streaming) has its fingerprint checked by the caller once
    every block has been read, before any output is committed.
    """
    if weights_in_memory:
        check_fingerprint(stats, fingerprint(model))
    check_whole(stats)
    layers = stats.layers
    for i, prefix, block in iterate_blocks(model):
        for name, mod in prunable_layers(block).items():
            full = f"{prefix}.{name}"
            shape = list(get_weight(mod).shape)
            if full not in layers or layers[full]["shape"] != shape:
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


# ----------------------------------------------------------------------------------------------- driving


def _sequential_stats(collector: LayerCollector) -> Any:
    return lambda name, _full: collector.layer_stats(name)


def _one_shot_stats(stats: Statistics, config: PruneConfig, device: torch.device) -> Any:
    hessian = "hessian" in config.needs
    return lambda _name, full: stats.layer(full, hessian=hessian, device=device)


def prune_step(
    prefix: str,
    block: nn.Module,
    stats: Statistics,
    config: PruneConfig,
    device: torch.device,
    inputs: BlockInputs | None,
    index: int,
    report: PruneReport | None = None,
    group: Group | None = None,
) -> list[LayerReport]:
    """Prune block `index` (already on `device`). With `inputs` (sequential, or reconstructing): recalibrate on
    them (sequential), reconstruct against the dense block's outputs on them (recorded in `report`), then
    advance them to the next block's inputs: the pruned block's outputs (sequential), else the dense ones.

    Under torchrun (`group`), `inputs` are this rank's windows: the ranks merge the block's statistics
    before it is pruned, and a hash of the pruned block shows that every rank holds the same weights."""
    if inputs is None:
        return prune_block(prefix, block, _one_shot_stats(stats, config, device), config, device)
    recon = get_reconstruction(config.reconstruct)
    dense: list[torch.Tensor] = []  # the dense block's outputs on its inputs: the reconstruction's targets
    if config.sequential and config.needs:
        collector = LayerCollector(block, device, "hessian" in config.needs)
        try:
            for batch in inputs.batches():
                out = run_block(block, batch, device, index)
                collector.end_batch()
                if recon.needs_inputs:
                    dense += out
        finally:
            collector.remove()
        if report is not None:  # a measured norm feed that contradicts a layer's name
            report.warnings += norm_feed_warnings(prefix, collector.linear.fed_by_norm)
        if group is not None:
            group.merge_collector(collector)
        reports = prune_block(prefix, block, _sequential_stats(collector), config, device)
        if group is not None:
            group.same_everywhere(tensor_digest(list(block.state_dict().values())), f"the pruned weights of {prefix}")
    else:
        if recon.needs_inputs:
            dense = run_block(block, inputs, device, index)
        reports = prune_block(prefix, block, _one_shot_stats(stats, config, device), config, device)
    if recon.needs_inputs and report is not None:
        seed = config.seed * 1_000_003 + len(report.reconstruction)  # one held-out split per block
        done = recon.run(block, inputs.of_block(index), dense, device, config.reconstruct_steps, seed) or {}
        report.reconstruction.append({"block": prefix, **done})
    # Sequential: the pruned block feeds the next one. One-shot (reconstructing): the dense outputs do.
    inputs.hidden = run_block(block, inputs, device, index) if config.sequential else dense
    return reports


def allocate_blocks(
    loaded: LoadedModel, stats: Statistics, config: PruneConfig, report: PruneReport, device: torch.device
) -> Any:
    """The config each block is pruned with: the run's own, or with the block's ratio from the allocation stage."""
    if config.allocation == "uniform":
        return lambda _prefix: config
    allocate = get_allocation(config.allocation).fn
    ratios = allocate(loaded, stats, config.ratio, config.parsed_pattern, config.owl, device)
    report.block_sparsity = {p: round(r, 6) for p, r in ratios.items()}
    configs = {p: replace(config, sparsity=r, allocation="uniform") for p, r in ratios.items()}
    return lambda prefix: configs[prefix]


def prune_model(
    loaded: LoadedModel,
    stats: Statistics,
    config: PruneConfig,
    device: torch.device,
    batch_size: int = 8,
    inputs: BlockInputs | None = None,
    group: Group | None = None,
) -> PruneReport:
    """Prune `loaded.model` in place, block by block on `device`.

    Under torchrun (`group`, sequential only), each rank runs its own windows, the ranks merge each block's
    statistics before it is pruned, and a hash of the pruned block shows that every rank has the same weights.
    """
    model = loaded.model
    report = PruneReport(config)
    t0 = time.perf_counter()
    # A weights-only score (magnitude, random) masks the same whatever the inputs: no forward passes needed.
    recalibrate = config.sequential and bool(config.needs)
    use_inputs = recalibrate or get_reconstruction(config.reconstruct).needs_inputs
    if group is not None and get_reconstruction(config.reconstruct).needs_inputs:
        raise StadeError(
            "--reconstruct is not supported under torchrun yet: each rank would fit its own windows.",
            "reconstruct in a single process",
        )
    if use_inputs and inputs is None:
        inputs = capture_inputs(model, rank_windows(stats.token_ids(), group), batch_size, device)
    blocks = list(iterate_blocks(model))
    report.routers = router_counts([block for _i, _p, block in blocks])
    report.warnings += calibration_warnings(stats, config)
    block_config = allocate_blocks(loaded, stats, config, report, device)
    with progress(disable=group is not None and not group.lead) as bar:
        task = bar.add_task(f"{config.name}{' (sequential)' if config.sequential else ''}", total=len(blocks), info="")
        for i, prefix, block in blocks:
            with on_device(loaded, prefix, block, device):
                report.layers += prune_step(
                    prefix, block, stats, block_config(prefix), device, inputs if use_inputs else None, i, report, group
                )
            if report.reconstruction and report.reconstruction[-1].get("heldout_before") is not None:
                done = report.reconstruction[-1]
                bar.update(task, info=f"held-out {done['heldout_before']:.2e} → {done['heldout_after']:.2e}")
            bar.advance(task)
    report.timings["prune_s"] = round(time.perf_counter() - t0, 3)
    note_damping(report)
    return report


def calibration_warnings(stats: Statistics, config: PruneConfig) -> list[str]:
    """The statistics' warnings, for a run that prunes from them (a sequential one measures anew)."""
    if config.sequential and config.needs:
        return []
    return [f"calibration: {w}" for w in stats.manifest.get("warnings", [])]


def note_damping(report: PruneReport) -> None:
    """Warn about every layer whose Hessian needed more than the usual damping, and about experts that
    fell back to magnitude."""
    fallback = [r.name for r in report.layers if r.fallback]
    if fallback:
        report.warnings.append(
            f"{len(fallback)} expert layers (e.g. {fallback[0]}) were reached by fewer than {MIN_EXPERT_TOKENS} "
            f"calibration tokens and were pruned by {FALLBACK}; calibrate on more tokens to use their statistics"
        )
    for r in report.layers:
        if r.damping is not None and r.damping > 0.01:
            report.warnings.append(f"{r.name}: Hessian needed damping {r.damping:g} (Cholesky failed at 0.01)")
