"""`stade prune`: prune a model with cached statistics and write checkpoints (one per method, pattern, ratio)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stade_cli.cli.options import (
    BatchOpt,
    CacheDirOpt,
    DeviceOpt,
    Dtype,
    ForceOpt,
    JsonOpt,
    ModelArg,
    cli_errors,
    command_line,
    plan_line,
    print_json,
    split_csv,
)


def _stage(flag: str, help: str, **kwargs: Any) -> Any:
    """An option of `stade prune`'s Stages panel (score, update, allocation, reconstruction and their settings)."""
    return typer.Option(flag, help=help, rich_help_panel="Stages", **kwargs)


@cli_errors
def prune(
    ctx: typer.Context,
    model: ModelArg,
    stats: Annotated[Path, typer.Option("--stats", "-s", help="Statistics folder from `stade calibrate`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint folder (a sweep: one sub-folder each).")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method(s), comma-separated; see `stade methods`.")],
    sparsity: Annotated[
        str | None,
        typer.Option(
            "--sparsity",
            help="Ratio(s) in \\[0, 1), comma-separated. \\[default: N/M for an N:M pattern]",
            show_default=False,
        ),
    ] = None,
    pattern: Annotated[
        str, typer.Option("--pattern", "-p", help="unstructured or N:M (2:4, 4:8, ...), comma-separated.")
    ] = "unstructured",
    sequential: Annotated[
        bool, typer.Option("--sequential", help="Recalibrate each block on the pruned blocks' outputs (published).")
    ] = False,
    bias_update: Annotated[
        bool, typer.Option("--bias-update/--no-bias-update", help="STADE's bias compensation (stade, stadew).")
    ] = True,
    reconstruct: Annotated[
        str,
        _stage(
            "--reconstruct",
            "none, or block: after masking each block, tune its kept weights to the dense block's outputs.",
        ),
    ] = "none",
    reconstruct_steps: Annotated[
        int, typer.Option("--reconstruct-steps", help="Adam steps per block (at most; stops early).", min=1)
    ] = 20,  # reconstruct.DEFAULT_STEPS (not imported here: torch would slow down --help)
    update: Annotated[
        str | None,
        _stage(
            "--update",
            "Replace the method's weight update: none, bias, obs, admm (see `stade methods`). "
            "\\[default: the method's own]",
            show_default=False,
        ),
    ] = None,
    allocation: Annotated[str, _stage("--allocation", "Sparsity per block: uniform, or owl (unstructured only).")] = (
        "uniform"
    ),
    admm_iters: Annotated[int, _stage("--admm-iters", "ADMM iterations.", min=1)] = 20,
    admm_rho: Annotated[float, _stage("--admm-rho", "ADMM penalty rho (on H scaled to unit diagonal).")] = 1.0,
    admm_rho_growth: Annotated[
        float, _stage("--admm-rho-growth", "Multiply rho by this each iteration once the mask is fixed.")
    ] = 1.0,
    admm_mask_iters: Annotated[int, _stage("--admm-mask-iters", "Iterations that grow the mask (--method admm).")] = 15,
    owl_m: Annotated[float, _stage("--owl-m", "OWL: outlier threshold, times the block's mean score.")] = 5.0,
    owl_lambda: Annotated[float, _stage("--owl-lambda", "OWL: block ratios within sparsity ± lambda.")] = 0.08,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random method's noise (no other method draws).")] = 0,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        Dtype | None,
        typer.Option(
            "--dtype",
            help="The dtype the checkpoint is saved in. \\[default: the checkpoint's own] Scores are always computed "
            "in float32, and --sequential's forward passes run in float32 on CPU (the checkpoint's own dtype on a "
            "GPU).",
            rich_help_panel="Hardware",
        ),
    ] = None,
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Prune MODEL with cached statistics and write checkpoints that plain transformers loads, each with a
    README.md model card (eval adds its results) and stade.json.

    Example: stade prune smollm2-135m --stats stats/ --method wanda,stade --pattern unstructured,2:4
    --sparsity 0.5 --out pruned/

    With block reconstruction: stade prune smollm2-135m --stats stats/ --method wanda --pattern 2:4
    --reconstruct block --reconstruct-steps 20 --out pruned/

    Stages: stade prune smollm2-135m --stats stats/ --method wanda --update admm --allocation owl --sparsity 0.6
    --out pruned/

    On K GPUs (sequential): torchrun --nproc-per-node K -m stade_cli prune MODEL --sequential ...
    """
    from stade_cli.base.dtypes import parse_dtype
    from stade_cli.base.errors import StadeError
    from stade_cli.base.files import check_apart, check_writable
    from stade_cli.cli.tables import render_prune, render_sweep
    from stade_cli.driver.streaming import prune_checkpoints
    from stade_cli.driver.sweep import written_paths
    from stade_cli.models.loading import load_model, resolve_device
    from stade_cli.stages.admm import AdmmSettings
    from stade_cli.stages.allocation import OwlSettings
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stages.masks import parse_pattern
    from stade_cli.stats.artifact import Statistics
    from stade_cli.stats.distributed import cuda_device_for, group_for, launched

    ratios: list[float | None] = [None]
    if sparsity is not None:
        try:
            ratios = [float(r) for r in split_csv(sparsity, "--sparsity")]
        except ValueError:
            raise typer.BadParameter(
                f"{sparsity!r} is not a comma-separated list of numbers.", param_hint="--sparsity"
            ) from None
    configs: list[PruneConfig] = []
    for m in split_csv(method, "--method"):
        for p in split_csv(pattern, "--pattern"):
            for r in ratios:  # an N:M pattern fixes the ratio: every --sparsity given must agree with it
                c = PruneConfig(
                    m,
                    r,
                    p,
                    bias_update,
                    sequential,
                    seed,
                    reconstruct=reconstruct,
                    reconstruct_steps=reconstruct_steps,
                    update=update,
                    allocation=allocation,
                    admm=AdmmSettings(admm_iters, admm_rho, admm_rho_growth, admm_mask_iters),
                    owl=OwlSettings(owl_m, owl_lambda),
                )
                if not (parse_pattern(p).structured and c in configs):
                    configs.append(c)
    for path in written_paths(out, configs):
        check_writable(path, force)
        check_apart(path, [("--stats", stats), ("the model", model)])
    if launched() and not sequential:
        raise StadeError(
            "Under torchrun, prune splits the calibration windows over the ranks: that needs --sequential.",
            "add --sequential, or run a one-shot prune as a single process (it has no windows to split)",
        )
    stats_art = Statistics.load(stats)
    dev = cuda_device_for(resolve_device(device))
    plan_line(
        "prune",
        model,
        dev,
        None,
        cache_dir,
        nsamples=stats_art.manifest["data"]["nsamples"],
        seqlen=stats_art.manifest["data"]["seqlen"],
        methods=tuple(sorted({c.method for c in configs})),
        sequential=sequential,
        batch_size=batch_size,
        dtype=dtype,
    )  # the disk: stream_sweep's check_space
    # Computed in float32 on CPU (the checkpoint's own dtype on a GPU), as calibrate runs; saved in --dtype, by
    # default the checkpoint's own. Blocks stream from disk one at a time where the checkpoint allows (streaming.py).
    loaded = load_model(model, None, dev, str(cache_dir) if cache_dir else None, lazy=True)
    with group_for(dev) as group:
        results = prune_checkpoints(
            loaded,
            stats_art,
            configs,
            out,
            dev,
            force,
            parse_dtype(dtype.value if dtype else None),
            batch_size,
            command=command_line(ctx),
            group=group,
        )
    if not results:  # another rank than 0 under torchrun: rank 0 reports
        return
    if as_json:
        print_json(
            [{"path": str(p), **r} for p, r in results]
            if len(results) > 1
            else {"path": str(results[0][0]), **results[0][1]}
        )
    elif len(results) == 1:
        render_prune(str(results[0][0]), results[0][1])
    else:
        render_sweep([(str(p), r) for p, r in results])
