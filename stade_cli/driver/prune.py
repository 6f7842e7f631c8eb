"""Pruning one block: score, mask and update every linear layer and expert, then reconstruct where asked.

One-shot (default) reads the cached dense statistics; `sequential` recalibrates block k on the outputs of the
already-pruned blocks 0..k-1 (the published protocol), with the collector loop calibrate runs (stats/collect.py).
The stages are looked up in their registries: nothing here names one.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.driver.reports import LayerReport, PruneReport
from stade_cli.models.blocks import BlockInputs, run_block
from stade_cli.models.experts import prunable_layers, underfed
from stade_cli.models.layers import bias_param, get_weight, set_weight, weight_param
from stade_cli.stages.config import PruneConfig
from stade_cli.stages.masks import mask_from_scores
from stade_cli.stages.presets import FALLBACK, MIN_EXPERT_TOKENS
from stade_cli.stages.stage import INPUTS, RECONSTRUCTIONS, SCORES, UPDATES, UpdateJob
from stade_cli.stats.accumulators import LayerStats
from stade_cli.stats.artifact import Statistics
from stade_cli.stats.collect import collect_block
from stade_cli.stats.collectors import norm_feed_warnings
from stade_cli.stats.distributed import Group, tensor_digest

Pruned = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]  # weight, mask, bias change, damping


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
    score_name, update_name = config.layer_stages(st.fed_by_norm)
    masks = None
    if score_name is not None:
        score = SCORES.get(score_name)
        masks = []
        for w, name in zip(ws, names, strict=True):
            scores = score.fn(w, st, _layer_generator(config.seed, name))
            if scores.isnan().any():
                raise StadeError(
                    f"Layer {name} has NaN {score_name} scores: its weights or calibration statistics contain NaN.",
                    "check the model's weights, and calibrate in float32 (--dtype float32) if float16 overflowed",
                )
            masks.append(mask_from_scores(scores, config.ratio, config.parsed_pattern))
    update = UPDATES.get(update_name)
    job = UpdateJob(config.ratio, config.parsed_pattern, config.settings_for(update))
    return update.fn(ws, masks, st, job)


def prune_weight(w: torch.Tensor, st: LayerStats, config: PruneConfig, name: str = "layer") -> Pruned:
    """`prune_group` for one layer."""
    return prune_group([w], st, config, [name])[0]


def _layer_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _input_groups(prefix: str, block: nn.Module, stats_of: Any) -> list[tuple[LayerStats, list[tuple[str, Any]]]]:
    """The block's prunable layers in order, consecutive layers that share an input (one LayerStats) together."""
    groups: list[tuple[LayerStats, list[tuple[str, Any]]]] = []
    for name, mod in prunable_layers(block).items():
        full = f"{prefix}.{name}"
        st: LayerStats = stats_of(name, full)
        if groups and st.group and groups[-1][0].group == st.group:
            groups[-1][1].append((full, mod))
        else:
            groups.append((st, [(full, mod)]))
    return groups


def prune_block(prefix: str, block: nn.Module, stats_of: Any, config: PruneConfig) -> list[LayerReport]:
    """Prune every linear layer and expert of one block in place (the block is on its device), but those
    --only / --ignore keep dense; the reports come in the block's order.

    An expert that too few calibration tokens reached is pruned by presets.FALLBACK instead.
    """
    reports: dict[str, LayerReport] = {}
    order: list[str] = []
    for st, group in _input_groups(prefix, block, stats_of):
        order += [full for full, _ in group]
        reports |= {full: _kept_dense(full, mod) for full, mod in group if not config.layers.pruned(full)}
        members = [(full, mod) for full, mod in group if full not in reports]
        if members:
            reports |= {r.name: r for r in _prune_members(members, st, config)}
    return [reports[full] for full in order]


def _prune_members(members: list[tuple[str, Any]], st: LayerStats, config: PruneConfig) -> list[LayerReport]:
    """Prune layers that share one input (`st`) in place."""
    ws = [get_weight(mod).detach().to(torch.float32) for _, mod in members]
    names = [full for full, _ in members]
    fallback = FALLBACK if config.needs and underfed(names[0], st.count, MIN_EXPERT_TOKENS) else None
    group_config = replace(config, method=fallback, update=None) if fallback else config
    reports = []
    for (full, mod), w, (w_new, mask, db, damping) in zip(
        members, ws, prune_group(ws, st, group_config, names), strict=True
    ):
        err, energy = output_error(w, w_new, db, st)
        set_weight(mod, w_new)
        if db is not None:
            _add_bias(mod, db)
        shape = (w.shape[0], w.shape[1])
        sparsity = float(mask.float().mean())
        reports.append(LayerReport(full, shape, sparsity, err / max(energy, 1e-30), db is not None, damping, fallback))
    return reports


def _kept_dense(full: str, mod: Any) -> LayerReport:
    """A layer --only / --ignore keeps dense: left as it is, counted in the achieved sparsity at its own zeros."""
    w = get_weight(mod)
    return LayerReport(full, (w.shape[0], w.shape[1]), float((w == 0).float().mean()), 0.0, False, dense=True)


def _add_bias(mod: nn.Module, db: torch.Tensor) -> None:
    bias = bias_param(mod)
    if bias is None:
        weight = weight_param(mod)
        bias = mod.bias = nn.Parameter(torch.zeros(db.shape[0], dtype=weight.dtype, device=weight.device))
    bias.data.add_(db.to(bias.dtype))


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
    report: PruneReport,
    group: Group | None = None,
) -> list[LayerReport]:
    """Prune block `index` (already on `device`). With `inputs` (sequential, or reconstructing): recalibrate on
    them (sequential), reconstruct against the dense block's outputs on them (recorded in `report`), then
    advance them to the next block's inputs: the pruned block's outputs (sequential), else the dense ones.

    Under torchrun (`group`), `inputs` are this rank's windows: the ranks merge the block's statistics
    before it is pruned, and a hash of the pruned block shows that every rank holds the same weights."""
    if inputs is None:
        return prune_block(prefix, block, _one_shot_stats(stats, config, device), config)
    recon = RECONSTRUCTIONS.get(config.reconstruct)
    targets = INPUTS in recon.needs  # the dense block's outputs on its inputs: the reconstruction's targets
    if config.sequential and config.needs:
        collector, dense = collect_block(block, inputs, device, index, "hessian" in config.needs, targets, group)
        report.warnings += norm_feed_warnings(prefix, collector.linear.fed_by_norm)  # measured contradicts named
        reports = prune_block(prefix, block, lambda name, _full: collector.layer_stats(name), config)
        del collector
        if group is not None:
            group.same_everywhere(tensor_digest(list(block.state_dict().values())), f"the pruned weights of {prefix}")
    else:
        dense = run_block(block, inputs, device, index) if targets else []
        reports = prune_block(prefix, block, _one_shot_stats(stats, config, device), config)
    if targets:
        seed = config.seed * 1_000_003 + len(report.reconstruction)  # one held-out split per block
        done = recon.fn(block, inputs.of_block(index), dense, device, config.settings_for(recon), seed) or {}
        report.reconstruction.append({"block": prefix, **done})
    # Sequential: the pruned block feeds the next one. One-shot (reconstructing): the dense outputs do.
    inputs.hidden = run_block(block, inputs, device, index) if config.sequential else dense
    return reports
