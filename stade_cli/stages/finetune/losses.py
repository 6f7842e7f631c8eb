"""The fine-tuning loss on next-token logits: KL divergence from a dense teacher (knowledge distillation, Hinton,
Vinyals & Dean 2015, "Distilling the knowledge in a neural network"), the LM loss (cross-entropy on the next token),
or a mix `kd_weight * KD + (1 - kd_weight) * LM`.

The logits are made a chunk of positions at a time, and each chunk's loss is checkpointed (recomputed in the
backward pass): neither the student's nor the teacher's float32 logits [batch, seqlen, vocab] ever exist whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

LOSS_KINDS = ("kd", "lm", "mix")
LOGITS_CHUNK = 256  # positions whose float32 logits exist at once


@dataclass(frozen=True)
class LossSpec:
    """What the loss is: `kd_weight` 1 for pure distillation, 0 for the LM loss; `temperature` softens both."""

    kd_weight: float
    temperature: float = 1.0
    chunk: int = LOGITS_CHUNK


Head = Callable[[torch.Tensor], torch.Tensor]  # final hidden states (B, c, H) -> logits (B, c, V)


def chunk_loss(
    head: Head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    spec: LossSpec,
) -> torch.Tensor:
    """The summed loss of one chunk of positions: hidden (B, c, H), targets (B, c), teacher logits (B, c, V)."""
    logits = head(hidden).float()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    if spec.kd_weight < 1:
        lm = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).sum()
        total = total + (1 - spec.kd_weight) * lm
    if spec.kd_weight > 0 and teacher_logits is not None:
        t = spec.temperature
        logp = torch.log_softmax(logits / t, dim=-1)
        t_logp = torch.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = (t_logp.exp() * (t_logp - logp)).sum()  # KL(teacher || student), summed over positions
        total = total + spec.kd_weight * t * t * kl  # T^2 keeps the gradient's scale (Hinton et al. 2015)
    return total


def sequence_loss(
    head: Head,
    hidden: torch.Tensor,
    windows: torch.Tensor,
    spec: LossSpec,
    teacher: Callable[[int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The mean loss per predicted token of windows (B, T), from the student's final hidden states (B, T, H).

    `teacher(start, end)` gives the teacher's logits of positions [start, end) (B, c, V), made on demand.
    Every chunk but the loss is recomputed in the backward pass, so a chunk's logits are the largest tensor held.
    """
    steps = windows.shape[1] - 1
    targets = windows[:, 1:]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, steps, spec.chunk):
        end = min(start + spec.chunk, steps)
        t_logits = teacher(start, end) if teacher is not None and spec.kd_weight > 0 else None
        args = (head, hidden[:, start:end], targets[:, start:end], t_logits, spec)
        if torch.is_grad_enabled() and hidden.requires_grad:
            part = checkpoint(chunk_loss, *args, use_reentrant=False)
        else:
            part = chunk_loss(*args)
        total = total + part
    return total / (windows.shape[0] * steps)
