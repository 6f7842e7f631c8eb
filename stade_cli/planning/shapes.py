"""The shapes `stade plan` reasons about, read from the model's config alone: a meta-device model for the
parameter counts, and block 0 run on the meta device with calibration's own hooks for the layer groups; and
the memory terms derived from them, each what one piece of the code allocates."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.models.blocks import StopForward
from stade_cli.models.layers import find_blocks, linear_layers


@dataclass
class Shapes:
    """What the plan needs to know about the model, from its config."""

    n_blocks: int
    hidden: int
    vocab: int
    context: int | None
    params: int  # unique parameters (a tied head counted once), what a checkpoint holds
    block_params: int  # the largest block's
    outside_params: int  # embeddings, head, final norm (loaded once, kept)
    input_embedding_params: int  # the token embeddings alone
    groups: dict[str, list[tuple[int, int]]]  # group -> [(out, in)] of its layers, for block 0
    arg_bytes_per_token: int  # rotary tables and other call arguments per token, in the model's dtype
    intermediate: int
    own_dtype: torch.dtype
    blocks_name: str  # where the blocks are: model.layers, transformer.h, ...
    fed_by_norm: dict[str, bool]  # block 0's prunable linear layers (local names): is the input a norm's output?
    linear_params: int  # a block's prunable linear weights


def _empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # rotary tables are real: small, and needed to run a block
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head is the embeddings' tensor: counted once, as a checkpoint holds it
    return model


def block_call(model: Any, blocks: Any, tokens: int, batch: int, device: torch.device) -> tuple[tuple, dict]:
    """What block 0 receives for `batch` windows of `tokens` tokens: the model runs from inputs_embeds (so the
    embeddings need no weights) and stops at block 0."""
    got: dict[str, Any] = {}

    def catch(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        got["call"] = (args, kwargs)
        raise StopForward

    for mod in model.modules():  # the real buffers (rotary tables) to the device; parameters stay meta
        for name, buf in list(mod._buffers.items()):
            if buf is not None and not buf.is_meta:
                mod._buffers[name] = buf.to(device)
    # Small parameters outside the blocks (final norm, learned positions) get zeros: the forward reads them.
    embeddings = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    inside = {id(p) for p in blocks.parameters()}
    for mod in model.modules():
        if id(mod) in embeddings:
            continue
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) not in inside:
                real = torch.zeros_like(p, device=device) if p.is_meta else p.detach().to(device)
                mod._parameters[name] = nn.Parameter(real, requires_grad=False)
    hidden_size = model.config.get_text_config().hidden_size
    embeds = torch.zeros(batch, tokens, hidden_size, dtype=next(model.parameters()).dtype, device=device)
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad(), contextlib.suppress(StopForward):
            model(inputs_embeds=embeds, use_cache=False)
    finally:
        handle.remove()
    if "call" not in got:
        raise StadeError("Could not run this model up to its first block to plan it.", "run it with --no-time")
    return got["call"]


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


def _probe(block: nn.Module, lin: dict[str, nn.Module], args: tuple, kwargs: dict) -> Any:
    """Run `block` on the meta device with calibration's hooks, which record its layer groups."""
    from stade_cli.models.experts import fused_experts
    from stade_cli.stats.accumulators import BlockCollector

    collector = BlockCollector(block, lin, torch.device("meta"), False)
    experts = fused_experts(block)
    for mod in experts.values():  # routing has no meta kernel; the experts' output has the shape of their input
        mod.forward = lambda hidden_states, *_a, **_k: hidden_states
    try:
        with torch.no_grad():
            block(*args, **kwargs)
    finally:
        collector.remove()
        for mod in experts.values():
            del mod.forward
    return collector


def read_shapes(config: Any, dtype: torch.dtype) -> tuple[Shapes, Any]:
    """The model's shapes, and its layer groups from block 0 run on the meta device with calibration's hooks."""
    from stade_cli.models.blocks import _to
    from stade_cli.models.loading import max_context

    model: Any = _empty_model(config, dtype)
    model.eval()
    blocks_name, blocks = find_blocks(model)
    seen: set[int] = set()
    params = 0
    for p in model.parameters():  # unique: a tied head is one tensor
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    probe = 16
    args, kwargs = block_call(model, blocks, probe, 1, torch.device("cpu"))
    arg_bytes = (_tensor_bytes(args[1:]) + _tensor_bytes(kwargs)) // probe
    meta = torch.device("meta")
    memo: dict[int, Any] = {}
    args, kwargs = _to(args, meta, memo), _to(kwargs, meta, memo)
    lin = linear_layers(blocks[0])
    collector = _probe(blocks[0], lin, args, kwargs)
    groups: dict[str, list[tuple[int, int]]] = {}
    for name, mod in lin.items():
        weight: Any = mod.weight
        rows, cols = (int(n) for n in weight.shape)
        out_in = (rows, cols) if type(mod).__name__ != "Conv1D" else (cols, rows)
        groups.setdefault(collector.group_of.get(name, name), []).append(out_in)
    text = model.config.get_text_config()
    inter = max((i for members in groups.values() for _o, i in members), default=text.hidden_size)
    inter = max(inter, max((o for members in groups.values() for o, _i in members), default=0))
    shapes = Shapes(
        n_blocks=len(blocks),
        hidden=int(text.hidden_size),
        vocab=int(text.vocab_size),
        context=max_context(model),
        params=params,
        block_params=block_params,
        outside_params=params - in_blocks,
        input_embedding_params=sum(p.numel() for p in model.get_input_embeddings().parameters()),
        groups=groups,
        arg_bytes_per_token=arg_bytes,
        intermediate=int(inter),
        own_dtype=dtype,
        blocks_name=blocks_name,
        fed_by_norm={name: collector.fed_by_norm.get(name, False) for name in lin},
        linear_params=sum(o * i for members in groups.values() for o, i in members),
    )
    return shapes, model


# ----------------------------------------------------------------------------------------------- memory


def activation_bytes(shapes: Shapes, tokens: int, elem: int, stats: bool) -> int:
    """One block's forward on `tokens` tokens: the MLP's widest point, or the attention's."""
    # act(gate), up and their product live at once; the down projection's hook then centres a float32 copy
    # of its input (Moments.update) while only the product is left.
    wide = max(3 * elem, elem + 4 if stats else 0) * tokens * shapes.intermediate
    attn = 4 * tokens * shapes.hidden * elem  # q, k, v, attention output
    return max(wide, attn) + 2 * tokens * shapes.hidden * elem  # residual and normed input


def hessian_bytes(shapes: Shapes) -> int:
    """Float32 accumulators of one block (Hessian.value scales them in place)."""
    return sum(4 * members[0][1] ** 2 for members in shapes.groups.values())


def peak_phase(*phases: dict[str, int]) -> dict[str, int]:
    """The terms of the phase that needs the most: what lives in one phase is gone in the next."""
    return max(phases, key=lambda terms: sum(terms.values()))
