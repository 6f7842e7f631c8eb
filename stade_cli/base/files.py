"""Atomic artifacts: everything is written under a temporary name and renamed into place at the end."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from stade_cli.base.errors import StadeError


def check_writable(out: Path, force: bool) -> None:
    """Refuse to replace an existing output unless --force, and refuse a location that cannot be written.

    Called before any work, so that a read-only or misplaced --out is found before hours of compute.
    """
    if out.exists() and not force:
        raise StadeError(f"Output {str(out)!r} already exists.", "pass --force to replace it, or choose another --out")
    check_location(out)


def _existing_parent(out: Path) -> Path:
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_space(out: Path, needed: int) -> None:
    """Refuse, before the work, an output that cannot fit in the free space where it goes."""
    parent = _existing_parent(out)
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise StadeError(
            f"{str(out)!r} needs about {needed / 1e9:.2f} GB, but only {free / 1e9:.2f} GB are free there.",
            "free some space or choose another --out",
        )


def check_location(out: Path) -> None:
    """The folder that will hold `out` must be (or be creatable inside) a writable folder.

    The test is a real one: a probe file is created and removed in the nearest existing folder, since
    permission bits say nothing for root or for a read-only mount.
    """
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise StadeError(f"Cannot write {str(out)!r}: {str(parent)!r} is a file, not a folder.", "choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=".stade-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StadeError(
            f"Cannot write {str(out)!r}: {str(parent)!r} is not writable ({exc.strerror or exc}).",
            "choose another --out",
        ) from None


def check_apart(out: Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse an output that is, contains or lies inside an input: --force would destroy the input.

    `inputs` are (description, path) pairs such as ("--stats", "stats/"); names that are not local paths
    (a hub id) are skipped.
    """
    target = out.expanduser().resolve()
    for what, path in inputs:
        if path is None or not Path(path).expanduser().exists():
            continue
        source = Path(path).expanduser().resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "is inside"
        else:
            continue
        raise StadeError(
            f"Output {str(out)!r} {relation} {what} {str(path)!r}: writing it would destroy the input.",
            "choose an --out apart from every input",
        )


def cause(exc: BaseException) -> str:
    """The reason of an OS or safetensors write error, in a few words ("No space left on device")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    # safetensors wraps the OS error in Rust's words: '... I/O error: File too large (os error 27)'
    match = re.search(r'message: "([^"]+)"', text) or re.search(r"([A-Z][^:()]*) \(os error \d+\)", text)
    return match.group(1) if match else text


def write_error(path: Path, exc: BaseException) -> StadeError:
    return StadeError(
        f"Could not write {str(path)!r}: {cause(exc)}.", "free some space or choose another --out, then run again"
    )


def is_write_error(exc: BaseException, folder: Path) -> bool:
    """An error writing into `folder`: an OS error on a file there (or on no named file, as a full disk's
    write() gives), or safetensors failing to serialize. Errors reading an input are not: they name it."""
    if isinstance(exc, OSError):
        return exc.filename is None or str(exc.filename).startswith(str(folder))
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and "serializ" in text and "deserializ" not in text


@contextmanager
def atomic_dir(out: Path, force: bool, keep: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only if the block finishes (Ctrl-C leaves nothing).

    With `keep`, what a killed run left in the temporary folder is used and kept, even on an error
    (calibrate --resume: committed progress is never thrown away; the folder never looks complete).
    """
    check_writable(out, force)
    tmp = out.with_name(out.name + ".incomplete")
    if tmp.exists() and not keep:
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True, exist_ok=keep)
    except OSError as exc:
        raise write_error(out, exc) from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException as exc:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(exc, tmp):
            raise write_error(out, exc) from None
        raise


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically: a temp file, then rename."""
    tmp = path.with_name(path.name + ".incomplete")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


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
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
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
        order = sorted(entries, key=lambda n: (-_ENUM_ORDER.index(SAFETENSORS_DTYPES[entries[n][0]]), n))
        header: dict[str, dict] = {"__metadata__": metadata} if metadata is not None else {}
        self.slots: dict[str, tuple[int, int, torch.dtype, list[int]]] = {}
        offset = 0
        for name in order:
            dtype, shape = entries[name]
            size = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self.slots[name] = (offset, size, dtype, list(shape))
            offset += size
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self._base = 8 + len(head)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_at(self._fd, struct.pack("<Q", len(head)) + head, 0)
        os.ftruncate(self._fd, self._base + offset)
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
    """

    def __init__(self, path: Path, header_room: int) -> None:
        self.path = path
        self._room = header_room + (-header_room % 8)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.seek(8 + self._room)
        self._header: dict[str, dict] = {}
        self._offset = 0
        self.hashes: dict[str, str] = {}

    @staticmethod
    def room_for(entries: dict[str, tuple[torch.dtype, list[int]]]) -> int:
        """Header bytes that any subset of these tensors, written in any order, fits in."""
        big = 10**18  # offsets never have more digits than this
        header = {
            n: {"dtype": SAFETENSORS_DTYPES[d], "shape": list(s), "data_offsets": [big, big]}
            for n, (d, s) in entries.items()
        }
        return len(json.dumps(header, separators=(",", ":")).encode())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = _raw(tensor)
        end = self._offset + raw.nbytes
        entry = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, end],
        }
        self._header[name] = entry
        self._file.write(raw)
        self.hashes[name] = hashlib.sha256(raw).hexdigest()
        self._offset = end

    def close(self) -> None:
        head = json.dumps(self._header, separators=(",", ":")).encode()
        if len(head) > self._room:
            raise ValueError(f"{self.path.name}: header of {len(head)} bytes exceeds the {self._room} kept for it")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self._room) + head + b" " * (self._room - len(head)))
        self._file.close()
