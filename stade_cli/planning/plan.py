"""`stade plan`: what a run will need (device memory, host RAM, disk, time) from the model's config alone.

No weights are loaded: the shapes come from a meta-device model (accelerate's init_empty_weights), the
layer groups (layers sharing one input, whose statistics are stored once) from one block run on the meta
device with the same hooks calibration uses. Every memory term is what the code allocates:

- calibrate (blocks.capture_inputs, calibrate.collect): the weights outside the blocks while the block inputs
  are captured; then, with those dropped (weights.outside_on_disk), one block's weights
  (weights.materialized); the hidden states of every window twice, the block's inputs and its outputs
  (`outs` fills while `inputs.hidden` is alive), plus the other call arguments (rotary tables) of every
  batch; one batch's activations; the block's float32 Hessian accumulators (scaled in place); every layer
  group's float64 mean and m2 (kept until the artifact is written). The peak is the larger phase.
- prune (streaming.stream_sweep): everything outside the blocks (read whole, written to every output, then
  dropped), or one block in the checkpoint's own dtype with one layer group's float32 working set (new
  weights and masks of the group, the error estimate's temporaries for one layer); for sparsegpt the
  group's Hessian and the factorisation's matrices; for --sequential, as calibrate.
- eval: the whole model on the device, one batch's activations and a chunk of float32 log-probabilities.
- measured, not derived: the libraries, the tokenizer with the model's skeleton, and the heap that
  sampling windows from a text source leaves behind (constants below, from bench/plan.py).

The time figure is an estimate: one block's forward pass on a batch of the planned shape, timed on the
current device with random weights, times the forward passes the run makes. Reading weights from disk
and the pruning maths are not in it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.models.layers import find_blocks
from stade_cli.planning.shapes import (
    Shapes,
    activation_bytes,
    block_call,
    group_work_bytes,
    hessian_bytes,
    peak_phase,
    read_shapes,
    size_of,
)

GiB = 2**30
LIBRARIES = int(0.37 * GiB)  # peak RSS of the interpreter plus torch, transformers and stade (bench/plan.py baseline)
# Two terms measured rather than derived (in-process RSS, SmolLM2, the heap trimmed): the tokenizer plus the
# model's skeleton (and the plan's own, each command plans first) grow with the vocabulary, at their peak while
# they load (SmolLM2's 49k: 85 MiB); sampling windows from a text source loads and tokenizes documents, and
# the heap keeps some of it (sample-wiki: 13 MiB). A token-id file costs its ids.
TOKENIZER_PER_VOCAB = 1800
TEXT_SOURCE = 14 * 10**6
LOGITS_CHUNK = 256  # perplexity.LOGITS_CHUNK: positions whose float32 log-probabilities exist at once
HEADER_ENTRY = 200  # bytes of safetensors header per tensor, at most (name, dtype, shape, offsets)
MANIFEST_LAYER = 400  # bytes of manifest.json per linear layer, at most (name, shape, group, hash)


@dataclass(frozen=True)
class PlanConfig:
    nsamples: int = 128
    seqlen: int | None = None  # None: min(context, 2048), as calibrate
    hessian: bool = False
    hessian_dtype: str = "float32"
    methods: tuple[str, ...] = ("wanda",)
    pattern: str = "unstructured"
    sequential: bool = False
    batch_size: int = 8
    dtype: str | None = None  # None: the model's own on a GPU, float32 on the CPU (as load_model)
    timed: bool = True
    data: str = "sample-wiki"  # a text source, or a .safetensors file of token ids


@dataclass
class StagePlan:
    device: dict[str, int] = field(default_factory=dict)  # term -> bytes
    host: dict[str, int] = field(default_factory=dict)
    disk: int = 0
    seconds: float | None = None

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


@dataclass
class Plan:
    model: str
    device: str
    dtype: str
    nsamples: int
    seqlen: int
    shapes: Shapes
    artifact_bytes: int
    checkpoint_bytes: int
    stages: dict[str, StagePlan]
    notes: list[str]

    def line(self, stage: str) -> str:
        """The one-line plan a command prints at start."""
        s = self.stages[stage]
        where = "host RAM" if self.device == "cpu" else f"{self.device} memory"
        parts = [f"plan ({stage}): peak {where} ~{_gb(s.device_bytes)}"]
        if self.device != "cpu":
            parts.append(f"host RAM ~{_gb(s.host_bytes)}")
        if s.disk:
            parts.append(f"disk {_gb(s.disk)}")
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
            "stages": {
                k: {
                    "device_bytes": s.device_bytes,
                    "host_bytes": s.host_bytes,
                    "disk_bytes": s.disk,
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


# ----------------------------------------------------------------------------------------------- sizes


def artifact_tensor_bytes(shapes: Shapes, config: PlanConfig, seqlen: int) -> int:
    """The statistics artifact's tensors, exactly: float64 mean and m2 per layer group, one Hessian per group
    (in --hessian-dtype), the int64 token ids."""
    from stade_cli.base.dtypes import BY_NAME

    ins = [members[0][1] for members in shapes.groups.values()]
    stats = shapes.n_blocks * sum(2 * 8 * n for n in ins)
    hessians = shapes.n_blocks * sum(n * n for n in ins) * size_of(BY_NAME[config.hessian_dtype])
    return stats + (hessians if config.hessian else 0) + config.nsamples * seqlen * 8


def artifact_bytes(shapes: Shapes, config: PlanConfig, seqlen: int) -> int:
    """The artifact on disk: its tensors, plus a bound on the safetensors headers and the manifest (the
    manifest lists every linear layer)."""
    entries = shapes.n_blocks * len(shapes.groups) * (3 if config.hessian else 2) + 1
    layers = shapes.n_blocks * sum(len(m) for m in shapes.groups.values())
    return artifact_tensor_bytes(shapes, config, seqlen) + HEADER_ENTRY * entries + MANIFEST_LAYER * layers + 8192


def planned_checkpoint_bytes(shapes: Shapes, dtype: torch.dtype) -> int:
    """The pruned checkpoint's weights: every unique parameter once, in the checkpoint's dtype."""
    return shapes.params * size_of(dtype)


def make_plan(
    spec: str, config: PlanConfig, device: torch.device, cache_dir: str | None = None, where: str | None = None
) -> Plan:
    """The plan for calibrate, prune and eval of `spec` on `device`, from its config alone."""
    from transformers import AutoConfig

    from stade_cli.base.dtypes import parse_dtype
    from stade_cli.models.loading import default_dtype, default_seqlen
    from stade_cli.stages.methods import get_method

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
    metrics = [get_method(m) for m in config.methods]
    wants_h = any("hessian" in m.needs for m in metrics)
    # prune computes in float32 on the CPU and in the checkpoint's own dtype on a GPU (load_model's default)
    e, e_own = size_of(compute), size_of(default_dtype(path, device, cache_dir))
    tokens = config.nsamples * seqlen
    batch_tokens = min(config.batch_size, config.nsamples) * seqlen
    n_batches = -(-config.nsamples // config.batch_size)
    gpu = device.type == "cuda"
    hidden_all = 2 * tokens * shapes.hidden * e + tokens * shapes.arg_bytes_per_token
    hidden_on_device = gpu and _fits_on_device(hidden_all, device)
    stats_kept = sum(2 * 8 * m[0][1] for m in shapes.groups.values()) * shapes.n_blocks

    # Weights are read whole from the safetensors files (weights.read_tensors), in the compute dtype; the
    # weights outside the blocks are there while the block inputs are captured and dropped while the blocks
    # run (weights.outside_on_disk): the peak is the larger of the two phases.
    outside = {"embeddings and head": shapes.outside_params * e}
    if compute != own:  # each is read (or written) in the checkpoint's dtype next to its converted copy
        outside["the embeddings in the checkpoint's dtype"] = shapes.input_embedding_params * size_of(own)
    text = config.nsamples * seqlen * 8 if config.data.endswith(".safetensors") else TEXT_SOURCE
    skeleton = TOKENIZER_PER_VOCAB * shapes.vocab
    common = {"libraries": LIBRARIES, "tokenizer and skeleton": skeleton}

    cal = StagePlan()
    work = {
        "block": shapes.block_params * e,
        "activations": activation_bytes(shapes, batch_tokens, e, True),
        **({"hessians": hessian_bytes(shapes)} if config.hessian else {}),
    }
    kept = {"hidden states": hidden_all, "statistics": stats_kept}
    if gpu:
        cal.device = peak_phase(
            {"embeddings and head": shapes.outside_params * e}, {**work, **(kept if hidden_on_device else {})}
        )
        blocks = {"block (read)": shapes.block_params * e, **({} if hidden_on_device else kept)}
        cal.host = {**common, "calibration text": text, **peak_phase(outside, blocks)}
    else:
        cal.host = {**common, "calibration text": text, **peak_phase(outside, {**work, **kept})}
        cal.device = dict(cal.host)
    cal.disk = artifact_bytes(shapes, config, seqlen)

    pr = StagePlan()
    work = {"block": shapes.block_params * e_own, "layer group work": group_work_bytes(shapes, e_own, wants_h)}
    if len(metrics) > 1:
        work["dense copy of the block"] = shapes.block_params * e_own
    if config.sequential and any(m.needs for m in metrics):
        work["activations"] = activation_bytes(shapes, batch_tokens, e_own, True)
        work["hidden states"] = 2 * tokens * shapes.hidden * e_own + tokens * shapes.arg_bytes_per_token
        if wants_h:
            work["hessians"] = hessian_bytes(shapes)
    # Everything outside the blocks is read whole and written to every output before the first block.
    head = {"embeddings and head": shapes.outside_params * e_own}
    if e_own != size_of(own):
        head["the embeddings in the checkpoint's dtype"] = shapes.input_embedding_params * size_of(own)
    if gpu:
        pr.device = work
        pr.host = {**common, **peak_phase(head, {"block (read)": shapes.block_params * e_own})}
    else:
        pr.host = {**common, **peak_phase(head, work)}
        pr.device = dict(pr.host)
    ckpt = planned_checkpoint_bytes(shapes, parse_dtype(config.dtype) or own)
    pr.disk = len(metrics) * ckpt

    ev = StagePlan()
    chunk = min(config.batch_size, config.nsamples) * min(LOGITS_CHUNK, seqlen) * shapes.vocab * 4 * 2
    work = {
        "weights": shapes.params * e,
        "activations": activation_bytes(shapes, batch_tokens, e, False),
        "log-probabilities chunk": chunk,
    }
    ev.host = {"libraries": LIBRARIES, "tokenizer and skeleton": skeleton, "evaluation text": TEXT_SOURCE}
    if gpu:
        ev.device = work
    else:
        ev.host |= work
        ev.device = dict(ev.host)

    notes = [
        "memory: peak estimates from the shapes (see `stade plan --help`); the CUDA context comes on top"
        if gpu
        else "memory: peak host RSS estimates from the shapes, libraries included"
    ]
    absent = gpu and not torch.cuda.is_available()
    if absent:
        notes.append("planned for a GPU that is not on this machine: not timed; block inputs counted in host RAM")
    if config.timed and not absent:
        t = _time_block(model, blocks_of(model), seqlen, min(config.batch_size, config.nsamples), device, shapes)
        if t is None:
            notes.append("time: one block does not fit in the free memory here, so it was not timed")
        else:
            forwards = shapes.n_blocks * n_batches
            cal.seconds = t * forwards * (2.0 if config.hessian else 1.3)  # hooks; Hessian matmuls
            seq_forwards = 2 * forwards if config.sequential and any(m.needs for m in metrics) else 0
            pr.seconds = t * seq_forwards * len(metrics) if seq_forwards else None
            ev.seconds = t * forwards * 1.1
            notes.append(
                "time: an ESTIMATE, one block's forward timed on random weights here, times the forward passes "
                "(disk reads and pruning maths not included)"
            )
    plan = Plan(
        spec, str(device), str(compute).removeprefix("torch."), config.nsamples, seqlen, shapes, 0, 0, {}, notes
    )
    plan.artifact_bytes, plan.checkpoint_bytes = cal.disk, ckpt
    plan.stages = {"calibrate": cal, "prune": pr, "eval": ev}
    return plan


def config_path(spec: str) -> str:
    """A folder holding a config.json (weights or not: the plan reads none), a config.json file, or a model spec."""
    from pathlib import Path

    from stade_cli.models.loading import resolve_model

    p = Path(spec).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        return str(p.parent)
    if (p / "config.json").is_file():
        return str(p)
    return resolve_model(spec)


def blocks_of(model: nn.Module) -> Any:
    return find_blocks(model)[1]


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
        check_space(Path(out), s.disk)


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
