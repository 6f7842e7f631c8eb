"""Streaming prune: each block is read from the checkpoint's safetensors files, pruned on the device and
written straight into every output's shards, so host RAM holds about one block plus the embeddings.

The outputs are the very checkpoints `save_pretrained` would write from a pruned model in memory (the
same shards, index, tensor order and bytes): every output tensor's name, dtype and shape is known
before the first block is read, so each shard's header is written first and each tensor at its
offset as its block comes by. A sweep reads each block once and writes it to every output.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stade_cli.base.artifacts import REPORT_FILE
from stade_cli.base.console import progress
from stade_cli.base.errors import StadeError
from stade_cli.base.files import atomic_dir, check_space, write_json
from stade_cli.base.heap import bound_heap, release_memory
from stade_cli.base.modelcard import write_card
from stade_cli.base.tensorfiles import PlannedSafetensors
from stade_cli.driver import checkpoint
from stade_cli.driver.checkpoint import bias_plan, report_dict
from stade_cli.driver.prune import (
    allocate_blocks,
    calibration_warnings,
    check_compatible,
    check_fingerprint,
    note_damping,
    prune_step,
)
from stade_cli.driver.sweep import SWEEP_SUMMARY, check_outputs, prune_sweep, sweep_summary
from stade_cli.models.blocks import capture_inputs, iterate_blocks
from stade_cli.models.experts import router_counts
from stade_cli.models.loading import LoadedModel, load_model
from stade_cli.models.weights import materialized, outside_on_disk
from stade_cli.stages.config import PruneConfig, PruneReport
from stade_cli.stages.reconstruct import get_reconstruction
from stade_cli.stats.accumulators import LayerStats
from stade_cli.stats.artifact import Statistics
from stade_cli.stats.distributed import Group

TORCHRUN_NOTE = "under torchrun, each rank prunes in memory (the whole model in host RAM) and rank 0 writes"
IN_MEMORY_NOTE = (
    "the checkpoint is not in safetensors under the model's own tensor names, so it is pruned in memory "
    "(the whole model in host RAM)"
)


def prune_checkpoints(
    loaded: LoadedModel,
    stats: Statistics,
    configs: list[PruneConfig],
    out: str | Path,
    device: torch.device,
    force: bool = False,
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    command: str | None = None,
    group: Group | None = None,
) -> list[tuple[Path, dict[str, Any]]]:
    """Prune and write every config's checkpoint: streaming where the model was loaded lazily, else in memory
    (said on stderr and recorded in stade.json as `route`). `dtype`: the saved dtype (None: the checkpoint's own);
    `command`: the command line, for the model cards. Under torchrun (`group`) every rank prunes in memory and
    rank 0 alone writes; the other ranks return nothing."""
    from stade_cli.base.console import err

    dtype = dtype or loaded.own_dtype

    reason = IN_MEMORY_NOTE if group is None else TORCHRUN_NOTE
    if loaded.files is not None:
        try:
            if group is None:
                return stream_sweep(loaded, stats, configs, out, device, force, dtype, batch_size, command)
        except NotStreamable as exc:  # raised before any output exists
            reason = f"{exc}, so it is pruned in memory (the whole model in host RAM)"
        spec = loaded.spec
        loaded = load_model(loaded.path, loaded.dtype, "cpu", loaded.cache_dir)
        loaded.spec = spec
    if group is None or group.lead:
        err.print(f"[yellow]Note:[/] {reason}.", highlight=False, soft_wrap=True)
    return prune_sweep(
        loaded, stats, configs, out, device, force, dtype, batch_size, route_note=reason, command=command, group=group
    )


# ----------------------------------------------------------------------------------------------- layout


class NotStreamable(Exception):
    """The checkpoint cannot be written block by block; the reason says why."""


@dataclass
class Layout:
    """One output checkpoint's tensors in state-dict order, and the shard file of each."""

    entries: dict[str, tuple[torch.dtype, list[int]]]
    files: dict[str, list[str]]  # shard file -> tensor names
    index: dict[str, Any] | None  # model.safetensors.index.json, None for a single file

    @property
    def bytes(self) -> int:
        return sum(torch.Size(s).numel() * d.itemsize for d, s in self.entries.values())


def uses_bias(stats: Statistics, config: PruneConfig) -> bool:
    """Whether pruning with `config` adds a bias to some layer (decided by the manifest alone, as bias_plan does)."""
    if not config.bias_update:
        return False
    return any(
        config.bias_layer(LayerStats(1, torch.zeros(1), torch.zeros(1), bool(e["fed_by_norm"])))
        for e in stats.manifest["layers"]
    )


def plan_layout(model: Any, switches: dict[str, bool], dtype: torch.dtype | None) -> Layout:
    """What save_pretrained writes for `model` pruned with these bias switches: names (tied copies dropped,
    biases the switched config expects added after their weights), dtypes, shapes, shards and index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    biased: set[str] = set()
    if switches:
        trial = model.config.__class__.from_dict({**model.config.to_dict(), **switches})
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(trial)
        biased = {n for n, m in meta.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}
    entries: dict[str, tuple[torch.dtype, list[int]]] = {}
    added = 0
    for name, t in state.items():
        own = dtype if dtype is not None and t.is_floating_point() else t.dtype
        entries[name] = (own, list(t.shape))
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in biased and f"{module}.bias" not in state:
            entries[f"{module}.bias"] = (own, [int(t.shape[0])])
            added += int(t.shape[0])
    meta_state = {n: torch.empty(s, dtype=d, device="meta") for n, (d, s) in entries.items()}
    from transformers.core_model_loading import revert_weight_conversion

    # save_pretrained's order (and any renaming). from_pretrained records the conversions it applied; the
    # lazy model's names are the checkpoint's own, i.e. none applied, which from_pretrained records as [].
    unset = not hasattr(model, "_weight_conversions")
    if unset:
        model._weight_conversions = []
    try:
        reverted = revert_weight_conversion(model, dict(meta_state))
    finally:
        if unset:
            del model._weight_conversions
    if set(reverted) != set(meta_state):
        raise NotStreamable("transformers renames or converts this model's tensors when it saves them")
    meta_state = {n: meta_state[n] for n in reverted}
    entries = {n: entries[n] for n in reverted}
    split = split_torch_state_dict_into_shards(
        meta_state, filename_pattern="model{suffix}.safetensors", max_shard_size=checkpoint.MAX_SHARD_SIZE
    )
    index = None
    if split.is_sharded:
        total = int(model.num_parameters()) + added
        index = {"metadata": {"total_parameters": total, **split.metadata}, "weight_map": split.tensor_to_filename}
    return Layout(entries, dict(split.filename_to_tensors), index)


class CheckpointWriter:
    """One output folder's shards, open for the whole run; tensors go in as their blocks are pruned."""

    def __init__(self, folder: Path, layout: Layout) -> None:
        self.folder = folder
        self.layout = layout
        self.shards: dict[str, PlannedSafetensors] = {}
        self.file_of = {n: f for f, names in layout.files.items() for n in names}
        for f, names in layout.files.items():
            self.shards[f] = PlannedSafetensors(folder / f, {n: layout.entries[n] for n in names}, {"format": "pt"})

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, _shape = self.layout.entries[name]
        self.shards[self.file_of[name]].write(name, tensor.detach().to(dtype))

    def write_block(self, prefix: str, block: nn.Module) -> None:
        """Every output tensor under `prefix`; a bias the switched config expects but the block lacks is zeros."""
        state = block.state_dict()
        for name, (dtype, shape) in self.layout.entries.items():
            if not name.startswith(prefix + "."):
                continue
            local = name[len(prefix) + 1 :]
            if local in state:
                self.write(name, state[local])
            elif local.endswith(".bias"):
                self.write(name, torch.zeros(shape, dtype=dtype))
            else:
                raise StadeError(f"Internal error: {name} is missing from the pruned block.")

    def abort(self) -> None:
        for shard in self.shards.values():
            shard.abort()

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()
        if self.layout.index is not None:
            text = json.dumps(self.layout.index, indent=2, sort_keys=True) + "\n"
            (self.folder / "model.safetensors.index.json").write_text(text)


def write_config(model: Any, folder: Path, switches: dict[str, bool], dtype: torch.dtype | None = None) -> None:
    """config.json and generation_config.json as save_pretrained writes them, with these bias switches set."""
    cfg = model.config
    own = {k: getattr(cfg, k) for k in switches}
    for k, v in switches.items():
        setattr(cfg, k, v)
    try:
        cfg.dtype = str(dtype or model.dtype).split(".")[1]  # the saved dtype, not the one computed in
        cfg.architectures = [type(model).__name__]
        cfg.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
    finally:
        for k, v in own.items():
            setattr(cfg, k, v)


# ----------------------------------------------------------------------------------------------- driving


def stream_sweep(
    loaded: LoadedModel,
    stats: Statistics,
    configs: list[PruneConfig],
    out: str | Path,
    device: torch.device,
    force: bool = False,
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    command: str | None = None,
) -> list[tuple[Path, dict[str, Any]]]:
    """Prune a lazily loaded model once per config, reading each block once and writing it to every output."""
    assert loaded.files is not None, "stream_sweep needs a model whose blocks are on disk (load_model(lazy=True))"
    out = Path(out)
    paths = check_outputs(out, configs, force)
    bound_heap()
    model = loaded.model
    check_compatible(model, stats, configs, weights_in_memory=False)
    check_fingerprint(stats, loaded.fingerprint())  # from strided samples of the files: no block is read whole
    switches = bias_plan(model, stats, configs)
    switched = {c: switches if uses_bias(stats, c) else {} for c in configs}
    layouts = {c: plan_layout(model, switched[c], dtype) for c in configs}
    check_space(out, sum(layout.bytes for layout in layouts.values()))  # the shards are sized as they open
    routers = router_counts([block for _i, _p, block in iterate_blocks(model)])
    reports = {c: PruneReport(c, route="streaming", routers=routers) for c in configs}
    for c in configs:
        reports[c].warnings += calibration_warnings(stats, c)
    t0 = time.perf_counter()
    # Sequential configs recalibrate each block on their own pruned outputs: each keeps its own inputs.
    captured = None
    inputs = {}
    for c in configs:
        if (c.sequential and c.needs) or get_reconstruction(c.reconstruct).needs_inputs:
            if captured is None:
                captured = capture_inputs(model, stats.token_ids(), batch_size, device)
                inputs[c] = captured
            else:
                inputs[c] = type(captured)(list(captured.hidden), captured.calls)
    blocks = list(iterate_blocks(model))
    per_block = {c: allocate_blocks(loaded, stats, c, reports[c], device) for c in configs}
    with contextlib.ExitStack() as stack:
        folders = {c: stack.enter_context(atomic_dir(paths[c], force)) for c in configs}
        writers = {c: CheckpointWriter(folders[c], layouts[c]) for c in configs}
        for w in writers.values():
            stack.callback(w.abort)  # closes what an error left open, before its folder is removed
        outside = {n: t for n, t in model.state_dict().items() if not t.is_meta}
        for c in configs:
            for name in layouts[c].entries:
                if name in outside:
                    writers[c].write(name, outside[name])
        del outside
        with outside_on_disk(model, loaded.files, loaded.dtype), progress() as bar:
            label = configs[0].name if len(configs) == 1 else f"{len(configs)} checkpoints"
            task = bar.add_task(f"{label} (streaming)", total=len(blocks), info="")
            for i, prefix, block in blocks:
                with materialized(block, prefix, loaded.files, loaded.dtype, loaded.block_samples):
                    _prune_into(i, prefix, block, configs, stats, device, inputs, reports, writers, per_block)
                release_memory()
                bar.advance(task)
        prune_s = time.perf_counter() - t0
        results = []
        for c in configs:
            t_end = time.perf_counter()
            writers[c].close()
            write_config(model, folders[c], switched[c], dtype)
            tokenizer: Any = loaded.tokenizer
            tokenizer.save_pretrained(folders[c])
            report = reports[c]
            if any(r.bias_updated for r in report.layers) != bool(switched[c]) and switches:
                raise StadeError(f"Internal error: {c.name} added biases other than planned.")
            report.timings["prune_s"] = round(prune_s, 3)
            report.timings["write_s"] = round(time.perf_counter() - t_end, 3)
            note_damping(report)
            doc = report_dict(loaded, report, stats, device)
            doc["dtype"] = str(dtype or loaded.dtype).removeprefix("torch.")  # as saved
            write_json(folders[c] / REPORT_FILE, doc)
            write_card(folders[c], doc, command)
            results.append((paths[c], doc))
    if len(configs) > 1:
        write_json(out / SWEEP_SUMMARY, sweep_summary(results))
    return results


def _prune_into(
    index: int,
    prefix: str,
    block: nn.Module,
    configs: list[PruneConfig],
    stats: Statistics,
    device: torch.device,
    inputs: dict[PruneConfig, Any],
    reports: dict[PruneConfig, PruneReport],
    writers: dict[PruneConfig, CheckpointWriter],
    per_block: dict[PruneConfig, Any],
) -> None:
    """Prune dense block `index` once per config (restored in between) and write each result to its output."""
    dense = {k: v.detach().clone() for k, v in block.state_dict().items()} if len(configs) > 1 else None
    biased = {n for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}
    block.to(device)
    for idx, c in enumerate(configs):
        if idx and dense is not None:
            _drop_added_biases(block, biased)
            block.load_state_dict(dense, strict=True)  # copies into the device's tensors
        reports[c].layers += prune_step(
            prefix, block, stats, per_block[c](prefix), device, inputs.get(c), index, reports[c]
        )
        writers[c].write_block(prefix, block)
    _drop_added_biases(block, biased)  # the block goes back to its on-disk shape (meta) for the fingerprint


def _drop_added_biases(block: nn.Module, biased: set[str]) -> None:
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is not None and name not in biased:
            mod.register_parameter("bias", None)
