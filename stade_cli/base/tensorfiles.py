"""Safetensors files read and written without a second copy in memory: planned files written tensor by tensor at
their offsets, files that grow one tensor at a time (and resume), plain reads instead of mappings."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from stade_cli.base.dtypes import BY_CODE, CODE_OF
from stade_cli.base.files import fsync_path

# safetensors' dtype enum, in its order: a file lists its tensors from the last of these to the first, then by name.
_ENUM_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


def _write_at(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's little-endian bytes on the CPU, without a copy where it is already there and contiguous."""
    t = tensor.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().data


Slot = tuple[int, int, torch.dtype, list[int]]  # offset, bytes, dtype, shape


def planned_header(
    entries: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, Slot], int]:
    """The header `safetensors.torch.save_file` writes for these tensors (larger dtypes first, then by name, padded
    to 8 bytes), each tensor's slot, and the data's size: the file is 8 + len(header) + size bytes."""
    order = sorted(entries, key=lambda n: (-_ENUM_ORDER.index(CODE_OF[entries[n][0]]), n))
    header: dict[str, dict] = {"__metadata__": metadata} if metadata is not None else {}
    slots: dict[str, Slot] = {}
    offset = 0
    for name in order:
        dtype, shape = entries[name]
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": CODE_OF[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        slots[name] = (offset, size, dtype, list(shape))
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b" " * (-len(head) % 8), slots, offset


class PlannedSafetensors:
    """A safetensors file whose every tensor is known (name, dtype, shape) before any is written.

    The header goes first and each tensor is written at its offset whenever it comes, in any order:
    no side file and no copy. The layout is the one `safetensors.torch.save_file` writes (larger
    dtypes first, then by name, the header padded to 8 bytes), so the file is byte for byte the same.
    """

    def __init__(
        self, path: Path, entries: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        head, self.slots, size = planned_header(entries, metadata)
        self._base = 8 + len(head)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_at(self._fd, struct.pack("<Q", len(head)) + head, 0)
            os.ftruncate(self._fd, self._base + size)
        except BaseException:
            self.abort()
            raise
        self._missing = set(entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, _size, dtype, shape = self.slots[name]
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise ValueError(f"{name}: planned {dtype} {shape}, got {tensor.dtype} {list(tensor.shape)}")
        _write_at(self._fd, _raw(tensor), self._base + offset)
        self._missing.discard(name)

    def close(self) -> None:
        """Close; every planned tensor must have been written."""
        if self._fd < 0:
            return
        self.abort()
        if self._missing:
            raise ValueError(f"{self.path.name}: {len(self._missing)} tensors never written, e.g. {min(self._missing)}")

    def abort(self) -> None:
        """Close the file as it is (a failed run: its folder is about to be removed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SafetensorsWriter:
    """A safetensors file written one tensor at a time, in place: only the tensor being added is in memory,
    and the file is written once (no side file, no copy). A 13B model's Hessians are 40+ GB.

    The header goes first, but which tensors come is known only as they come (a block's layers that share
    an input share one tensor). So room for the largest header they could need is kept at the start,
    the data follow it as they come, and `close()` writes the header there, padded with spaces as
    safetensors itself pads. `hashes` has each tensor's sha256, for checking one tensor as it is read.

    `state()` after `sync()` describes the file so far; a writer made with it (`resume`) continues a killed run's
    file from exactly there, so that a resumed calibration writes each Hessian once.
    """

    def __init__(self, path: Path, header_room: int, resume: dict[str, Any] | None = None) -> None:
        self.path = path
        self._room = header_room + (-header_room % 8)
        self._header: dict[str, dict] = dict(resume["header"]) if resume else {}
        self.hashes: dict[str, str] = dict(resume["hashes"]) if resume else {}
        self._offset = int(resume["offset"]) if resume else 0
        self._file = open(path, "r+b" if resume else "wb")  # noqa: SIM115 - closed in close()
        self._file.truncate(8 + self._room + self._offset)  # what a killed run wrote after its last commit goes
        self._file.seek(8 + self._room + self._offset)

    @staticmethod
    def room_for(entries: dict[str, tuple[torch.dtype, list[int]]]) -> int:
        """Header bytes that any subset of these tensors, written in any order, fits in."""
        big = 10**18  # offsets never have more digits than this
        header = {
            n: {"dtype": CODE_OF[d], "shape": list(s), "data_offsets": [big, big]} for n, (d, s) in entries.items()
        }
        return len(json.dumps(header, separators=(",", ":")).encode())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = _raw(tensor)
        end = self._offset + raw.nbytes
        shape = list(tensor.shape)
        self._header[name] = {"dtype": CODE_OF[tensor.dtype], "shape": shape, "data_offsets": [self._offset, end]}
        self._file.write(raw)
        self.hashes[name] = hashlib.sha256(raw).hexdigest()
        self._offset = end

    def sync(self) -> dict[str, Any]:
        """Flush what was added to the disk; the state a resumed writer starts from."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return {"room": self._room, "offset": self._offset, "header": self._header, "hashes": self.hashes}

    def close(self) -> None:
        head = json.dumps(self._header, separators=(",", ":")).encode()
        if len(head) > self._room:
            raise ValueError(f"{self.path.name}: header of {len(head)} bytes exceeds the {self._room} kept for it")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self._room) + head + b" " * (self._room - len(head)))
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file that exists complete or not at all, flushed to the disk, written from the tensors' own
    memory (safetensors' save_file first copies every tensor into one buffer: a block's Hessians twice over)."""
    tmp = path.with_name(path.name + ".tmp")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    out = PlannedSafetensors(tmp, {k: (v.dtype, list(v.shape)) for k, v in cpu.items()})
    try:
        for k, v in cpu.items():
            out.write(k, v)
    except BaseException:
        out.abort()
        raise
    out.close()
    fsync_path(tmp)
    os.replace(tmp, path)


def header(file: Path) -> dict[str, tuple[int, dict]]:
    """A safetensors file's entries: name -> (byte offset of the data section, entry)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        entries = json.loads(f.read(n))
    entries.pop("__metadata__", None)
    return {k: (8 + n, v) for k, v in entries.items()}


def read_tensors(file: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file (all, in file order, when None), read with plain reads.

    safetensors' own loaders map the whole file, and its tensors live in that mapping: every page touched
    stays resident as long as any tensor from the file lives (a small tensor kept from a large file keeps
    all it touched), and those pages count in the process's RSS next to any copy. A read leaves one copy.
    Raises OSError, ValueError or KeyError for a file that is truncated or damaged, or lacks a name.
    """
    entries = header(file)
    out = {}
    with open(file, "rb", buffering=0) as f:
        for name in list(entries) if names is None else names:
            base, entry = entries[name]
            if entry["dtype"] not in BY_CODE:
                raise ValueError(f"tensor {name} has dtype {entry['dtype']}, which stade does not read")
            start, end = entry["data_offsets"]
            t = torch.empty(entry["shape"], dtype=BY_CODE[entry["dtype"]])
            view = t.reshape(-1).view(torch.uint8).numpy().data.cast("B")
            if view.nbytes != end - start:
                raise ValueError(f"tensor {name}'s offsets do not match its shape")
            f.seek(base + start)
            done = 0
            while done < view.nbytes:  # one read returns at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"the file ends inside tensor {name}")
                done += n
            out[name] = t
    return out
