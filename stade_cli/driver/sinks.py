"""Where a pruned checkpoint goes: streamed into its shards block by block, or saved by save_pretrained at the end.

`ShardSink` writes the very files `save_pretrained` would write from the pruned model in memory (the same shards,
index, tensor order and bytes): every output tensor's name, dtype and shape is known before the first block is
pruned (the transformers adapter says what save_pretrained does), so each shard's header is written first and each
tensor at its offset as its block comes by. It copies each block as it comes, so one pass over the blocks serves a
whole sweep; tensors that save_pretrained converts back to the checkpoint's names (an MoE's stacked experts, saved
per expert) are converted as their block comes by. `SaveSink` is for a checkpoint whose conversion spans blocks: the
model must hold the pruned weights at the end, so each config takes a pass of its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stade_cli.base.dtypes import dtype_name
from stade_cli.base.errors import StadeError
from stade_cli.base.files import write_json
from stade_cli.base.tensorfiles import PlannedSafetensors, planned_header
from stade_cli.models import hf
from stade_cli.models.blocks import iterate_blocks
from stade_cli.models.layers import bias_param, weight_param
from stade_cli.models.loading import LoadedModel

MAX_SHARD_SIZE = "2GB"  # per safetensors shard of a written checkpoint, as save_pretrained's default
SHARD_METADATA = {"format": "pt"}  # what save_pretrained puts in each shard's header


@dataclass
class Layout:
    """One output checkpoint's tensors in save_pretrained's order, and the shard file of each.

    `entries` are named as saved; `model_entries` as the model names them (with the biases the bias switches add),
    and `saved` turns the model's tensors into the saved ones: where save_pretrained converts them back to the names
    the checkpoint came with (an MoE's stacked experts split into per-expert tensors), part by part.
    """

    entries: dict[str, tuple[torch.dtype, list[int]]]
    files: dict[str, list[str]]  # shard file -> tensor names
    index: dict[str, Any] | None  # model.safetensors.index.json, None for a single file
    model_entries: dict[str, tuple[torch.dtype, list[int]]] = field(default_factory=dict)
    revert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # None: saved as named

    @property
    def bytes(self) -> int:
        """The weight files on disk, exactly: each shard's header and data, and the index."""
        shards = (planned_header({n: self.entries[n] for n in names}, SHARD_METADATA) for names in self.files.values())
        total = sum(8 + len(head) + size for head, _slots, size in shards)
        return total + (len(json.dumps(self.index, indent=2, sort_keys=True)) + 1 if self.index is not None else 0)

    def saved(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The saved tensors that the model's tensors `state` (one block's, or those outside the blocks) make."""
        return state if self.revert is None else self.revert(state)


def plan_layout(model: Any, switches: dict[str, bool], dtype: torch.dtype | None) -> Layout:
    """What save_pretrained writes for `model` pruned with these bias switches: names (tied copies dropped,
    biases the switched config expects added after their weights, tensors converted back to the checkpoint's own
    names), dtypes, shapes, shards and index. Raises hf.Renamed where a saved tensor would be made from tensors of
    more than one block, so that it could not be written as its block comes by."""
    state = hf.saved_state(model)
    biased = hf.biased_linears(model.config, switches) if switches else set()
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
    blocks = [prefix for _i, prefix, _block in iterate_blocks(model)]
    order = hf.saved_names(model, meta_state, blocks)
    saved = hf.saved_form(model, meta_state)
    saved = {n: saved[n] for n in order}
    split = hf.shard_plan(saved, MAX_SHARD_SIZE)
    index = None
    if split.is_sharded:
        total = int(model.num_parameters()) + added
        index = {"metadata": {"total_parameters": total, **split.metadata}, "weight_map": split.tensor_to_filename}
    renamed = saved.keys() != meta_state.keys()
    revert = partial(hf.saved_form, model) if renamed else None
    saved_entries = {n: (t.dtype, list(t.shape)) for n, t in saved.items()}
    return Layout(saved_entries, dict(split.filename_to_tensors), index, entries, revert)


def write_config(model: Any, folder: Path, switches: dict[str, bool], dtype: torch.dtype) -> None:
    """config.json and generation_config.json as save_pretrained writes them, with these bias switches set."""
    cfg = model.config
    own = {k: getattr(cfg, k) for k in switches}
    for k, v in switches.items():
        setattr(cfg, k, v)
    try:
        cfg.dtype = dtype_name(dtype)  # the saved dtype, not the one computed in
        cfg.architectures = [type(model).__name__]
        cfg.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
    finally:
        for k, v in own.items():
            setattr(cfg, k, v)


class ShardSink:
    """One output folder's shards, open for the whole run; tensors go in as their blocks are pruned."""

    def __init__(self, folder: Path, layout: Layout, switches: dict[str, bool], dtype: torch.dtype) -> None:
        self.folder, self.layout, self.switches, self.dtype = folder, layout, switches, dtype
        self.file_of = {n: f for f, names in layout.files.items() for n in names}
        self.shards: dict[str, PlannedSafetensors] = {}
        try:
            for f, names in layout.files.items():
                self.shards[f] = PlannedSafetensors(folder / f, {n: layout.entries[n] for n in names}, SHARD_METADATA)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, _shape = self.layout.entries[name]
        self.shards[self.file_of[name]].write(name, tensor.detach().to(dtype))

    def open(self, outside: dict[str, torch.Tensor]) -> None:
        """Everything outside the blocks (embeddings, final norm, an untied head), before the first block."""
        for name, t in self.layout.saved(outside).items():
            if name in self.file_of:
                self.write(name, t)

    def write_block(self, prefix: str, block: nn.Module) -> None:
        """Every output tensor of the block `prefix`; a bias the switched config expects but the block lacks is
        zeros."""
        state = {f"{prefix}.{n}": t for n, t in block.state_dict().items()}
        for name, (dtype, shape) in self.layout.model_entries.items():
            if not name.startswith(prefix + ".") or name in state:
                continue
            if not name.endswith(".bias"):
                raise StadeError(f"Internal error: {name} is missing from the pruned block.")
            state[name] = torch.zeros(shape, dtype=dtype)
        for name, t in self.layout.saved(state).items():
            if name in self.file_of:
                self.write(name, t)

    def abort(self) -> None:
        for shard in self.shards.values():
            shard.abort()

    def close(self, loaded: LoadedModel) -> None:
        for shard in self.shards.values():
            shard.close()
        if self.layout.index is not None:
            write_json(self.folder / "model.safetensors.index.json", self.layout.index, sort_keys=True)
        write_config(loaded.model, self.folder, self.switches, self.dtype)


class SaveSink:
    """save_pretrained of the pruned model in memory, at the end (a checkpoint whose tensors it renames)."""

    def __init__(self, folder: Path, switches: dict[str, bool], dtype: torch.dtype) -> None:
        self.folder, self.switches, self.dtype = folder, switches, dtype

    def open(self, _outside: dict[str, torch.Tensor]) -> None:
        pass

    def write_block(self, _prefix: str, _block: nn.Module) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self, loaded: LoadedModel) -> None:
        model = loaded.model
        finish_biases(model, self.switches)
        if self.dtype == loaded.dtype:
            model.save_pretrained(self.folder, max_shard_size=MAX_SHARD_SIZE)
            return
        own = model.config.dtype  # convert a copy: the loaded model serves the next run
        model.config.dtype = self.dtype
        try:
            model.save_pretrained(self.folder, max_shard_size=MAX_SHARD_SIZE, state_dict=_converted(model, self.dtype))
        finally:
            model.config.dtype = own
        # save_pretrained writes the dtype of the weights in memory: the config must name the saved one.
        config = json.loads((self.folder / "config.json").read_text())
        write_json(self.folder / "config.json", {**config, "dtype": dtype_name(self.dtype)})


def finish_biases(model: Any, switches: dict[str, bool]) -> None:
    """Set the bias switches and give every layer the switched config expects a bias (zeros where none)."""
    if not switches:
        return
    for k, v in switches.items():
        setattr(model.config, k, v)
    for name in hf.biased_linears(model.config):
        real = model.get_submodule(name)
        if bias_param(real) is None:
            weight = weight_param(real)
            real.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype))  # nn.Linear: (out, in)


def _converted(model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict in `dtype`, tied tensors (one storage) still one tensor, so that they are saved once."""
    done: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            out[k] = v
            continue
        key = (v.untyped_storage().data_ptr(), int(v.storage_offset()), tuple(v.shape))
        if key not in done:
            done[key] = v.to(dtype)
        out[k] = done[key]
    return out
