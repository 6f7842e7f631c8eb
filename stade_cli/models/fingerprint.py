"""Cheap identities of a model's weights, so that statistics are never applied to another model."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def sample_step(numel: int) -> int:
    """The stride of a tensor's fingerprint sample: about 4096 values whatever its size."""
    return max(1, numel // 4096)


def fingerprint_sample(name: str, tensor: torch.Tensor, strided: torch.Tensor | None = None) -> bytes:
    """One tensor's part of the fingerprint: its name and shape, and a strided sample of its values.

    `strided`: the sample already taken (flat values at `sample_step`), where `tensor` is only its shape (meta).
    """
    if strided is None:
        flat = tensor.detach().reshape(-1)
        strided = flat[:: sample_step(flat.numel())]
    values = strided.to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes()
    return f"{name}:{tuple(tensor.shape)}".encode() + values


def fingerprint(model: nn.Module, samples: dict[str, bytes] | None = None) -> str:
    """A cheap identity of the weights: every tensor's name and shape plus a strided sample of its values.

    Hashing every byte of a 70B model would take minutes; a sample of each tensor still tells
    two different checkpoints apart, which is all the statistics check needs. Values are rounded to
    bfloat16 first, so a bfloat16 checkpoint gives the same fingerprint loaded in bfloat16 or float32.
    `samples` holds parts taken from the files (a lazily loaded model's: weights.file_samples); they stand for the
    tensors in memory too, whose values depend on the dtype the model runs in.
    """
    parts = dict(samples or {})
    for name, p in model.state_dict().items():
        if name in parts:  # taken from the files, as stored
            continue
        if p.is_meta:
            raise ValueError(f"{name} is not loaded and has no fingerprint sample")
        parts[name] = fingerprint_sample(name, p)
    h = hashlib.sha256()
    for name in sorted(parts):
        h.update(parts[name])
    return h.hexdigest()


def full_fingerprint(model: nn.Module) -> str:
    """sha256 over each parameter's name then float32 bytes, names sorted (the reference README's scheme)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
