"""Atomic artifacts: everything is written under a temporary name and renamed into place at the end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
