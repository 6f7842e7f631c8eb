"""Running a model one decoder block at a time, so device memory holds one block plus its inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.base.heap import release_memory
from stade_cli.models.layers import find_blocks
from stade_cli.models.loading import LoadedModel
from stade_cli.models.weights import materialized


class StopForward(Exception):
    """Raised by a hook that has what it needs (a recorder, a planner): the rest of the forward need not run."""


class _Recorder(nn.Module):
    """Stands in for one block: records its call arguments and passes the hidden states through unchanged.

    The model's own forward then hands every block the arguments it really gets (its own rotary
    tables, sliding or full mask, ... by `config.layer_types`), one forward per batch.
    """

    def __init__(self, block: nn.Module, index: int, last: bool, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", block)  # not a submodule: it must stay where it is
        self.index, self.last, self.as_tuple = index, last, as_tuple
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise StopForward
        # A loop that takes `layer_outputs[0]` gets the hidden states back from a one-element tuple.
        return (hidden_states,) if self.as_tuple else hidden_states

    def __getattr__(self, name: str) -> Any:  # e.g. `attention_type`, read by some models' forward
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)


Call = tuple[tuple, dict]  # (positional arguments after the hidden states, keyword arguments)


@dataclass
class BlockInputs:
    """Hidden states entering the current block, per batch, and every block's own call arguments.

    `calls[k][b]` is what the model's forward passes block k with batch b besides the hidden states.
    The tensors in them are shared between blocks (one mask and one rotary table per layer type).
    """

    hidden: list[torch.Tensor]  # each (B, L, hidden)
    calls: list[list[Call]]

    def of_block(self, index: int) -> BlockInputs:
        """The same hidden states with block `index`'s calls alone (as `calls[0]`), for code that runs one block."""
        return BlockInputs(self.hidden, [self.calls[index]])

    def batches(self) -> Iterator[BlockInputs]:
        """One BlockInputs per batch, for a caller that works between batches."""
        for b, h in enumerate(self.hidden):
            yield BlockInputs([h], [[per_block[b]] for per_block in self.calls])


def _to(obj: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """`obj` with its tensors on `device`; a tensor shared by several calls stays one tensor."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _keep_on(device: torch.device, input_ids: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> torch.device:
    """Keep block inputs and outputs on the GPU when they fit comfortably, else on the CPU."""
    if device.type != "cuda":
        return device
    need = 2 * input_ids.numel() * hidden_size * torch.tensor([], dtype=dtype).element_size()
    free, _total = torch.cuda.mem_get_info(device)
    return device if need < 0.4 * free else torch.device("cpu")


def _record(model: nn.Module, recorders: list[_Recorder], batch: torch.Tensor) -> str | None:
    """One forward of `batch` through the recorders; what went wrong, or None if every block was seen once."""
    seen = [len(r.calls) for r in recorders]
    try:
        model(input_ids=batch, use_cache=False)
    except StopForward:
        pass
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        if all(len(r.calls) == s for r, s in zip(recorders, seen, strict=True)):
            raise  # before the first block: nothing to do with the recorders
        return f"the forward failed after block 0 ({type(e).__name__}: {e})"
    counts = [len(r.calls) - s for r, s in zip(recorders, seen, strict=True)]
    if counts != [1] * len(recorders):
        return f"blocks were called {counts} times in one forward, not once each"
    first = recorders[0].calls[-1][0]
    for r in recorders[1:]:
        if r.calls[-1][0] is not first:
            return f"block {r.index} does not receive block {r.index - 1}'s output unchanged"
    return None


def _move(module: nn.Module, device: torch.device) -> None:
    """module.to(device), but for what was left on disk (meta: calibrate's untied head), which stays where it is."""
    if not any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        module.to(device)
        return
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if own and not all(t.is_meta for t in own):
        raise ValueError(f"{type(module).__name__} holds both loaded and unloaded tensors")  # not built by build_lazy
    for child in module.children():
        _move(child, device)


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device) -> BlockInputs:
    """Block 0's hidden states and every block's own call arguments, for each batch of windows.

    Raises StadeError for an architecture whose forward cannot be replayed block by block.
    """
    name, blocks = find_blocks(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    n = len(blocks)
    batches = [input_ids[s : s + batch_size] for s in range(0, input_ids.shape[0], batch_size)]
    problems = []
    setattr(parent, attr, nn.ModuleList())
    try:
        _move(model, device)  # only the embeddings, rotary tables and final norm: the blocks are detached
        # Most decoder loops take a block's return value as the new hidden states; older ones take `[0]`.
        for as_tuple in (False, True):
            recorders = [_Recorder(b, i, i == n - 1, as_tuple) for i, b in enumerate(blocks)]
            setattr(parent, attr, nn.ModuleList(recorders))
            problem = None
            for batch in batches:
                problem = _record(model, recorders, batch.to(device))
                if problem:
                    break
            if problem is None:
                break
            problems.append(problem)
            recorders = []
    finally:
        _move(model, torch.device("cpu"))
        setattr(parent, attr, blocks)
    if not recorders:
        raise StadeError(
            f"Cannot run {type(model).__name__} one block at a time: {problems[0]} "
            f"(and with blocks returning tuples: {problems[1]}).",
            "this architecture is not supported yet; please report it",
        )
    first = recorders[0].calls
    store = _keep_on(device, input_ids, first[0][0].shape[-1], first[0][0].dtype)
    memo: dict[int, Any] = {}
    return BlockInputs(
        hidden=[h.to(store) for h, _, _ in first],
        calls=[[(_to(a, device, memo), _to(k, device, memo)) for _, a, k in r.calls] for r in recorders],
    )


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device, index: int) -> list[torch.Tensor]:
    """Block `index`'s outputs for every batch, called with its own arguments (the block must be on `device`)."""
    outs = []
    for h, (args, kwargs) in zip(inputs.hidden, inputs.calls[index], strict=True):
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
