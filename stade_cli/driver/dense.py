"""The dense weights, kept while a block (or, for save_pretrained's sink, the whole model) is pruned once per run,
and put back between runs: so one load and one read of each block serve a whole sweep."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stade_cli.models import hf
from stade_cli.models.blocks import iterate_blocks
from stade_cli.models.layers import find_blocks


def linears_with_bias(module: nn.Module) -> set[str]:
    """The linear layers of `module` that have a bias now."""
    return {n for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}


def drop_added_biases(module: nn.Module, biased: set[str]) -> None:
    """Remove the biases a bias update added to linear layers that had none (`biased`: those that had one)."""
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is not None and name not in biased:
            mod.register_parameter("bias", None)


class DenseBlock:
    """A block's dense state (on the CPU) and which of its linear layers had a bias."""

    def __init__(self, block: nn.Module) -> None:
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in block.state_dict().items()}
        self.biased = linears_with_bias(block)

    def restore(self, block: nn.Module) -> None:
        drop_added_biases(block, self.biased)
        block.load_state_dict(self.state, strict=True)  # copies into the block's own tensors, on its device


class Snapshot:
    """Every block's dense state and the config's bias switches, for a sweep whose runs each take a whole pass
    (save_pretrained's sink: the model holds one run's pruned weights until they are saved)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.biased = linears_with_bias(model)
        self.blocks = [(block, DenseBlock(block)) for _i, _p, block in iterate_blocks(model)]
        self.config = hf.bias_keys(model.config)

    def restore(self) -> None:
        drop_added_biases(self.model, self.biased)
        for block, dense in self.blocks:
            dense.restore(block)
        for k, v in self.config.items():
            setattr(self.model.config, k, v)


def outside_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The tensors outside the blocks (embeddings, final norm, an untied head), where they are in memory."""
    blocks = find_blocks(model)[0] + "."
    return {n: t for n, t in model.state_dict().items() if not n.startswith(blocks) and not t.is_meta}
