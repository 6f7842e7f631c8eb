"""An unfinished output belongs to the run that writes it.

Every output is written under its unfinished twin, `OUT.incomplete` (a folder, or for a results file a file), and
renamed into place at the end (files.atomic_dir, files.atomic_write). The twin carries stade's marker: a small JSON
record of the run (process, host, start, command), held under an exclusive `flock` for as long as the run lives.
The kernel drops the lock when the process ends, even when it is killed, so a second run can tell a live writer
(refused, naming it) from a dead run's leftover (removed, or taken over by `calibrate --resume`), and stade never
deletes a twin that does not carry its marker.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stade_cli.base.errors import StadeError

MARKER = ".stade-run"  # inside an unfinished folder; an unfinished results file is the marker itself
MARKER_KIND = "stade-run"
HELD: dict[Path, int] = {}  # the unfinished twins this process holds, with the descriptor that holds the lock


def unfinished(out: Path) -> Path:
    return out.with_name(out.name + ".incomplete")


def _marker(tmp: Path) -> Path:
    return tmp / MARKER if tmp.is_dir() else tmp


def _read_marker(marker: Path) -> dict | None:
    """The marker's record, or None where the file is not stade's marker."""
    try:
        data = json.loads(marker.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == MARKER_KIND else None


def _owner(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"process {record.get('pid')} on {record.get('host')}, started {started}: {record.get('command', '')}"


def _try_lock(marker: Path) -> int | None:
    """A descriptor holding the marker's lock, or None while a live run holds it."""
    fd = os.open(marker, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _stamp(fd: int) -> None:
    """Write this run's record into the marker it holds."""
    record = {"kind": MARKER_KIND, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    record["command"] = " ".join(["stade", *sys.argv[1:]])
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


def check_unfinished(out: Path) -> None:
    """Refuse, before any work, what is in the way of `out`'s unfinished twin: a link, a file or folder stade did
    not make, or a live run writing `out`. A dead run's leftover passes (the run removes it, or resumes it)."""
    tmp = unfinished(out)
    if tmp in HELD:  # this run's own
        return
    if tmp.is_symlink():
        raise StadeError(f"{str(tmp)!r} is in the way: it is a link where stade writes its unfinished output.",
                         "remove it, or choose another --out")  # fmt: skip
    if not tmp.exists():
        return
    marker = _marker(tmp)
    record = _read_marker(marker) if marker.is_file() else None
    if record is None:
        what = "folder" if tmp.is_dir() else "file"
        raise StadeError(
            f"{str(tmp)!r} is in the way: stade writes its unfinished output there, and this {what} is not stade's "
            "(it carries no stade marker).",
            "remove or rename it yourself, or choose another --out",
        )
    fd = _try_lock(marker)
    if fd is None:
        raise StadeError(
            f"Another stade run is writing {str(out)!r} ({_owner(record)}).",
            "wait for it to finish, or stop it; or choose another --out",
        )
    os.close(fd)


def _take(out: Path, keep: bool, folder: bool) -> int:
    """Make `out`'s unfinished twin this run's, exclusively: afresh (a dead run's leftover removed first) or, with
    `keep`, a dead run's taken over as it is. Returns the descriptor holding the lock."""
    tmp = unfinished(out)
    for _ in range(3):
        if tmp.exists() or tmp.is_symlink():
            check_unfinished(out)
            fd = _try_lock(_marker(tmp))
            if fd is None:
                continue  # taken between the check and the lock: the check names the run
            if keep and folder:
                _stamp(fd)
                return fd
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            os.close(fd)
            continue
        staging = tmp.with_name(f".{tmp.name}.{os.getpid()}")  # made whole, then renamed: tmp appears marked
        if folder:
            staging.mkdir()
        marker = staging / MARKER if folder else staging
        fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _stamp(fd)
        try:  # both fail where another run made tmp first (a rename onto a file would replace it: a link)
            os.rename(staging, tmp) if folder else os.link(staging, tmp)
        except OSError:
            os.close(fd)
            shutil.rmtree(staging) if folder else staging.unlink()
            continue
        if not folder:
            staging.unlink()
        return fd
    raise StadeError(f"Could not take {str(tmp)!r}: other runs keep making it.", "run one at a time")


@contextmanager
def owned(out: Path, keep: bool = False, folder: bool = True) -> Iterator[Path]:
    """`out`'s unfinished twin, this run's alone for the `with` (see the module's docstring)."""
    tmp = unfinished(out)
    fd = _take(out, keep, folder)
    HELD[tmp] = fd
    try:
        yield tmp
    finally:
        if HELD.pop(tmp, None) is not None and not folder:  # a results file never written: its claim goes
            tmp.unlink(missing_ok=True)
        os.close(fd)
