"""Loading a model's weights one decoder block at a time, straight from its safetensors files.

Calibration touches each block once, so it never needs the whole model in memory: the model is
built without weights, the layers outside the blocks (embeddings, final norm, head) are loaded,
and each block is read from disk just before it runs and dropped after. Peak memory is then one
block plus the activations, not the model; a 70B model calibrates on a machine with far less RAM.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from stade_cli.base.dtypes import BY_CODE
from stade_cli.base.errors import StadeError
from stade_cli.base.tensorfiles import header, read_tensors
from stade_cli.models import hf
from stade_cli.models.fingerprint import fingerprint_sample, sample_step
from stade_cli.models.layers import find_blocks

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass
class WeightFiles:
    """Which safetensors file holds each tensor of a checkpoint, and how they make the model's tensors.

    `stored` is None where the checkpoint holds each tensor under the model's own name; otherwise it maps the
    stored names (per-expert MoE tensors, as the hub's Mixtral and Qwen-MoE checkpoints hold them) onto the model's,
    with transformers' own conversion (build_lazy sets it). Every method but `meta` takes the model's names.
    """

    file_of: dict[str, Path]  # stored name -> its file
    stored: hf.StoredNames | None = None

    @classmethod
    def find(cls, path: str, cache_dir: str | None = None) -> WeightFiles | None:
        """The checkpoint's safetensors files (a local folder, or a hub id via the download cache); None if none."""
        local = Path(path)
        if local.is_dir():
            index = local / INDEX_FILE
            single = local / SINGLE_FILE
            index_path = str(index) if index.exists() else None
            single_path = str(single) if single.exists() else None
        else:

            def fetch(name: str) -> str | None:
                return hf.hub_file(path, name, cache_dir)

            index_path = fetch(INDEX_FILE)
            single_path = None if index_path else fetch(SINGLE_FILE)
        if index_path:
            weight_map = json.loads(Path(index_path).read_text())["weight_map"]
            if not local.is_dir() and any(fetch(s) is None for s in sorted(set(weight_map.values()))):
                return None  # the shards the index names could not be downloaded
            folder = Path(index_path).parent
            return cls({k: folder / v for k, v in weight_map.items()})
        if single_path:
            from safetensors import safe_open

            with safe_open(single_path, framework="pt") as f:
                return cls(dict.fromkeys(f.keys(), Path(single_path)))
        return None

    def has(self, name: str) -> bool:
        """Whether the model's tensor `name` is in the files (under its own name, or made from stored ones)."""
        return name in self.file_of if self.stored is None else name in self.stored.group_of

    def meta(self) -> dict[str, torch.Tensor]:
        """Every stored tensor on meta (its dtype and shape), from the files' headers alone."""
        out = {}
        for file in sorted(set(self.file_of.values())):
            for name, (_base, entry) in header(file).items():
                if self.file_of.get(name) == file and entry["dtype"] in BY_CODE:
                    out[name] = torch.empty(entry["shape"], dtype=BY_CODE[entry["dtype"]], device="meta")
        return out

    def read(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The model's named tensors in `dtype` (None: as stored), read into fresh memory (read_tensors): a block's
        pages leave the resident set with the block, rather than staying mapped. Tensors stored under other names
        are made from them one conversion at a time (an MoE block's experts stacked), each group's stored tensors
        freed as it is made."""
        if self.stored is None:
            return self._read(names, dtype)
        wanted, out = set(names), {}
        for key in dict.fromkeys(self.stored.group_of[n] for n in names):
            sources = [n for _p, n in self.stored.groups[key].sources]
            made = self.stored.convert(key, self._read(sources, dtype))
            out.update({n: t for n, t in made.items() if n in wanted})
        return out

    def _read(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The stored tensors `names`, in `dtype` (None: as stored)."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            try:
                for k, t in read_tensors(file, keys).items():
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:  # found only now, block by block
                raise StadeError(
                    f"Weights file {str(file)!r} is unreadable: {' '.join(str(exc).split())}.",
                    "a .safetensors file is truncated or corrupt: copy or download the model again",
                ) from None
        return out

    def samples(self, names: list[str]) -> dict[str, bytes]:
        """Fingerprint samples of the model's named tensors, read strided from the files as stored (whatever dtype
        the model runs in): only the pages the sample touches are read, not the tensors (a 70B model's fingerprint
        must not read 140 GB). A tensor made by a conversion (MoE experts stacked) is made whole, one at a time, and
        sampled: the strides of the stacked tensor do not fall on the stored ones."""
        if self.stored is None:
            return self._samples({n: n for n in names})
        groups = self.stored.groups
        renamed = {n: g.sources[0][1] for n in names if (g := groups[self.stored.group_of[n]]).converter is None}
        out = self._samples(renamed)
        wanted = set(names)
        for key in dict.fromkeys(self.stored.group_of[n] for n in names if n not in renamed):
            made = self.read(groups[key].targets, None)
            out.update({n: fingerprint_sample(n, t) for n, t in made.items() if n in wanted})
        return out

    def _samples(self, stored_of: dict[str, str]) -> dict[str, bytes]:
        """Strided samples of the model's tensors (name -> the stored tensor it is, under its stored name)."""
        import numpy as np

        out = {}
        headers: dict[Path, dict[str, tuple[int, dict]]] = {}
        for name, src in stored_of.items():
            file = self.file_of[src]
            try:
                if file not in headers:
                    headers[file] = header(file)
                base, entry = headers[file][src]
                dt = BY_CODE[entry["dtype"]]
                shape = entry["shape"]
                numel = int(np.prod(shape)) if shape else 1
                item = torch.tensor([], dtype=dt).element_size()
                start = base + entry["data_offsets"][0]
                raw = np.memmap(file, dtype=np.dtype(f"u{item}"), mode="r", offset=start, shape=(numel,))
                picked = np.array(raw[:: sample_step(numel)])
                del raw
            except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:  # a truncated or damaged file
                raise StadeError(
                    f"Weights file {str(file)!r} is unreadable: {' '.join(str(exc).split())}.",
                    "a .safetensors file is truncated or corrupt: copy or download the model again",
                ) from None
            strided = torch.from_numpy(picked).view(dt)
            out[name] = fingerprint_sample(name, torch.empty(shape, device="meta"), strided)
        return out


def first_mismatch(path: str) -> str | None:
    """The first tensor whose shape in the weight files differs from the one config.json implies, in words (None
    where the files cannot be read by name): what a config.json from another model looks like."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = WeightFiles.find(path)
    if files is None:
        return None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    headers: dict[Path, dict[str, tuple[int, dict]]] = {}
    for name, t in model.state_dict().items():
        file = files.file_of.get(name)
        if file is None:
            continue
        stored = headers.setdefault(file, header(file))[name][1]["shape"]
        if list(stored) != list(t.shape):
            return f"{name} is {list(stored)} in the weight files, but config.json makes it {list(t.shape)}."
    return None


def file_samples(model: PreTrainedModel, files: WeightFiles, names: list[str]) -> dict[str, bytes]:
    """Fingerprint samples of the model's tensors `names`, from the values its files store (a tied copy from its
    source's), so that the fingerprint does not depend on the dtype the model runs in: statistics calibrated in
    float16 from a float32 checkpoint fit a prune run in float32."""
    source = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters(remove_duplicate=False))
    srcs = {n: n if files.has(n) or n not in params else source[id(params[n])] for n in names}
    srcs = {n: src for n, src in srcs.items() if files.has(src)}  # else a buffer: sampled in memory
    read = files.samples(sorted(set(srcs.values())))  # one pass: each file's header parsed once
    return {n: read[src].replace(src.encode(), n.encode(), 1) for n, src in srcs.items()}


def _persistent(module: nn.Module) -> list[str]:
    """State-dict names of `module`: parameters and persistent buffers, what a checkpoint holds."""
    return list(module.state_dict(keep_vars=True).keys())


def planned_loading(path: str, model: PreTrainedModel, cache_dir: str | None = None) -> str:
    """How load_model(lazy=True) will hold the checkpoint at `path`, read from its index or header alone (no
    weights downloaded), for the plan: "lazy" (blocks read from the files one at a time, also where transformers'
    conversion mapping makes the model's tensors from the stored ones, as the experts of the hub's MoE checkpoints),
    "whole" (not in safetensors: loaded whole) or "renamed" (stored under other names that stade cannot map: loaded
    whole, and written by save_pretrained). `model`: the model built from the config (on meta).
    A folder with no weights (a config alone) or a hub checkpoint whose names cannot be read without its weights
    is planned as stored under its own names in safetensors, like nearly every hub checkpoint."""
    local = Path(path)
    names: set[str] | None = None
    index = local / INDEX_FILE if local.is_dir() else hf.hub_file(path, INDEX_FILE, cache_dir)
    if index is not None and Path(index).is_file():
        names = set(json.loads(Path(index).read_text())["weight_map"])
    elif (local / SINGLE_FILE).is_file():
        names = set(header(local / SINGLE_FILE))
    elif local.is_dir() and any(local.glob("pytorch_model*.bin")):
        return "whole"
    tied = set(_tied_names(model))
    missing = [k for k in _persistent(model) if k not in tied and names is not None and k not in names]
    if missing and not set(missing) <= hf.covered(model, names or ()):  # per-expert MoE names are read lazily
        return "renamed"
    return "lazy"


def build_lazy(
    config: PretrainedConfig, dtype: torch.dtype, files: WeightFiles, head: bool = True
) -> PreTrainedModel | None:
    """The model with every weight outside the blocks loaded and the blocks left empty (meta), or None where the
    checkpoint's tensors do not make the model's. Tensors stored under other names (per-expert MoE tensors, older
    names) are mapped with transformers' own conversion (`files.stored` is set), which the model records for saving.

    `head` False leaves an untied output head on disk too (meta): calibrate never runs it, and for an 8B model
    it is about 1 GB in bf16.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    blocks_name, _ = find_blocks(model)
    tied = set(_tied_names(model))
    wanted = [k for k in _persistent(model) if k not in tied]
    if any(k not in files.file_of for k in wanted):
        files.stored = hf.stored_names(model, files.meta())
        if files.stored is None or any(not files.has(k) for k in wanted):
            return None
    head_name = None if head else _head_name(model)
    left = (blocks_name + ".",) if head_name is None else (blocks_name + ".", head_name + ".")
    outside = [k for k in wanted if not k.startswith(left)]
    model.load_state_dict(files.read(outside, dtype), strict=False, assign=True)
    model.tie_weights()
    if any(p.is_meta for n, p in model.named_parameters() if not n.startswith(left)):
        return None
    return model


def _head_name(model: PreTrainedModel) -> str | None:
    """The output head's module name (a tied head's weight is not read from the files either way)."""
    out = model.get_output_embeddings()
    return next((name for name, mod in model.named_modules() if mod is out), None) if out is not None else None


def _tied_names(model: PreTrainedModel) -> list[str]:
    """State-dict names that share storage with an earlier name (e.g. lm_head tied to the embeddings)."""
    seen: dict[int, str] = {}
    tied = []
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            tied.append(name)
        else:
            seen[key] = name
    # A tied head is a separate Parameter object in some models until tie_weights(); ask the config too.
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        if out is not None:
            for name, mod in model.named_modules():
                if mod is out:
                    tied.append(f"{name}.weight")
    return tied


@contextlib.contextmanager
def outside_on_disk(model: PreTrainedModel, files: WeightFiles | None, dtype: torch.dtype) -> Iterator[None]:
    """Drop the weights outside the blocks (embeddings, final norm, head) for the `with`, and read them
    again after it.

    Once the block inputs are captured, calibrate and streaming prune need only the blocks; the embeddings
    and an untied head (13% of Llama-3-8B, more for small models) would otherwise sit in RAM next to every
    block. Does nothing for a model loaded whole (`files` None).
    """
    if files is None:
        yield
        return
    blocks_name, _ = find_blocks(model)
    tied = set(_tied_names(model))
    state = model.state_dict(keep_vars=True)
    # What was never read (an untied head left on disk, build_lazy) is not read afterwards either.
    names = [k for k in _persistent(model) if not k.startswith(blocks_name + ".") and not state[k].is_meta]
    model.load_state_dict({k: torch.empty_like(state[k], device="meta") for k in names}, strict=False, assign=True)
    del state
    try:
        yield
    finally:
        wanted = [k for k in names if k not in tied]
        model.load_state_dict(files.read(wanted, dtype), strict=False, assign=True)
        model.tie_weights()


@contextlib.contextmanager
def materialized(
    block: nn.Module, prefix: str, files: WeightFiles, dtype: torch.dtype, samples: dict[str, bytes]
) -> Iterator[nn.Module]:
    """Read one block's weights from disk for the duration of the `with`, then drop them again.

    Each tensor's fingerprint sample is kept in `samples` on the way, so the model's fingerprint
    needs no second read.
    """
    names = _persistent(block)
    tensors = files.read([f"{prefix}.{n}" for n in names], None)
    samples.update({full: fingerprint_sample(full, t) for full, t in tensors.items()})  # as stored: see file_samples
    tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    block.load_state_dict({n: tensors[f"{prefix}.{n}"] for n in names}, strict=True, assign=True)
    try:
        yield block
    finally:
        meta = {n: torch.empty_like(t, device="meta") for n, t in block.state_dict(keep_vars=True).items()}
        block.load_state_dict(meta, strict=True, assign=True)
