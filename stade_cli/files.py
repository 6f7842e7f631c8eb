"""Atomic artifacts: everything is written under a temporary name and renamed into place at the end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import StadeError


def check_writable(out: Path, force: bool) -> None:
    """Refuse to replace an existing output unless --force was given (called before any work)."""
    if out.exists() and not force:
        raise StadeError(f"Output {str(out)!r} already exists.", "pass --force to replace it, or choose another --out")


@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only if the block finishes (Ctrl-C leaves nothing)."""
    check_writable(out, force)
    tmp = out.with_name(out.name + ".incomplete")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically: a temp file, then rename."""
    tmp = path.with_name(path.name + ".incomplete")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StadeError(f"{what} {str(path)!r} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StadeError(f"{what} {str(path)!r} is not valid JSON: {exc}", "was it truncated?") from None
    if not isinstance(data, dict):
        raise StadeError(f"{what} {str(path)!r} is not a JSON object.")
    return data


SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
}


class SafetensorsWriter:
    """A safetensors file written one tensor at a time, so that only the tensor being added is in memory.

    The data go to a side file as they come; `close()` writes the header (which needs every offset)
    and appends the data behind it. A 13B model's Hessians are 40+ GB: they cannot wait in memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data_path = path.with_name(path.name + ".data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in close()
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # little-endian bytes, any dtype
        end = self._offset + len(raw)
        entry = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, end]}
        self._header[name] = entry
        self._data.write(raw)
        self._offset = end

    def close(self) -> None:
        self._data.close()
        head = json.dumps(self._header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the data start 8-byte aligned, as safetensors itself writes them
        with open(self.path, "wb") as f, open(self._data_path, "rb") as data:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            shutil.copyfileobj(data, f, 1 << 24)
        self._data_path.unlink()
