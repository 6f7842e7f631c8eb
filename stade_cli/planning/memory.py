"""The memory and disk terms of each stage, each what one piece of the code allocates (see plan.py's docstring).

The prune terms come from the runs that will run (PruneConfig): each chosen stage states its own working memory
(stage.Workload), the block inputs are counted once per run that keeps them, an allocation's pass over the blocks
is a phase of its own, and the disk is every checkpoint's weight files, exactly, as the sinks will write them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from stade_cli.base.dtypes import BY_NAME, size_of
from stade_cli.models import hf
from stade_cli.planning.shapes import Shapes, activation_bytes, hessian_bytes, peak_phase
from stade_cli.stages.config import PruneConfig
from stade_cli.stages.stage import INPUTS, Stage, Workload

TEXT_SOURCE = 14 * 10**6  # heap a text source leaves after sampling windows (sample-wiki, measured by bench/plan.py)
HEADER_ENTRY = 200  # bytes of safetensors header per tensor, at most (name, dtype, shape, offsets)
MANIFEST_LAYER = 400  # bytes of manifest.json per linear layer, at most (name, shape, group, hash)
SMALL_FILES = 32 * 10**6  # config, generation config, tokenizer, stade.json and model card of a checkpoint, at most
LOGITS_CHUNK = 256  # perplexity.LOGITS_CHUNK: positions whose float32 log-probabilities exist at once


@dataclass
class StagePlan:
    device: dict[str, int] = field(default_factory=dict)  # term -> bytes
    host: dict[str, int] = field(default_factory=dict)
    disk: int = 0
    scratch: int = 0  # disk on top of `disk` while the run goes (calibrate's resumable progress), freed at its end
    seconds: float | None = None

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


@dataclass
class Context:
    """What every stage's terms read: the shapes, the run's sizes and where it runs."""

    shapes: Shapes
    model: Any  # the meta model
    nsamples: int
    seqlen: int
    batch_size: int
    compute: torch.dtype  # what calibrate and eval run in
    compute_prune: torch.dtype  # what prune runs in (float32 on the CPU, the checkpoint's own dtype on a GPU)
    own: torch.dtype  # the checkpoint's dtype
    saved: torch.dtype  # the dtype the pruned checkpoints are saved in
    gpu: bool
    hidden_on_device: bool
    common: dict[str, int]  # libraries, tokenizer and skeleton
    loading: str = "lazy"  # models.weights.planned_loading: "lazy", "whole" or "renamed"

    @property
    def elem(self) -> int:
        return size_of(self.compute)

    @property
    def elem_prune(self) -> int:
        return size_of(self.compute_prune)

    @property
    def tokens(self) -> int:
        return self.nsamples * self.seqlen

    @property
    def batch_tokens(self) -> int:
        return min(self.batch_size, self.nsamples) * self.seqlen

    def hidden(self, elem: int, copies: int = 2) -> int:
        """Hidden states of every window (`copies` of them: a block's inputs and its outputs), with the other call
        arguments (rotary tables) of every batch once."""
        return copies * self.tokens * self.shapes.hidden * elem + self.tokens * self.shapes.arg_bytes_per_token

    def outside(self, elem: int) -> dict[str, int]:
        """Everything outside the blocks, read whole (and its embeddings in the checkpoint's dtype beside); the
        whole model where it is not read block by block."""
        terms = {"embeddings and head": self.shapes.outside_params * elem}
        if self.loading != "lazy":
            terms = {"the model, whole (not read block by block)": self.shapes.params * elem}
        if elem != size_of(self.own):
            terms["the embeddings in the checkpoint's dtype"] = self.shapes.input_embedding_params * size_of(self.own)
        return terms

    def beside(self, outside: dict[str, int], loop: dict[str, int]) -> dict[str, int]:
        """The peak of the weights outside the blocks, dropped before the block loop, and the loop; a model held
        whole keeps them, and its blocks are in it rather than read."""
        if self.loading == "lazy":
            return peak_phase(outside, loop)
        return {**outside, **{k: v for k, v in loop.items() if k not in ("block", "block (read)")}}

    def workloads(self, elem: int) -> list[Workload]:
        """Every layer group of a block as a stage's memory estimate reads it (the stage's own formula says which
        group needs the most)."""
        one = activation_bytes(self.shapes, self.seqlen, elem, False)
        return [
            Workload(
                sum(o for o, _i in m),
                m[0][1],
                max(o * i for o, i in m),
                self.shapes.block_params,
                self.shapes.linear_params,
                self.tokens,
                self.seqlen,
                self.shapes.hidden,
                elem,
                one,
            )
            for m in self.shapes.groups.values()
        ]


def stage_memory(stage: Stage, config: PruneConfig, works: list[Workload]) -> int:
    """What `stage` states it needs on top of the block for its most demanding layer group (driver.prune's masking
    where it states nothing)."""
    if stage.memory is not None:
        return max(stage.memory(w, config.settings_for(stage)) for w in works)
    return max(w.masked for w in works) if stage.kind == "update" else 0


def calibrate_plan(ctx: Context, hessian: bool, hessian_dtype: str, text: int) -> StagePlan:
    """calibrate: the weights outside the blocks while the block inputs are captured; then one block, the hidden
    states of every window twice, one batch's activations, the block's Hessians, every group's mean and m2."""
    s, e = ctx.shapes, ctx.elem
    work = {
        "block": s.block_params * e,
        "activations": activation_bytes(s, ctx.batch_tokens, e, True),
        **({"hessians": hessian_bytes(s)} if hessian else {}),
    }
    kept = {"hidden states": ctx.hidden(e), "statistics": sum(2 * 8 * m[0][1] for m in s.groups.values()) * s.n_blocks}
    stats = kept["statistics"]  # the progress (stats.resume): every block's statistics, and at each commit the
    hidden = 2 * ctx.tokens * s.hidden * e  # hidden states leaving the last two blocks, both briefly on disk
    plan = StagePlan(disk=artifact_bytes(ctx, hessian, hessian_dtype, text), scratch=stats + hidden + 2 * HEADER_ENTRY)
    if ctx.gpu:
        plan.device = peak_phase(
            {"embeddings and head": s.outside_params * e}, {**work, **(kept if ctx.hidden_on_device else {})}
        )
        blocks = {"block (read)": s.block_params * e, **({} if ctx.hidden_on_device else kept)}
        plan.host = {**ctx.common, "calibration text": text, **ctx.beside(ctx.outside(e), blocks)}
    else:
        plan.host = {**ctx.common, "calibration text": text, **ctx.beside(ctx.outside(e), {**work, **kept})}
        plan.device = dict(plan.host)
    return plan


def artifact_tensors(shapes: Shapes, tokens: int, hessian: bool, hessian_dtype: str) -> int:
    """The statistics artifact's tensors, exactly: float64 mean and m2 per layer group, one Hessian per group (in
    --hessian-dtype), the int64 token ids."""
    ins = [members[0][1] for members in shapes.groups.values()]
    total = shapes.n_blocks * sum(2 * 8 * n for n in ins) + tokens * 8
    return total + (shapes.n_blocks * sum(n * n for n in ins) * size_of(BY_NAME[hessian_dtype]) if hessian else 0)


def artifact_bytes(ctx: Context, hessian: bool, hessian_dtype: str, text: int) -> int:
    """The statistics artifact on disk: its tensors, and a bound on the safetensors headers and the manifest (which
    lists every linear layer)."""
    s = ctx.shapes
    entries = s.n_blocks * len(s.groups) * (3 if hessian else 2) + 1
    layers = s.n_blocks * sum(len(m) for m in s.groups.values())
    return (
        artifact_tensors(s, ctx.tokens, hessian, hessian_dtype)
        + HEADER_ENTRY * entries
        + MANIFEST_LAYER * layers
        + 8192
    )


def _loop_phases(ctx: Context, configs: tuple[PruneConfig, ...], works: list[Workload]) -> list[dict[str, int]]:
    """The phases of one block in the block loop, each with what lives in it: the block (and its dense copy in a
    sweep) and every run's own block inputs throughout; then a sequential run's collection (one batch's activations
    and the block's Hessians); the pruning (the most demanding run's update and reconstruction, with the dense
    block's outputs a reconstruction tunes to); and the run of the block that makes the next inputs (one more set of
    hidden states while the old ones live, and a batch's activations)."""
    e = ctx.elem_prune
    held = {"block": ctx.shapes.block_params * e}
    if len(configs) > 1:
        held["dense copy of the block"] = ctx.shapes.block_params * e
    keeping = [c for c in configs if c.needs_inputs]
    tuned = [c for c in keeping if any(INPUTS in st.needs for st in c.stages)]  # keeps the dense outputs as targets
    stages = ("update", "reconstruct")
    work = max(sum(stage_memory(st, c, works) for st in c.stages if st.kind in stages) for c in configs)
    if not keeping:
        return [{**held, "layer group work": work}]
    copies = len(keeping)
    prune = {**held, "hidden states": ctx.hidden(e, copies + bool(tuned)), "layer group work": work}
    advance_copies = copies + 1 + any(c.sequential for c in tuned)
    advance = {**held, "hidden states": ctx.hidden(e, advance_copies)}
    phases = [prune, {**advance, "activations": activation_bytes(ctx.shapes, ctx.batch_tokens, e, False)}]
    if any(c.sequential and c.needs for c in keeping):
        collect = {**held, "hidden states": ctx.hidden(e, copies)}
        collect["activations"] = activation_bytes(ctx.shapes, ctx.batch_tokens, e, True)
        if any("hessian" in c.needs for c in keeping if c.sequential):
            collect["hessians"] = hessian_bytes(ctx.shapes)
        phases.append(collect)
    return phases


def prune_plan(ctx: Context, configs: tuple[PruneConfig, ...]) -> StagePlan:
    """prune (driver.loop): everything outside the blocks (read whole, written to every output), with an
    allocation's pass over the blocks; then, with those dropped, the block loop's phases. The disk: every
    checkpoint's weight files, exactly, and a bound on each one's small files and a sweep's summary."""
    e = ctx.elem_prune
    works = ctx.workloads(e)
    allocation = max(
        (stage_memory(st, c, works) for c in configs for st in c.stages if st.kind == "allocation"), default=0
    )
    outside = ctx.outside(e)
    if allocation:  # before the loop: each block read while the weights outside the blocks are still in memory
        outside |= {"block (allocation)": ctx.shapes.block_params * e, "allocation pass": allocation}
    if ctx.loading == "renamed":  # driver.sweep's save_pretrained route: a pass per checkpoint
        loop = max((peak_phase(*_loop_phases(ctx, (c,), works)) for c in configs), key=lambda t: sum(t.values()))
        if len(configs) > 1:  # driver.dense.Snapshot: the dense blocks, restored between the passes
            outside["the dense blocks (a copy, between passes)"] = ctx.shapes.block_params * ctx.shapes.n_blocks * e
    else:
        loop = peak_phase(*_loop_phases(ctx, configs, works))
    plan = StagePlan(disk=sum(weight_files_bytes(ctx, c) + SMALL_FILES for c in configs))
    if ctx.gpu:
        plan.device = loop
        plan.host = {**ctx.common, **ctx.beside(outside, {"block (read)": ctx.shapes.block_params * e})}
    else:
        plan.host = {**ctx.common, **ctx.beside(outside, loop)}
        plan.device = dict(plan.host)
    return plan


def weight_files_bytes(ctx: Context, config: PruneConfig) -> int:
    """One pruned checkpoint's weight files, exactly as the shard sink writes them: the shards with their headers
    (and the biases a bias update adds), and the index."""
    from stade_cli.driver.sinks import plan_layout

    model = ctx.model
    biased = [name for name, fed in ctx.shapes.fed_by_norm.items() if config.bias_layer(fed)]
    first = model.get_submodule(ctx.shapes.blocks_name + ".0")
    needs_switch = any(getattr(first.get_submodule(n), "bias", None) is None for n in biased)
    switches = hf.bias_switches(model.config) if needs_switch else {}
    if ctx.loading == "renamed":  # written by save_pretrained: every parameter once (and small headers)
        return ctx.shapes.params * size_of(ctx.saved)
    return plan_layout(model, switches, ctx.saved).bytes


def eval_plan(ctx: Context) -> StagePlan:
    """eval: the whole model on the device, one batch's activations and a chunk of float32 log-probabilities."""
    s, e = ctx.shapes, ctx.elem
    chunk = min(ctx.batch_size, ctx.nsamples) * min(LOGITS_CHUNK, ctx.seqlen) * s.vocab * 4 * 2
    work = {
        "weights": s.params * e,
        "activations": activation_bytes(s, ctx.batch_tokens, e, False),
        "log-probabilities chunk": chunk,
    }
    plan = StagePlan(host={**ctx.common, "evaluation text": TEXT_SOURCE})
    if ctx.gpu:
        plan.device = work
    else:
        plan.host |= work
        plan.device = dict(plan.host)
    return plan
