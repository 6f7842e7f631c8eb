"""`stade finetune`: recover a pruned checkpoint with its mask held exactly (the optional fifth stage)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stade_cli.cli.options import (
    BatchOpt,
    CacheDirOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    cli_errors,
    command_line,
    print_json,
)

if TYPE_CHECKING:
    from stade_cli.driver.finetune_inputs import FinetuneConfig

TRAIN = "Training"


@cli_errors
def finetune(
    ctx: typer.Context,
    pruned: Annotated[str, typer.Argument(help="A checkpoint `stade prune` wrote (its stade.json names its mask).")],
    teacher: Annotated[
        str, typer.Option("--teacher", help="The dense model to distil from (same vocabulary), or none.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fine-tuned checkpoint.")],
    data: Annotated[
        str, typer.Option("--data", help="As `stade calibrate --data`; windows apart from the calibration windows.")
    ] = "c4",
    loss: Annotated[
        str | None, typer.Option("--loss", help="kd, lm or mix. \\[default: kd with a teacher, lm without]")
    ] = None,
    kd_weight: Annotated[float | None, typer.Option("--kd-weight", help="The KD term's weight in mix (0.5).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Distillation temperature.")] = 1.0,
    lora: Annotated[
        int | None, typer.Option("--lora", help="Train masked LoRA adapters of this rank, merged at the end.")
    ] = None,
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", help="LoRA alpha. \\[default: rank]")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps.", rich_help_panel=TRAIN)] = (
        None
    ),
    tokens: Annotated[
        int | None, typer.Option("--tokens", help="A budget of training tokens.", rich_help_panel=TRAIN)
    ] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=TRAIN)] = 1e-4,
    warmup: Annotated[int, typer.Option("--warmup", help="Warmup steps, then cosine.", rich_help_panel=TRAIN)] = 0,
    batch_size: BatchOpt = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step.", rich_help_panel=TRAIN)] = 1,
    seqlen: Annotated[
        int | None, typer.Option("--seqlen", help="Tokens per window. \\[default: the statistics']", show_default=False)
    ] = None,
    heldout: Annotated[int, typer.Option("--heldout-windows", help="Held-out windows.", rich_help_panel=TRAIN)] = 16,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between held-out losses.")] = 50,
    save_every: Annotated[int, typer.Option("--save-every", help="Steps between saved training states.")] = 50,
    patience: Annotated[
        int | None, typer.Option("--patience", help="Stop after this many held-out losses without improvement.")
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the windows' split and order.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from its last saved state.")] = False,
    device: DeviceOpt = "auto",
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a pruned checkpoint with its mask held exactly; eval and compare take the result as any other.

    Example: stade finetune pruned/ --teacher meta-llama/Llama-3.2-1B --data c4 --tokens 2000000 --out tuned/

    LoRA, no teacher: stade finetune pruned/ --teacher none --lora 16 --data notes.txt --max-steps 200 --out tuned/
    """
    from stade_cli.base.console import err
    from stade_cli.base.files import check_apart, check_writable
    from stade_cli.driver.finetune import finetune as run
    from stade_cli.driver.finetune_inputs import FinetuneConfig
    from stade_cli.evaluation.curve import plot_curve
    from stade_cli.models.loading import resolve_device
    from stade_cli.stats.distributed import cuda_device_for, group_for

    config = FinetuneConfig(
        data=data,
        teacher=None if teacher.lower() == "none" else teacher,
        loss=loss,
        kd_weight=kd_weight,
        temperature=temperature,
        lora=lora,
        lora_alpha=lora_alpha,
        max_steps=max_steps,
        tokens=tokens,
        lr=lr,
        warmup=warmup,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seqlen=seqlen,
        heldout=heldout,
        eval_every=eval_every,
        save_every=save_every,
        patience=patience,
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
    )
    config.check()
    check_writable(out, force)
    check_apart(out, [("the pruned checkpoint", pruned), ("the teacher", teacher), ("the --data file", data)])
    dev = cuda_device_for(resolve_device(device))
    cache = str(cache_dir) if cache_dir else None
    preflight(config, pruned, dev, out, cache_dir)
    with group_for(dev) as group:
        done = run(pruned, config, out, dev, force=force, resume=resume, group=group, cache_dir=cache,
                   extras=plot_curve, command=command_line(ctx))  # fmt: skip
    if done is None:
        return
    if as_json:
        print_json(done.summary())
        return
    ft = done.record.finetune
    assert ft is not None
    err.print(
        f"Fine-tuned {ft.steps} steps ({ft.tokens} tokens): held-out perplexity {ft.heldout_before:.3f} → "
        f"{ft.heldout_after:.3f}{' (stopped early)' if ft.stopped_early else ''}"
        f"{f', the best step ({ft.kept_step}) kept' if ft.kept_step not in (None, ft.steps) else ''}; mask held. "
        f"Wrote {out}",
        highlight=False,
        soft_wrap=True,
    )


def preflight(config: FinetuneConfig, pruned: str, dev: Any, out: Path, cache_dir: Path | None) -> None:
    """The plan's line, as every stage prints it; a run that cannot fit is refused before a model loads."""
    from stade_cli.cli.options import plan_line
    from stade_cli.driver.finetune_inputs import pruned_record
    from stade_cli.planning.finetune import FinetunePlan
    from stade_cli.planning.plan import ids_shape

    _folder, record = pruned_record(pruned)
    shape = FinetunePlan(config.lora, config.teacher is not None, config.gradient_checkpointing,
                         config.patience is not None)  # fmt: skip
    rows = ids_shape(config.data) if config.data.endswith(".safetensors") else None  # token ids: the file's windows
    window = rows[1] if rows else config.seqlen or record.statistics.seqlen
    plan_line("finetune", pruned, dev, out, cache_dir, batch_size=config.batch_size, finetune=shape,
              finetune_tokens=config.tokens, seqlen=window)  # fmt: skip
