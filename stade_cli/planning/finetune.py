"""The memory and disk terms of `stade finetune` (driver/finetune.py, driver/training.py), from the shapes alone.

The student trains in float32 (its master weights; on a GPU its forward runs under bfloat16 autocast), so each
term is what that code allocates:

- full mode: the weights, their gradients and AdamW's two moments, all float32, every parameter trained; on a GPU,
  autocast's bfloat16 copies of the weights, which the backward pass keeps; the keep masks (one bool per pruned
  weight);
- `--lora R`: the weights (frozen, float32) and the masks, the adapters A (R x in) and B (out x R) with their
  gradients and moments; each layer's weight with its update, W + s (B A) * M, is made again in the backward pass
  rather than kept (lora.py), so one layer's, with its update's float32 gradient, at a time;
- the activations the backward pass keeps: per block and token, every layer group's input, every layer's output,
  the residual stream into the two norms and the MLP's activation (an estimate of what autograd saves: on a Llama,
  within 1% in full mode, 20% above with LoRA, whose frozen norms keep less); with --gradient-checkpointing, each
  block's input alone, and one block's activations while it is recomputed;
- the loss: one chunk of `LOGITS_CHUNK` positions' float32 logits at a time, with their log-softmax and gradient
  (and the teacher's, with a teacher);
- the teacher (the dense model): its weights in its own compute dtype, one block's activations at a time (no
  gradients) and its final hidden states for the step;
- disk: the checkpoint (in the pruned checkpoint's dtype) and, while the run goes, the training state (the trained
  parameters and AdamW's moments, float32; twice while a new one replaces the old).
"""

from __future__ import annotations

from dataclasses import dataclass

from stade_cli.base.dtypes import size_of
from stade_cli.planning.memory import SMALL_FILES, TEXT_SOURCE, Context, StagePlan
from stade_cli.planning.shapes import Shapes, activation_bytes
from stade_cli.stages.finetune.losses import LOGITS_CHUNK

F32 = 4


@dataclass(frozen=True)
class FinetunePlan:
    """What of a `stade finetune` run the plan needs: its mode, its teacher and how it keeps activations."""

    lora: int | None = None  # the adapters' rank; None: full fine-tuning
    teacher: bool = True
    gradient_checkpointing: bool = False
    patience: bool = False  # early stopping keeps a copy of the best weights in host RAM


def pruned_weights(s: Shapes) -> int:
    """Every block's linear weights (what prune prunes, and what the masks cover)."""
    return s.linear_params * s.n_blocks


def lora_params(s: Shapes, rank: int) -> int:
    """The adapters: A (rank x in) and B (out x rank) for every pruned layer."""
    return s.n_blocks * sum(rank * (o + i) for members in s.groups.values() for o, i in members)


def trained_params(s: Shapes, plan: FinetunePlan) -> int:
    return s.params if plan.lora is None else lora_params(s, plan.lora)


def saved_per_token(s: Shapes) -> int:
    """Elements autograd keeps per token in one block: every layer group's input, every layer's output, the residual
    stream into the two norms, and the MLP's activation."""
    inputs = sum(members[0][1] for members in s.groups.values())
    outputs = sum(o for members in s.groups.values() for o, _i in members)
    return inputs + outputs + 2 * s.hidden + s.intermediate


def activations(ctx: Context, plan: FinetunePlan, tokens: int, elem: int) -> dict[str, int]:
    """What the backward pass of one micro-batch of `tokens` tokens needs kept, by term."""
    s = ctx.shapes
    block = saved_per_token(s) * tokens * elem
    if plan.gradient_checkpointing:
        terms = {
            "block inputs (checkpointed)": s.n_blocks * tokens * (s.hidden * elem + s.arg_bytes_per_token),
            "one block's activations (recomputed)": block,
        }
    else:
        terms = {"activations": s.n_blocks * block + tokens * s.arg_bytes_per_token}
    if plan.lora is not None:  # W + s (B A) * M and its update's float32 gradient, made again in the backward (lora.py)
        terms["one layer's update (backward)"] = max(o * i for group in s.groups.values() for o, i in group) * (
            elem + 4
        )
    terms["final hidden states"] = 2 * tokens * s.hidden * elem  # the final norm's input and output
    return terms


def loss_chunk(ctx: Context, plan: FinetunePlan, batch: int) -> dict[str, int]:
    """One chunk's float32 logits, their log-softmax and gradient; the teacher's logits and log-probabilities."""
    positions = batch * min(LOGITS_CHUNK, ctx.seqlen - 1) * ctx.shapes.vocab
    terms = {"logits chunk": 3 * positions * F32}
    if plan.teacher:
        terms["teacher logits chunk"] = 3 * positions * F32
    return terms


def teacher_terms(ctx: Context, tokens: int) -> dict[str, int]:
    s, e = ctx.shapes, ctx.elem
    return {
        "teacher weights": s.params * e,
        "teacher activations (one block)": activation_bytes(s, tokens, e, False),
        "teacher final hidden states": tokens * s.hidden * e,
    }


def finetune_plan(ctx: Context, plan: FinetunePlan) -> StagePlan:
    """finetune: the student's weights, what training adds (gradients and moments, or adapters), the activations,
    the loss's chunk and the teacher; the checkpoint and the training state on disk."""
    s = ctx.shapes
    batch = min(ctx.batch_size, ctx.nsamples)
    tokens = batch * ctx.seqlen
    elem = 2 if ctx.gpu else F32  # bfloat16 autocast on a GPU, float32 on the CPU
    trained = trained_params(s, plan)
    work = {"weights (float32)": s.params * F32}
    if plan.lora is None:
        work |= {"gradients": trained * F32, "AdamW moments": 2 * trained * F32, "masks": pruned_weights(s)}
        if ctx.gpu:
            work["bfloat16 copies of the weights (autocast)"] = s.params * 2
    else:
        work |= {"masks": pruned_weights(s), "adapters": trained * F32}
        work |= {"adapter gradients": trained * F32, "AdamW moments": 2 * trained * F32}
    work |= activations(ctx, plan, tokens, elem) | loss_chunk(ctx, plan, batch)
    if plan.teacher:
        work |= teacher_terms(ctx, tokens)
    state = trained * 3 * F32 + (trained * F32 if plan.patience else 0)
    result = StagePlan(disk=s.params * size_of(ctx.own) + SMALL_FILES, scratch=2 * state)
    host = {**ctx.common, "training text": TEXT_SOURCE}
    if plan.patience:
        host["best weights (a copy)"] = trained * F32
    if ctx.gpu:  # the masks read here, then copied to the device (on the CPU they are the same tensors)
        result.device = work
        result.host = {**host, "weights (loaded here first)": s.params * F32, "masks (read)": pruned_weights(s)}
    else:
        result.host = {**host, **work}
        result.device = dict(result.host)
    return result
