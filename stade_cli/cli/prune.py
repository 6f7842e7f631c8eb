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
    IgnoreOpt,
    JsonOpt,
    ModelArg,
    OnlyOpt,
    cli_errors,
    command_line,
    plan_line,
    print_json,
)
from stade_cli.cli.stages import with_stage_options


@with_stage_options
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
        bool,
        typer.Option(
            "--bias-update/--no-bias-update", help="The bias update of the methods that have one (stade, stadew)."
        ),
    ] = True,
    only: OnlyOpt = None,
    ignore: IgnoreOpt = None,
    seed: Annotated[
        int,
        typer.Option("--seed", help="Seed of the random method's scores and of the reconstruction's held-out split."),
    ] = 0,
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
    **stages: Any,
) -> None:
    """Prune MODEL with cached statistics and write checkpoints that plain transformers loads, each with a
    README.md model card (eval adds its results) and stade.json.

    Example: stade prune smollm2-135m --stats stats/ --method wanda,stade --pattern unstructured,2:4
    --sparsity 0.5 --out pruned/

    Keeping layers dense: stade prune smollm2-135m --stats stats/ --method sparsegpt --ignore 're:.*down_proj'
    --out pruned/

    With block reconstruction: stade prune smollm2-135m --stats stats/ --method wanda --pattern 2:4
    --reconstruct block --reconstruct-steps 20 --out pruned/

    Stages: stade prune smollm2-135m --stats stats/ --method wanda --update admm --allocation owl --sparsity 0.6
    --out pruned/

    On K GPUs (sequential): torchrun --nproc-per-node K -m stade_cli prune MODEL --sequential ...
    """
    from stade_cli.base.dtypes import parse_dtype
    from stade_cli.base.files import check_apart, check_writable
    from stade_cli.cli.stages import prune_configs
    from stade_cli.cli.tables import render_prune, render_sweep
    from stade_cli.driver.loop import refuse_unsupported
    from stade_cli.driver.sweep import prune_checkpoints, written_paths
    from stade_cli.models.loading import load_model, resolve_device
    from stade_cli.stages.selection import LayerSelection
    from stade_cli.stats.artifact import Statistics
    from stade_cli.stats.distributed import cuda_device_for, group_for, launched

    layers = LayerSelection.parse(only, ignore)
    common: dict[str, Any] = {"bias_update": bias_update, "sequential": sequential, "seed": seed, "layers": layers}
    configs = prune_configs(method, pattern, sparsity, stages, **common)
    for path in written_paths(out, configs):
        check_writable(path, force)
        check_apart(path, [("--stats", stats), ("the model", model)])
    refuse_unsupported(configs, launched())
    stats_art = Statistics.load(stats)
    layers.check(stats_art.layers)  # every pattern names a layer: before the model is loaded
    dev = cuda_device_for(resolve_device(device))
    plan_line(
        "prune",
        model,
        dev,
        None,
        cache_dir,
        nsamples=stats_art.manifest.data.nsamples,
        seqlen=stats_art.manifest.data.seqlen,
        configs=tuple(configs),
        batch_size=batch_size,
        saved_dtype=dtype.value if dtype else None,
    )  # the disk: prune_checkpoints' check_space
    # Computed in float32 on CPU (the checkpoint's own dtype on a GPU), as calibrate runs; saved in --dtype, by
    # default the checkpoint's own. Blocks stream from disk one at a time where the checkpoint allows (driver/sweep.py).
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
        docs = [{"path": str(p), **r.dump()} for p, r in results]
        print_json(docs if len(docs) > 1 else docs[0])
    elif len(results) == 1:
        render_prune(str(results[0][0]), results[0][1])
    else:
        render_sweep([(str(p), r) for p, r in results])
