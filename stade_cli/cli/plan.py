"""`stade plan` and `stade methods`: what a run will need, and what stade can run (no weights read)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from stade_cli.cli.options import (
    BatchOpt,
    CacheDirOpt,
    DeviceOpt,
    DtypeOpt,
    IgnoreOpt,
    JsonOpt,
    ModelArg,
    OnlyOpt,
    cli_errors,
    print_json,
)
from stade_cli.cli.stages import with_stage_options

FT = "Fine-tuning (with --finetune)"


@with_stage_options
@cli_errors
def plan(
    model: ModelArg,
    data: Annotated[
        str, typer.Option("--data", help="Calibration source: a text source, or a .safetensors file of token ids.")
    ] = "sample-wiki",
    nsamples: Annotated[int, typer.Option(help="Calibration windows.", min=1)] = 128,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per window.", show_default="min(context, 2048)")] = None,
    hessian: Annotated[bool, typer.Option("--hessian", help="Plan calibrate with Hessians (sparsegpt, admm).")] = False,
    hessian_dtype: Annotated[str, typer.Option("--hessian-dtype", help="float32 or bfloat16.")] = "float32",
    method: Annotated[str, typer.Option("--method", "-m", help="Method(s) to prune with, comma-separated.")] = "wanda",
    pattern: Annotated[str, typer.Option("--pattern", "-p", help="unstructured or N:M, comma-separated.")] = (
        "unstructured"
    ),
    sparsity: Annotated[
        str | None,
        typer.Option("--sparsity", help="Ratio(s), comma-separated. \\[default: 0.5, or N/M]", show_default=False),
    ] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="Plan a sequential prune.")] = False,
    only: OnlyOpt = None,
    ignore: IgnoreOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    timed: Annotated[
        bool, typer.Option("--time/--no-time", help="Time one block here for the time estimate (random weights).")
    ] = True,
    finetune: Annotated[
        bool, typer.Option("--finetune", help="Plan `stade finetune` too.", rich_help_panel=FT)
    ] = False,
    lora: Annotated[int | None, typer.Option("--lora", help="Its LoRA rank (full: none).", rich_help_panel=FT)] = None,
    teacher: Annotated[
        bool, typer.Option("--teacher/--no-teacher", help="Distil from the dense model.", rich_help_panel=FT)
    ] = True,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations.", rich_help_panel=FT)
    ] = False,
    patience: Annotated[
        bool, typer.Option("--patience", help="Early stopping (keeps the best weights).", rich_help_panel=FT)
    ] = False,
    tokens: Annotated[
        int | None, typer.Option("--tokens", help="Training tokens (the time estimate).", rich_help_panel=FT)
    ] = None,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
    **stages: Any,
) -> None:
    """Estimate memory, disk and time of calibrate, prune and eval from MODEL's config alone (no weights read).

    MODEL may also be a folder or a config.json file with no weights. Memory figures are peaks derived from the
    shapes and the stages that will run; the time is an ESTIMATE scaled from one block's forward pass timed on this
    device. --device cuda plans a GPU run from a machine without one (a cluster's login node): memory and disk, not
    timed.

    Example: stade plan meta-llama/Llama-3.1-8B --nsamples 128 --seqlen 2048 --hessian --method sparsegpt
    --device cuda

    Stages: stade plan smollm2-135m --hessian --method admm --reconstruct block --sequential --pattern 2:4

    Fine-tuning (4 windows of 2048 per pass, LoRA rank 16): stade plan MODEL --finetune --lora 16 --batch-size 4
    --seqlen 2048 --tokens 2000000 --device cuda
    """
    from stade_cli.base.errors import StadeError
    from stade_cli.cli.stages import prune_configs
    from stade_cli.cli.tables import render_plan
    from stade_cli.models.loading import resolve_device
    from stade_cli.planning.finetune import FinetunePlan
    from stade_cli.planning.plan import PlanConfig, make_plan
    from stade_cli.stages.selection import LayerSelection

    if not finetune and (lora is not None or tokens is not None or gradient_checkpointing or patience):
        raise StadeError("--lora, --tokens, --gradient-checkpointing and --patience plan a fine-tuning run.",
                         "add --finetune")  # fmt: skip
    if lora is not None and lora < 1:
        raise StadeError(f"--lora {lora} is not a rank.", "give the adapters' rank, at least 1, e.g. --lora 16")

    common = {"sequential": sequential, "layers": LayerSelection.parse(only, ignore)}
    configs = prune_configs(method, pattern, sparsity, stages, default_ratio=0.5, **common)
    config = PlanConfig(
        nsamples,
        seqlen,
        hessian,
        hessian_dtype,
        tuple(configs),
        batch_size,
        dtype.value if dtype else None,
        timed,
        data,
        finetune=FinetunePlan(lora, teacher, gradient_checkpointing, patience) if finetune else None,
        finetune_tokens=tokens,
    )
    result = make_plan(model, config, resolve_device(device, absent_ok=True), str(cache_dir) if cache_dir else None)
    if as_json:
        print_json(result.to_dict())
    else:
        render_plan(result.to_dict())


@cli_errors
def methods(as_json: JsonOpt = False) -> None:
    """List the methods (presets) and every pruning stage: scores, updates, allocations, reconstructions.

    Example: stade methods --json
    """
    from stade_cli.stages.catalog import stage_rows

    rows = stage_rows()
    if as_json:
        print_json(rows)
    else:
        from stade_cli.cli.tables import render_methods

        render_methods(rows)
