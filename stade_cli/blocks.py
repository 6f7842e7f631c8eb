"""Running a model one decoder block at a time, so device memory holds one block plus its inputs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from .layers import find_blocks
from .models import LoadedModel
from .weights import materialized


class _Stop(Exception):
    """Raised by the catcher once the first block's inputs are captured."""


class _Catcher(nn.Module):
    """Stands in for block 0: records its call arguments, then stops the forward pass."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", block)  # not a submodule: it must stay where it is
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        raise _Stop

    def __getattr__(self, name: str) -> Any:  # e.g. `attention_type`, read by some models' forward
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)


@dataclass
class BlockInputs:
    """Hidden states entering the current block, per batch, and the other call arguments."""

    hidden: list[torch.Tensor]  # each (B, L, hidden)
    args: list[tuple]
    kwargs: list[dict]


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _keep_on(device: torch.device, input_ids: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> torch.device:
    """Keep block inputs and outputs on the GPU when they fit comfortably, else on the CPU."""
    if device.type != "cuda":
        return device
    need = 2 * input_ids.numel() * hidden_size * torch.tensor([], dtype=dtype).element_size()
    free, _total = torch.cuda.mem_get_info(device)
    return device if need < 0.4 * free else torch.device("cpu")


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device) -> BlockInputs:
    """Run the model up to block 0 for each batch of windows and keep what block 0 receives."""
    name, blocks = find_blocks(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    catcher = _Catcher(blocks[0])
    setattr(parent, attr, nn.ModuleList([catcher]))
    try:
        model.to(device)  # only the embeddings, rotary tables and final norm: the blocks are detached
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            with contextlib.suppress(_Stop):
                model(input_ids=batch, use_cache=False)
    finally:
        model.to("cpu")
        setattr(parent, attr, blocks)
    hidden_size = catcher.calls[0][0].shape[-1]
    store = _keep_on(device, input_ids, hidden_size, catcher.calls[0][0].dtype)
    return BlockInputs(
        hidden=[h.to(store) for h, _, _ in catcher.calls],
        args=[_to(a, device) for _, a, _ in catcher.calls],
        kwargs=[_to(k, device) for _, _, k in catcher.calls],
    )


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device) -> list[torch.Tensor]:
    """The block's outputs for every batch (the block must already be on `device`)."""
    outs = []
    for h, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
        out = block(h.to(device), *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        outs.append(out.to(h.device))
    return outs


def iterate_blocks(model: nn.Module) -> Iterator[tuple[int, str, nn.Module]]:
    """(index, qualified name prefix, block) for every decoder block."""
    name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        yield i, f"{name}.{i}", block


@contextlib.contextmanager
def on_device(loaded: LoadedModel, prefix: str, block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The block on `device` for the `with`: moved there and back, or (lazy model) read from disk and dropped."""
    try:
        if loaded.files is None:
            block.to(device)
            try:
                yield block
            finally:
                block.to("cpu")
            return
        with materialized(block, prefix, loaded.files, loaded.dtype, loaded.block_samples):
            yield block.to(device)
    finally:
        release_memory()


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - not glibc
        return None


def release_memory() -> None:
    """Hand memory freed by the last block back to the OS.

    glibc keeps freed activations in its heaps, fragmented, so without this the resident set grows
    by part of a block's activations with every block (measured: +10-35 MB per SmolLM2 block, varying run to run).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
