"""`stade finetune`: recover a pruned checkpoint by training its kept weights (or masked LoRA adapters) with its
mask held exactly, and write a checkpoint with exactly the same zeros (docs/finetune.md).

Everything that can be refused is refused before a model is loaded (finetune_inputs.py); the loop is training.py;
this module builds the run, and writes and checks the checkpoint before it takes its name.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stade_cli.base.artifacts import REPORT_FILE, CurvePoint, FinetuneRecord, PruneRecord
from stade_cli.base.errors import StadeError
from stade_cli.base.files import atomic_dir, check_writable, write_json
from stade_cli.base.modelcard import write_card
from stade_cli.data.splits import Split
from stade_cli.driver.checkpoint import check_weights_whole
from stade_cli.driver.finetune_inputs import (
    FinetuneConfig,
    check_teacher,
    checkpoint_tensors,
    finetune_windows,
    pruned_record,
    read_mask,
)
from stade_cli.driver.training import SCRATCH, Loop, Progress, load_state, run, save_state
from stade_cli.models.layers import weight_param
from stade_cli.models.loading import LoadedModel, load_model
from stade_cli.stages.finetune import lora
from stade_cli.stages.finetune.hold import HeldLayer, kept_nonzero, pattern_break, zeros_differ
from stade_cli.stages.finetune.losses import LossSpec
from stade_cli.stages.finetune.schedule import lr_factor
from stade_cli.stages.pattern import Pattern
from stade_cli.stats.distributed import Group

Extras = Callable[[Path, list[CurvePoint]], object]  # what the caller adds to the checkpoint (the curve's plot)


@dataclass
class Finetuned:
    path: Path
    record: PruneRecord
    seconds: float
    train_seconds: float  # in optimizer steps (held-out measurements and commits aside), resumed runs' included

    def summary(self) -> dict:
        assert self.record.finetune is not None
        times = {"seconds": round(self.seconds, 3), "train_seconds": round(self.train_seconds, 3)}
        return {"path": str(self.path), **times, **self.record.finetune.dump()}


def finetune(
    pruned: str,
    config: FinetuneConfig,
    out: Path,
    device: torch.device,
    *,
    force: bool = False,
    resume: bool = False,
    group: Group | None = None,
    cache_dir: str | None = None,
    extras: Extras | None = None,
    command: str | None = None,
) -> Finetuned | None:
    """Fine-tune `pruned` into `out`; returns what was written (None on ranks other than 0)."""
    t0 = time.perf_counter()
    config.check()
    if resume and group is not None:
        raise StadeError("--resume is not supported under torchrun yet.", "resume with a single process")
    check_writable(out, force)
    folder, record = pruned_record(pruned)
    world = group.world if group is not None else 1
    if config.tokens is not None and not config.data.endswith(".safetensors"):  # budget: before any model loads
        config.steps(config.seqlen or record.statistics.seqlen, world, None)
    if config.teacher is not None:
        check_teacher(config.teacher, pruned)
    keeps, pattern = read_mask(folder, record)
    student = load_model(pruned, torch.float32, "cpu", cache_dir)
    split, seqlen = finetune_windows(config, record, student.tokenizer, cache_dir)
    steps = config.steps(seqlen, world, split.train.shape[0])
    teacher = load_model(config.teacher, None, device, cache_dir).model if config.teacher else None
    loop = build_loop(student, teacher, keeps, split, config, steps, device, group)
    lead = group is None or group.lead
    key = run_key(pruned, config, split, world)
    with atomic_dir(out, force, keep=True, scratch=SCRATCH) if lead else contextlib.nullcontext(None) as tmp:
        done = (load_state(tmp, loop, key) if resume and tmp is not None else None) or Progress()
        commit = (lambda d: save_state(tmp, loop, d, key)) if tmp is not None else None
        done = run(loop, done, commit)
        if config.lora is not None:
            lora.merge(student.model)
        if tmp is None:
            return None
        rec = finetune_record(pruned, config, split, seqlen, loop, done, world)
        final = PruneRecord.parse({**record.dump(), "finetune": rec.dump()})
        write_checkpoint(tmp, student, keeps, pattern, final, command)
        if extras is not None:
            extras(tmp, done.curve)
    return Finetuned(out, final, time.perf_counter() - t0, done.step_seconds)


def build_loop(
    student: LoadedModel,
    teacher: torch.nn.Module | None,
    keeps: dict[str, torch.Tensor],
    split: Split,
    config: FinetuneConfig,
    steps: int,
    device: torch.device,
    group: Group | None,
) -> Loop:
    """The model on the device with its trainable parameters, the held layers, AdamW and the schedule."""
    torch.manual_seed(config.seed)
    model: Any = student.model
    model.to(device)
    if teacher is not None:
        teacher.requires_grad_(False)
    if config.lora is not None:
        lora.attach(model, {n: k.to(device) for n, k in keeps.items()}, config.lora, config.lora_alpha)
        held: list[HeldLayer] = []  # the base weights are frozen: the update itself is masked
    else:
        model.requires_grad_(True)
        held = [HeldLayer(n, weight_param(model.get_submodule(n)), k.to(device)) for n, k in keeps.items()]
    if config.gradient_checkpointing:  # transformers renamed it in 5.x; the old name warns
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.warmup, steps))
    return Loop(
        model=model,
        teacher=teacher,
        held=held,
        optimizer=optimizer,
        scheduler=scheduler,
        train=split.train,
        heldout=split.heldout,
        spec=LossSpec(kd_weight=config.weight, temperature=config.temperature),
        steps=steps,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        seed=config.seed,
        device=device,
        group=group,
        max_grad_norm=config.max_grad_norm,
        eval_every=config.eval_every,
        save_every=config.save_every,
        patience=config.patience,
    )


def run_key(pruned: str, config: FinetuneConfig, split: Split, world: int) -> dict:
    """What must match for a resume: the checkpoint, every setting, the windows and the number of ranks."""
    from stade_cli.data.sources import ids_sha256

    settings = {k: v for k, v in config.__dict__.items() if k not in ("save_every",)}
    return {"pruned": pruned, **settings, "train": ids_sha256(split.train), "world": world}


def finetune_record(
    pruned: str, config: FinetuneConfig, split: Split, seqlen: int, loop: Loop, done: Progress, world: int
) -> FinetuneRecord:
    batch = config.batch_size * config.grad_accum * world
    kept = next(p for p in reversed(done.curve) if p.step == done.kept_step)
    return FinetuneRecord(
        pruned=pruned,
        teacher=config.teacher,
        loss=config.loss_kind,
        kd_weight=config.weight,
        temperature=config.temperature,
        mode="lora" if config.lora is not None else "full",
        lora_rank=config.lora,
        lora_alpha=(config.lora_alpha or float(config.lora)) if config.lora is not None else None,
        data=config.data,
        seqlen=seqlen,
        train_windows=split.train.shape[0],
        heldout_windows=split.heldout.shape[0],
        data_notes=split.notes,
        lr=config.lr,
        warmup=config.warmup,
        batch_windows=batch,
        steps=done.step,
        tokens=done.step * batch * seqlen,
        stopped_early=done.stopped_early,
        seed=config.seed,
        world_size=world,
        heldout_before=done.curve[0].heldout_ppl,
        heldout_after=kept.heldout_ppl,
        best_step=done.best_step,
        kept_step=done.kept_step,
        curve=done.curve,
    )


def write_checkpoint(
    tmp: Path, student: LoadedModel, keeps: dict[str, torch.Tensor], pattern: Pattern, record: PruneRecord,
    command: str | None,
) -> None:  # fmt: skip
    """The weights in the checkpoint's own dtype with exactly the input's zeros, checked from the files written,
    layer by layer, before stade.json and the model card say the checkpoint is complete."""
    model: Any = student.model
    model.cpu()
    dtype = student.own_dtype or torch.float32
    with torch.no_grad():
        cast = {n: kept_nonzero(weight_param(model.get_submodule(n)), k, dtype) for n, k in keeps.items()}
        model.to(dtype)
        for name, weight in cast.items():
            weight_param(model.get_submodule(name)).copy_(weight)
    from transformers.utils import logging

    logging.disable_progress_bar()  # the run's own bar has ended; saving is quick and says nothing
    model.save_pretrained(tmp)
    student.tokenizer.save_pretrained(tmp)
    check_weights_whole(tmp)
    check_same_zeros(tmp, keeps, pattern)
    write_json(tmp / REPORT_FILE, record.dump())
    write_card(tmp, record, command)


def check_same_zeros(folder: Path, keeps: dict[str, torch.Tensor], pattern: Pattern) -> None:
    """Every pruned layer of the written checkpoint has exactly the input's zeros (and its N:M groups)."""
    written = checkpoint_tensors(folder, [f"{n}.weight" for n in keeps])
    for name, keep in keeps.items():
        w = written.get(f"{name}.weight")
        zeros = None if w is None else w == 0
        problem = "missing" if zeros is None else zeros_differ(zeros, ~keep) or pattern_break(zeros, pattern)
        if problem:
            raise StadeError(f"The fine-tuned {name} does not keep the pruned checkpoint's mask: {problem}.",
                             "this is a bug in stade: please report it")  # fmt: skip
