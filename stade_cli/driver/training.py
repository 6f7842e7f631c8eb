"""The training loop of `stade finetune`: masked steps, held-out measurements, early stopping, and the training
state committed every N steps so that `--resume` continues a killed run where it stopped.

Determinism: the windows of optimizer step s are a function of (seed, s) alone (a seeded shuffle per pass over the
training windows), so a resumed run sees the windows an uninterrupted one would; the committed state holds the
weights being trained, the optimizer's and scheduler's states and the RNGs. Under torchrun each rank takes its part
of every step's global batch and the gradients are averaged over the ranks (all-reduce) before the masked step: on
the CPU, 2 ranks give the weights 1 process gives with the same global batch, within float rounding.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stade_cli.base.artifacts import CurvePoint
from stade_cli.base.console import progress
from stade_cli.base.errors import StadeError
from stade_cli.base.files import fsync_path
from stade_cli.stages.finetune.hold import HeldLayer, mask_grads, reapply
from stade_cli.stages.finetune.losses import LossSpec, sequence_loss
from stade_cli.stats.distributed import Group

STATE_FILE = "train-state.pt"
SCRATCH = (STATE_FILE,)  # removed once the checkpoint is in place


@dataclass
class Loop:
    """One run's moving parts (driver/finetune.py builds them)."""

    model: nn.Module
    teacher: nn.Module | None
    held: list[HeldLayer]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: torch.Tensor  # (n, seqlen)
    heldout: torch.Tensor
    spec: LossSpec
    steps: int
    batch_size: int
    grad_accum: int
    seed: int
    device: torch.device
    group: Group | None = None
    max_grad_norm: float | None = None
    eval_every: int = 50
    save_every: int = 50
    patience: int | None = None


@dataclass
class Progress:
    """What the loop has done; all of it goes into the committed state."""

    step: int = 0
    curve: list[CurvePoint] = field(default_factory=list)
    best: float = math.inf
    best_step: int = 0
    stale: int = 0  # held-out measurements since the best
    stopped_early: bool = False
    best_weights: dict[str, torch.Tensor] | None = None  # with --patience: the trained parameters at best_step
    step_seconds: float = 0.0  # in optimizer steps (held-out measurements and commits aside)

    @property
    def kept_step(self) -> int:
        """The step whose weights the run ends with: the best with early stopping (--patience), else the last."""
        return self.best_step if self.best_weights is not None else self.step


def world(loop: Loop) -> int:
    return loop.group.world if loop.group is not None else 1


def step_windows(loop: Loop, step: int, micro: int) -> torch.Tensor:
    """This rank's windows of micro-batch `micro` of optimizer step `step`: positions of the global order, which
    is one seeded shuffle per pass over the training windows."""
    n, w = loop.train.shape[0], world(loop)
    rank = loop.group.rank if loop.group is not None else 0
    first = ((step * loop.grad_accum + micro) * w + rank) * loop.batch_size
    picks = [int(_pass_order(loop.seed, n, pos // n)[pos % n]) for pos in range(first, first + loop.batch_size)]
    return loop.train[picks]


@functools.lru_cache(maxsize=2)
def _pass_order(seed: int, n: int, epoch: int) -> torch.Tensor:
    """The seeded shuffle of pass `epoch` over the n training windows, drawn once per pass (not once per window)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head on final hidden states, with the output scaling some families apply (Cohere, Gemma 2/3)."""
    out: Any = model.get_output_embeddings()  # type: ignore[operator]
    cfg: Any = getattr(model, "config", None)
    scale, cap = getattr(cfg, "logit_scale", None), getattr(cfg, "final_logit_softcapping", None)

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        logits = out(hidden)
        if isinstance(scale, int | float):
            logits = logits * scale
        if isinstance(cap, int | float) and cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on a GPU; float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def window_loss(loop: Loop, windows: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The loss of windows (B, T), the teacher's logits made chunk by chunk from its final hidden states."""
    windows = windows.to(loop.device)
    teach = None
    with autocast(loop.device):
        if loop.teacher is not None and spec.kd_weight > 0:
            with torch.no_grad():
                t_hidden = loop.teacher.get_decoder()(input_ids=windows, use_cache=False).last_hidden_state  # type: ignore[operator]
            t_head = head(loop.teacher)

            def teach(start: int, end: int) -> torch.Tensor:
                with torch.no_grad():
                    return t_head(t_hidden[:, start:end])

        hidden = loop.model.get_decoder()(input_ids=windows, use_cache=False).last_hidden_state  # type: ignore[operator]
        return sequence_loss(head(loop.model), hidden, windows, spec, teach)


def one_step(loop: Loop, step: int) -> float:
    """One optimizer step over the global batch: gradients averaged over the ranks, the mask held."""
    total = 0.0
    for micro in range(loop.grad_accum):
        loss = window_loss(loop, step_windows(loop, step, micro), loop.spec) / loop.grad_accum
        loss.backward()
        total += float(loss.detach())
    params = [p for p in loop.model.parameters() if p.requires_grad]
    if loop.group is not None:
        import torch.distributed as dist

        for p in params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad / loop.group.world
        reduced = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(reduced)
        total = float(reduced) / loop.group.world
    mask_grads(loop.held)
    if loop.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, loop.max_grad_norm)
    loop.optimizer.step()
    reapply(loop.held)
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def heldout_loss(loop: Loop) -> float:
    """The mean next-token NLL over the held-out windows (each rank a part, summed over the ranks)."""
    spec = LossSpec(kd_weight=0.0, chunk=loop.spec.chunk)
    rank, w = (loop.group.rank, loop.group.world) if loop.group is not None else (0, 1)
    mine = loop.heldout[rank::w]
    total = torch.zeros(2, dtype=torch.float64)
    loop.model.eval()
    for start in range(0, mine.shape[0], loop.batch_size):
        batch = mine[start : start + loop.batch_size]
        total[0] += float(window_loss(loop, batch, spec)) * batch.shape[0]
        total[1] += batch.shape[0]
    loop.model.train()
    if loop.group is not None:
        import torch.distributed as dist

        dist.all_reduce(total)
    return float(total[0] / total[1])


def measure(loop: Loop, done: Progress, tokens_per_step: int) -> float:
    """A held-out measurement into the curve, and the early-stopping count."""
    loss = heldout_loss(loop)
    ppl = math.exp(loss) if loss < 700 else math.inf
    done.curve.append(
        CurvePoint(step=done.step, tokens=done.step * tokens_per_step, heldout_loss=loss, heldout_ppl=ppl)
    )
    if loss < done.best:
        done.best, done.best_step, done.stale = loss, done.step, 0
        if loop.patience is not None:  # early stopping keeps the best weights: a copy off the device
            done.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in trained(loop.model)}
    else:
        done.stale += 1
    return loss


def trained(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def restore(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value)


def run(loop: Loop, done: Progress, commit: Callable[[Progress], None] | None) -> Progress:
    """Train from `done.step` to the last step (or an early stop); `commit` saves the state every N steps."""
    per_step = loop.batch_size * loop.grad_accum * world(loop) * loop.train.shape[1]
    lead = loop.group is None or loop.group.lead
    loop.model.train()
    if not done.curve:
        measure(loop, done, per_step)
    with progress(not lead) as bar:
        task = bar.add_task("finetune", total=loop.steps, completed=done.step, info="")
        while done.step < loop.steps:
            t0 = time.perf_counter()
            loss = one_step(loop, done.step)
            done.step_seconds += time.perf_counter() - t0
            done.step += 1
            info = f"loss {loss:.4f}"
            if done.step % loop.eval_every == 0 or done.step == loop.steps:
                info += f"  held-out {measure(loop, done, per_step):.4f}"
            bar.update(task, advance=1, info=info)
            if loop.patience is not None and done.stale >= loop.patience:
                done.stopped_early = True
                break
            if commit is not None and done.step % loop.save_every == 0 and done.step < loop.steps:
                commit(done)
    if done.curve[-1].step != done.step:
        measure(loop, done, per_step)
    if done.best_weights is not None:
        restore(loop.model, done.best_weights)
    loop.model.eval()
    return done


# ----------------------------------------------------------------------------------------------- state


def save_state(folder: Path, loop: Loop, done: Progress, key: dict[str, Any]) -> None:
    """The training state, written whole or not at all (a temporary file renamed, flushed to the disk)."""
    state = {
        "key": key,
        "trained": {n: p.detach().cpu() for n, p in trained(loop.model)},
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "progress": {**done.__dict__, "curve": [c.dump() for c in done.curve]},  # with the best weights
    }
    path = folder / STATE_FILE
    tmp = path.with_name(path.name + ".incomplete")
    torch.save(state, tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(folder)


def load_state(folder: Path, loop: Loop, key: dict[str, Any]) -> Progress | None:
    """The committed state of a killed run into `loop`; None where there is none (the run starts afresh)."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("key") != key:
        diff = sorted(k for k in set(key) | set(state.get("key", {})) if key.get(k) != state["key"].get(k))
        raise StadeError(f"--resume: the run in {str(folder)!r} was started with other settings ({', '.join(diff)}).",
                         "resume with the same arguments, or drop --resume to start afresh")  # fmt: skip
    restore(loop.model, state["trained"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    saved = dict(state["progress"])
    saved["curve"] = [CurvePoint.parse(c) for c in saved["curve"]]
    return Progress(**saved)
