"""Spreading a model over the GPUs, then host RAM, then disk with accelerate's device_map, for `stade eval`.

A 70B model does not fit on one GPU; evaluation only needs each layer where it runs. accelerate places
the layers in order over the devices within `max_memory` and moves activations between them (and
weights in from disk, where some must stay there), so one machine evaluates what no one device holds.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from stade_cli.base.errors import StadeError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_max_memory(spec: str) -> dict[int | str, int]:
    """accelerate's spelling, e.g. '0=70GiB,1=70GiB,cpu=200GiB' -> {0: bytes, 1: bytes, 'cpu': bytes}."""
    out: dict[int | str, int] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        m = _SIZE.match(size)
        if not sep or m is None or not (key.isdigit() or key == "cpu"):
            raise StadeError(
                f"--max-memory part {part!r} is not DEVICE=SIZE.",
                "spell it as accelerate does: 0=70GiB,1=70GiB,cpu=200GiB (GPU index or cpu, then a size)",
            )
        dev: int | str = int(key) if key.isdigit() else "cpu"
        if dev in out:
            raise StadeError(f"--max-memory names {key!r} twice.", "give each device once")
        if isinstance(dev, int) and dev >= max(torch.cuda.device_count(), 0) and torch.cuda.is_available():
            raise StadeError(f"--max-memory names GPU {dev}, but this machine has {torch.cuda.device_count()}.")
        if isinstance(dev, int) and not torch.cuda.is_available():
            raise StadeError(f"--max-memory names GPU {dev}, but this machine has no CUDA GPU.", "use cpu=SIZE")
        out[dev] = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if not out:
        raise StadeError("--max-memory is empty.", "e.g. --max-memory 0=70GiB,cpu=200GiB")
    return out


def wants_dispatch(device: str, max_memory: str | None) -> bool:
    """Spread the model when asked for a memory budget, or when `auto` has several GPUs to spread over."""
    return max_memory is not None or (device == "auto" and torch.cuda.device_count() > 1)


def dispatch_kwargs(max_memory: str | None, offload_folder: str) -> dict[str, Any]:
    """What from_pretrained takes to spread the model (layers beyond every budget go to `offload_folder`)."""
    kw: dict[str, Any] = {"device_map": "auto", "offload_folder": offload_folder}
    if max_memory is not None:
        kw["max_memory"] = parse_max_memory(max_memory)
    return kw


def placement(model: Any) -> dict[str, int] | None:
    """How many of the model's placed modules each device holds, or None for a model on one device."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return None
    counts: dict[str, int] = {}
    for where in device_map.values():
        key = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[key] = counts.get(key, 0) + 1
    return counts
