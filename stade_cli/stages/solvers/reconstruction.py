"""Block-wise reconstruction: after a block is masked, tune its kept weights so its outputs match the dense block's.

The regional optimisation of Wanda++ (Yang et al., "Pruning Large Language Models via Regional Gradients",
ACL Findings 2025, section 3.2) and the local reconstruction of Roux, Zimmer, Wagner & Pokutta ("A Free Lunch in
LLM Compression: Revisiting Retraining after Pruning", arXiv 2510.14444): minimise the squared error between
the pruned block's outputs and the dense block's outputs on the calibration inputs, one decoder block at a
time, with the sparsity mask held fixed. What is followed and what differs:

- The whole decoder block is the reconstruction window (Free Lunch: any window holding a nonlinear submodule
  does about as well; a single matrix does worse). Trained: every linear layer's kept weights, and its bias
  where it has one. Norms and embeddings stay as they are.
- Targets are the DENSE block's outputs on the block's own inputs: the dense model's inputs one-shot, the
  pruned predecessors' outputs with `--sequential` (Free Lunch's sequential variant).
- The mask is fixed (Wanda++ re-masks between iterations; here the mask is the chosen stage's, kept exactly):
  gradients of pruned entries are zeroed and the weights multiplied by the mask after every step.
- Adam in float32 master weights (even for bfloat16/float16 models), learning rate `lr` with a cosine decay to
  zero over the step budget (Free Lunch trains with Adam and a decaying schedule; Wanda++'s RMSprop at 3e-7
  for 5 x 32 samples moved our SmolLM2 blocks too little to measure).
- 1/8 of the calibration windows are held out: their loss is checked every `eval_every` steps, the best
  weights are kept (so the held-out loss never rises), and training stops after `patience` checks without gain.

Memory: the block (plus its float32 master copy and Adam's two moments), its inputs and the dense targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.models.blocks import BlockInputs
from stade_cli.models.layers import linear_layers


class BlockParameters(Protocol):
    """What the reconstruction reads of its settings (reconstructions/block.py's BlockSettings)."""

    @property
    def steps(self) -> int: ...  # Adam steps, at most (it stops early)
    @property
    def lr(self) -> float: ...  # Adam's peak learning rate, cosine-decayed to zero over the steps
    @property
    def windows_per_step(self) -> int: ...  # calibration windows in one optimiser step
    @property
    def holdout(self) -> int: ...  # one window in `holdout` is held out for early stopping
    @property
    def eval_every(self) -> int: ...  # steps between held-out checks
    @property
    def patience(self) -> int: ...  # checks without improvement before stopping


# ----------------------------------------------------------------------------------------------- helpers


def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _float32(obj: Any) -> Any:
    """Floating tensors (rotary tables, additive masks) in float32, like the master weights."""
    return _map(obj, lambda t: t.float() if t.is_floating_point() else t)


def _rows(obj: Any, rows: torch.Tensor, batch: int) -> Any:
    """The given windows of a batch's call arguments: tensors with the batch as first dimension are sliced."""
    if batch == 1:
        return obj
    return _map(obj, lambda t: t.index_select(0, rows.to(t.device)) if t.dim() and t.shape[0] == batch else t)


@dataclass
class _Chunk:
    """Some windows of one stored batch: hidden states, call arguments and dense targets, on the device."""

    hidden: torch.Tensor  # (b, L, hidden) float32
    args: tuple
    kwargs: dict
    target: torch.Tensor  # (b, L, hidden) float32


def _chunk_maker(inputs: BlockInputs, targets: list[torch.Tensor], device: torch.device) -> Callable[..., _Chunk]:
    """Chunks are built when needed: the stored activations may live on the CPU while the block is on a GPU."""

    def make(batch: int, rows: list[int]) -> _Chunk:
        h = inputs.hidden[batch]
        idx = torch.tensor(rows, dtype=torch.long)
        n = h.shape[0]
        args, kwargs = inputs.calls[0][batch]  # `inputs` holds this block's own calls only (BlockInputs.of_block)
        return _Chunk(
            h.index_select(0, idx.to(h.device)).to(device, torch.float32),
            _float32(_rows(args, idx, n)),
            _float32(_rows(kwargs, idx, n)),
            targets[batch].index_select(0, idx.to(targets[batch].device)).to(device, torch.float32),
        )

    return make


class _Storage:
    """The block's own tensors, so that after float32 training the results are copied back into them in place
    (as `layers.set_weight` does: the original storage, possibly a mapped file's pages, is what stays)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.params = {n: p.data for n, p in block.named_parameters()}
        self.buffers = {n: b for n, b in block.named_buffers()}

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.block.named_parameters():
                own = self.params[n]
                if p.data is not own:
                    own.copy_(p.data)
                    p.data = own
            for n, own in self.buffers.items():
                path, _, attr = n.rpartition(".")
                mod = self.block.get_submodule(path) if path else self.block
                mod._buffers[attr] = own


def _forward(block: nn.Module, chunk: _Chunk) -> torch.Tensor:
    out = block(chunk.hidden, *chunk.args, **chunk.kwargs)
    return out[0] if isinstance(out, tuple) else out


def split_windows(
    batches: list[int], seed: int, holdout: int = 8, per_step: int = 1
) -> tuple[list[tuple[int, list[int]]], list[tuple[int, list[int]]]]:
    """(train, held-out) as (batch, window rows) lists; one window in `holdout` is held out, chosen by `seed`, and
    the training windows go `per_step` to a step."""
    total = sum(batches)
    hold = total // holdout if total >= 2 else 0
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:hold])
    train: list[tuple[int, list[int]]] = []
    heldout: list[tuple[int, list[int]]] = []
    start = 0
    for b, n in enumerate(batches):
        rows = range(start, start + n)
        t = [r - start for r in rows if r not in held]
        h = [r - start for r in rows if r in held]
        for i in range(0, len(t), per_step):
            train.append((b, t[i : i + per_step]))
        if h:
            heldout.append((b, h))
        start += n
    return train, heldout


# ----------------------------------------------------------------------------------------------- block


def _trainable(block: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Every linear layer's weight with its mask (True where kept: an exact zero stays zero), and its bias (None:
    trained everywhere), set to train; everything else in the block frozen."""
    params: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    for frozen in block.parameters():
        frozen.requires_grad_(False)
    for mod in linear_layers(block).values():
        w, bias = mod.weight, getattr(mod, "bias", None)
        assert isinstance(w, torch.Tensor)
        masks.append(w != 0)  # the mask chosen by the pruning stage
        params.append(w)
        if isinstance(bias, torch.Tensor):
            masks.append(None)
            params.append(bias)
    for p in params:
        p.requires_grad_(True)
    return params, masks


def _heldout_loss(block: nn.Module, heldout: list[tuple[int, list[int]]], make: Callable[..., _Chunk]) -> float | None:
    """Relative squared error of the block on the held-out windows (None where none is held out)."""
    if not heldout:
        return None
    err = tot = 0.0
    with torch.no_grad():
        for b, rows in heldout:
            c = make(b, rows)
            err += float((_forward(block, c) - c.target).double().square().sum())
            tot += float(c.target.double().square().sum())
    return err / max(tot, 1e-30)


def _masked_step(block: nn.Module, chunk: _Chunk, params: list, masks: list, opt: Any, sched: Any) -> None:
    """One Adam step on the squared error, with pruned entries' gradients zeroed and the mask re-applied after."""
    loss = (_forward(block, chunk) - chunk.target).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p, m in zip(params, masks, strict=True):
        if m is not None and p.grad is not None:
            p.grad.mul_(m)
    opt.step()
    sched.step()
    with torch.no_grad():
        for p, m in zip(params, masks, strict=True):
            if m is not None:
                p.mul_(m)


def reconstruct_block(
    block: nn.Module,
    inputs: BlockInputs,
    targets: list[torch.Tensor],
    device: torch.device,
    settings: BlockParameters,
    seed: int = 0,
) -> dict[str, Any]:
    """Tune `block` (already masked, on `device`) in place; returns the held-out losses before and after.

    `inputs` are the block's inputs per batch and `targets` the dense block's outputs on them. Losses are
    relative: sum of squared errors over the sum of squared targets.
    """
    steps = settings.steps
    sizes = [h.shape[0] for h in inputs.hidden]
    train, heldout = split_windows(sizes, seed, settings.holdout, settings.windows_per_step)
    if not train:
        raise StadeError("Block reconstruction needs at least one calibration window to train on.", "calibrate more")
    make = _chunk_maker(inputs, targets, device)
    storage = _Storage(block)
    block.float()  # float32 master weights for the duration (a no-op for a float32 block)
    params, masks = _trainable(block)
    opt = torch.optim.Adam(params, lr=settings.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    before = best = _heldout_loss(block, heldout, make)
    best_state = [p.detach().clone() for p in params] if heldout else None
    best_step, since, step = 0, 0, 0
    order: list[int] = []
    while step < steps:
        if not order:
            order = torch.randperm(len(train), generator=gen).tolist()
        _masked_step(block, make(*train[order.pop()]), params, masks, opt, sched)
        step += 1
        if heldout and (step % settings.eval_every == 0 or step == steps):
            now = _heldout_loss(block, heldout, make)
            assert now is not None and best is not None and best_state is not None
            if now < best:
                best, best_step, since = now, step, 0
                for keep, p in zip(best_state, params, strict=True):
                    keep.copy_(p.detach())
            else:
                since += 1
                if since >= settings.patience:
                    break
    if best_state is not None:
        with torch.no_grad():
            for keep, p in zip(best_state, params, strict=True):
                p.copy_(keep)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    storage.restore()
    return {
        "heldout_before": before,
        "heldout_after": best,
        "steps_run": step,
        "best_step": best_step if heldout else step,
        "train_windows": sum(len(r) for _, r in train),
        "heldout_windows": sum(len(r) for _, r in heldout),
    }
