"""`stade plan`: what a run will need (device memory, host RAM, disk, time) from the model's config alone.

No weights are loaded: the shapes come from a meta-device model (accelerate's init_empty_weights), the
layer groups (layers sharing one input, whose statistics are stored once) from one block run on the meta
device with the same hooks calibration uses. The prune plan is made from the runs that will run (PruneConfig):
each chosen stage states its own working memory, and the disk is every checkpoint's weight files, exactly.
Every memory term is what the code allocates (memory.py):

- calibrate (models.blocks.capture_inputs, stats.collect): the weights outside the blocks while the block inputs
  are captured; then, with those dropped (weights.outside_on_disk), one block's weights (weights.materialized); the
  hidden states of every window twice, the block's inputs and its outputs, plus the other call arguments (rotary
  tables) of every batch; one batch's activations; the block's float32 Hessian accumulators (scaled in place);
  every layer group's float64 mean and m2 (kept until the artifact is written). The peak is the larger phase.
- prune (driver.loop): everything outside the blocks (read whole, written to every output, then dropped), with an
  allocation's pass over the blocks; then one block (float32 on the CPU, the model's own dtype on a GPU) in each of
  the loop's phases: a sequential run's collection, the pruning with the most demanding run's stages (the update's
  and the reconstruction's own working memory), and the run that makes the next inputs; a dense copy of the block
  for a sweep, and the block inputs of every run that keeps them (sequential, or reconstructing).
- eval: the whole model on the device, one batch's activations and a chunk of float32 log-probabilities.
- finetune (where asked): the weights and what training adds, the activations, the loss's chunk of logits and the
  teacher; the checkpoint and the training state on disk (planning/finetune.py).
- measured, not derived: the libraries, the tokenizer with the model's skeleton, and the heap that
  sampling windows from a text source leaves behind (constants, from bench/plan.py).

The time figure is an estimate: one block's forward pass on a batch of the planned shape, timed on the
current device with random weights, times the forward passes the run makes. Reading weights from disk
and the pruning maths are not in it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stade_cli.base.dtypes import HESSIAN_DTYPES, dtype_name, parse_dtype, size_of
from stade_cli.base.errors import StadeError
from stade_cli.planning.finetune import FinetunePlan, finetune_plan
from stade_cli.planning.memory import (
    TEXT_SOURCE,
    Context,
    StagePlan,
    calibrate_plan,
    eval_plan,
    prune_plan,
    weight_files_bytes,
)
from stade_cli.planning.shapes import Shapes, block_call, read_shapes
from stade_cli.stages.config import PruneConfig
from stade_cli.stages.stage import INPUTS

GiB = 2**30
LIBRARIES = int(0.37 * GiB)  # peak RSS of the interpreter plus torch, transformers and stade (bench/plan.py baseline)
# The tokenizer plus the model's skeleton (and the plan's own, each command plans first) grow with the vocabulary,
# at their peak while they load (in-process RSS, SmolLM2's 49k: 85 MiB; bench/plan.py).
TOKENIZER_PER_VOCAB = 1800


@dataclass(frozen=True)
class PlanConfig:
    nsamples: int = 128
    seqlen: int | None = None  # None: min(context, 2048), as calibrate
    hessian: bool = False
    hessian_dtype: str = "float32"
    configs: tuple[PruneConfig, ...] = ()  # the prune runs; none: wanda at 50%
    batch_size: int = 8
    dtype: str | None = None  # None: the model's own on a GPU, float32 on the CPU (as load_model)
    timed: bool = True
    data: str = "sample-wiki"  # a text source, or a .safetensors file of token ids
    saved_dtype: str | None = None  # prune's --dtype: the checkpoints' (None: the model's own)
    eval_tokens: int | None = None  # eval: at most this many tokens in a --ppl text, so at most // seqlen windows
    finetune: FinetunePlan | None = None  # plan `stade finetune` too
    finetune_tokens: int | None = None  # its training budget (for the time estimate)

    def __post_init__(self) -> None:
        parse_dtype(self.hessian_dtype, HESSIAN_DTYPES, "--hessian-dtype")  # refused by name, as calibrate does

    @property
    def runs(self) -> tuple[PruneConfig, ...]:
        return self.configs or (PruneConfig("wanda", 0.5),)


@dataclass
class Plan:
    model: str
    device: str
    dtype: str
    nsamples: int
    seqlen: int
    shapes: Shapes
    stages: dict[str, StagePlan]
    notes: list[str]
    checkpoints: dict[str, int]  # each prune run's weight files, exactly, by its folder name

    @property
    def checkpoint_bytes(self) -> int:
        """The first run's weight files, exactly."""
        return next(iter(self.checkpoints.values()))

    @property
    def artifact_bytes(self) -> int:
        return self.stages["calibrate"].disk

    def line(self, stage: str) -> str:
        """The one-line plan a command prints at start."""
        s = self.stages[stage]
        where = "host RAM" if self.device == "cpu" else f"{self.device} memory"
        parts = [f"plan ({stage}): peak {where} ~{_gb(s.device_bytes)}"]
        if self.device != "cpu":
            parts.append(f"host RAM ~{_gb(s.host_bytes)}")
        if s.disk:
            parts.append(f"disk {_gb(s.disk)}" + (f" (+{_gb(s.scratch)} while it runs)" if s.scratch else ""))
        if s.seconds is not None:
            parts.append(f"~{_duration(s.seconds)} (estimate)")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "parameters": self.shapes.params,
            "blocks": self.shapes.n_blocks,
            "artifact_bytes": self.artifact_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "checkpoints": self.checkpoints,
            "stages": {
                k: {
                    "device_bytes": s.device_bytes,
                    "host_bytes": s.host_bytes,
                    "disk_bytes": s.disk,
                    "scratch_disk_bytes": s.scratch,
                    "seconds_estimate": None if s.seconds is None else round(s.seconds, 1),
                    "device_terms": s.device,
                    "host_terms": s.host,
                }
                for k, s in self.stages.items()
            },
            "notes": self.notes,
        }


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


# ----------------------------------------------------------------------------------------------- the plan


def _context(spec: str, config: PlanConfig, device: torch.device, cache_dir: str | None) -> Context:
    from transformers import AutoConfig

    from stade_cli.models.loading import default_dtype, default_seqlen
    from stade_cli.models.weights import planned_loading

    path = config_path(spec)
    try:
        hf_config = AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        raise StadeError(f"Could not read the config of {spec!r}: {str(exc).splitlines()[0]}") from exc
    compute = parse_dtype(config.dtype) or default_dtype(path, device, cache_dir)
    own = default_dtype(path, device, cache_dir, own_dtype=True)
    shapes, model = read_shapes(hf_config, compute)
    seqlen = config.seqlen or default_seqlen(model)
    if shapes.context is not None and seqlen > shapes.context:
        raise StadeError(f"--seqlen {seqlen} is above the model's context of {shapes.context} tokens.")
    nsamples = config.nsamples
    if config.eval_tokens is not None:  # eval: a batch holds no more windows than the longest text makes
        nsamples = max(1, min(nsamples, config.eval_tokens // seqlen))
    hidden_all = 2 * nsamples * seqlen * shapes.hidden * size_of(compute)
    gpu = device.type == "cuda"
    loading = planned_loading(path, model, cache_dir)
    return Context(
        shapes, model, nsamples, seqlen, config.batch_size, compute,
        default_dtype(path, device, cache_dir),  # prune: float32 on the CPU, the model's own on a GPU
        own, parse_dtype(config.saved_dtype) or own, gpu, gpu and _fits_on_device(hidden_all, device),
        {"libraries": LIBRARIES, "tokenizer and skeleton": TOKENIZER_PER_VOCAB * shapes.vocab}, loading,
    )  # fmt: skip


def make_plan(spec: str, config: PlanConfig, device: torch.device, cache_dir: str | None = None) -> Plan:
    """The plan for calibrate, the prune runs and eval of `spec` on `device`, from its config alone."""
    ctx = _context(spec, config, device, cache_dir)
    text = ctx.tokens * 8 if config.data.endswith(".safetensors") else TEXT_SOURCE
    stages = {
        "calibrate": calibrate_plan(ctx, config.hessian, config.hessian_dtype, text),
        "prune": prune_plan(ctx, config.runs),
        "eval": eval_plan(ctx),
    }
    if config.finetune is not None:
        stages["finetune"] = finetune_plan(ctx, config.finetune)
    notes = [
        "memory: peak estimates from the shapes (see `stade plan --help`); the CUDA context comes on top"
        if ctx.gpu
        else "memory: peak host RSS estimates from the shapes, libraries included"
    ]
    if _has_experts(ctx.model):
        notes.append("MoE: the experts' statistics, Hessians and per-expert work are not in these estimates")
    absent = ctx.gpu and not torch.cuda.is_available()
    if absent:
        notes.append("planned for a GPU that is not on this machine: not timed; block inputs counted in host RAM")
    if config.timed and not absent:
        notes.append(_time_stages(ctx, config, stages, device))
    notes += _selection_notes(ctx, config.runs)
    checkpoints = {c.name: weight_files_bytes(ctx, c) for c in config.runs}
    compute = dtype_name(ctx.compute)
    return Plan(spec, str(device), compute, config.nsamples, ctx.seqlen, ctx.shapes, stages, notes, checkpoints)


def _time_stages(ctx: Context, config: PlanConfig, stages: dict[str, StagePlan], device: torch.device) -> str:
    """Time one block's forward here, and set each stage's estimate from the forward passes it makes."""
    from stade_cli.models.layers import find_blocks

    batch = min(config.batch_size, config.nsamples)
    t = _time_block(ctx.model, find_blocks(ctx.model)[1], ctx.seqlen, batch, device, ctx.shapes)
    if t is None:
        return "time: one block does not fit in the free memory here, so it was not timed"
    forwards = ctx.shapes.n_blocks * -(-config.nsamples // config.batch_size)
    stages["calibrate"].seconds = t * forwards * (2.0 if config.hessian else 1.3)  # hooks; Hessian matmuls
    prune = 0.0
    for c in config.runs:
        if c.needs_inputs:
            prune += t * forwards * (2 if c.sequential and c.needs else 1)
        for st in c.stages:
            steps = getattr(c.settings_for(st), "steps", 0) if INPUTS in st.needs else 0
            prune += t / batch * 3 * steps * ctx.shapes.n_blocks  # a step: one window forward and backward
    stages["prune"].seconds = prune or None
    stages["eval"].seconds = t * forwards * 1.1
    ft = config.finetune
    if ft is not None and config.finetune_tokens:  # a step: forward and backward (3), a recompute, the teacher
        passes = 3 + ft.gradient_checkpointing + ft.teacher
        stages["finetune"].seconds = t / batch * passes * ctx.shapes.n_blocks * config.finetune_tokens / ctx.seqlen
    return (
        "time: an ESTIMATE, one block's forward timed on random weights here, times the forward passes "
        "(disk reads and pruning maths not included)"
    )


def _selection_notes(ctx: Context, runs: tuple[PruneConfig, ...]) -> list[str]:
    """How many layers --only / --ignore keep dense (their patterns checked against the model's layer names); the
    checkpoint's size is the same, and the memory and time are planned as if every layer were pruned."""
    notes = []
    names = [f"{ctx.shapes.blocks_name}.{i}.{n}" for i in range(ctx.shapes.n_blocks) for n in ctx.shapes.fed_by_norm]
    for selection in dict.fromkeys(c.layers for c in runs if c.layers):
        selection.check(names)
        dense = sum(not selection.pruned(n) for n in names)
        given = ", ".join(f"--{k} {','.join(v)}" for k, v in (selection.record() or {}).items() if v)
        notes.append(f"layers: {dense} of {len(names)} prunable layers kept dense ({given})")
    return notes


def _has_experts(model: Any) -> bool:
    from stade_cli.models.experts import fused_experts
    from stade_cli.models.layers import find_blocks

    return bool(fused_experts(find_blocks(model)[1][0]))


def config_path(spec: str) -> str:
    """A folder holding a config.json (weights or not: the plan reads none), a config.json file, or a model spec."""
    from pathlib import Path

    from stade_cli.models.loading import gguf_config, resolve_model

    p = Path(spec).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        return str(p.parent)
    if (p / "config.json").is_file():
        return str(p)
    return gguf_config(spec) or resolve_model(spec)


def _fits_on_device(need: int, device: torch.device) -> bool:
    """blocks._keep_on's rule: block inputs stay on the GPU when they take under 40% of its free memory
    (a GPU that is not here: assumed not, so the plan counts them in host RAM)."""
    if not torch.cuda.is_available():
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return need < 0.4 * free


def _time_block(
    model: nn.Module, blocks: Any, seqlen: int, batch: int, device: torch.device, shapes: Shapes
) -> float | None:
    """Seconds for one block's forward on one batch, random weights, on `device` (the CPU times one window
    and scales by the batch: the block is linear in the batch)."""
    need = shapes.block_params * size_of(shapes.own_dtype) * 2
    if need > available_memory(device):
        return None
    timed_batch = batch if device.type == "cuda" else 1
    args, kwargs = block_call(model, blocks, seqlen, timed_batch, device)
    block = blocks[0]
    block.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        hidden = torch.randn(args[0].shape, generator=gen, device=device).to(args[0].dtype)
        best = float("inf")
        for _ in range(2):  # the first run warms up kernels and allocators
            _sync(device)
            t0 = time.perf_counter()
            block(hidden, *args[1:], **kwargs)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    block.to("meta")
    return best * batch / timed_batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- checks


def available_memory(device: torch.device) -> int:
    """Free CUDA memory on a GPU; the host's available RAM (MemAvailable) on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(plan: Plan, stage: str, device: torch.device, out: Any | None = None) -> None:
    """Refuse, with the numbers, a run the device memory (host RAM on the CPU) or the disk cannot hold."""
    from pathlib import Path

    from stade_cli.base.files import check_space

    s = plan.stages[stage]
    need = s.device_bytes - (LIBRARIES if device.type == "cpu" else 0)  # the libraries are loaded already
    free = available_memory(device)
    if need > free:
        where = "host RAM available" if device.type == "cpu" else f"free memory on {device}"
        raise StadeError(
            f"{stage} needs about {_gb(need)} of {'RAM' if device.type == 'cpu' else 'device memory'}, "
            f"but only {_gb(free)} of {where}.",
            "lower --batch-size, --nsamples or --seqlen, or use --device auto to run where there is more memory",
        )
    if out is not None and s.disk:
        check_space(Path(out), s.disk + s.scratch)


def ids_shape(path: str) -> tuple[int, int] | None:
    """(n, seqlen) of a .safetensors file of token ids, from its header alone; None if it has no 2-D ids."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            shape = f.get_slice(keys[0]).get_shape() if keys else []
    except Exception:  # unreadable here: calibrate's own checks name the problem
        return None
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None


def preflight(
    stage: str, spec: str, config: PlanConfig, device: torch.device, out: Any | None, cache_dir: str | None
) -> str:
    """The one-line plan a command prints at start; refuses (StadeError) a run that cannot fit.

    A model whose config cannot be planned (a .gguf file, an architecture the meta-device pass cannot run)
    gets a line that says so, and the run goes on: the plan is advice, the run is what the user asked for.
    """
    if spec.endswith(".gguf"):
        return f"plan ({stage}): not available for a .gguf file"
    try:
        plan = make_plan(spec, config, device, cache_dir)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"plan ({stage}): not available for this model ({first})"
    check_fits(plan, stage, device, out)
    return plan.line(stage)
