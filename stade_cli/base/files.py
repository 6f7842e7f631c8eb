"""Atomic artifacts: everything is written under a temporary name and renamed into place at the end."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stade_cli.base.errors import StadeError
from stade_cli.base.ownership import HELD, MARKER, check_unfinished, owned

LEFT: list[str] = []  # what a failed run keeps on disk, in words, for its last message (cli_errors)


def check_writable(out: Path, force: bool) -> None:
    """Refuse to replace an existing output unless --force, and refuse a location that cannot be written, a link,
    the folder the user is in, or an unfinished twin in the way (ownership.check_unfinished).

    Called before any work, so that a read-only or misplaced --out is found before hours of compute.
    """
    if out.is_symlink():
        target = os.readlink(out)
        state = "" if out.exists() else ", which does not exist"
        raise StadeError(
            f"Output {str(out)!r} is a link to {target!r}{state}: stade writes a new file or folder in place of an "
            "output, and will neither follow nor replace a link.",
            "give the path it points to, or another --out",
        )
    here = Path.cwd()
    if out.name in ("", ".", "..") or out.resolve() == here or out.resolve() in here.parents:
        raise StadeError(f"Output {str(out)!r} is the folder you are in, or holds it.", "give a new folder's name")
    if out.exists() and not force:
        raise StadeError(f"Output {str(out)!r} already exists.", "pass --force to replace it, or choose another --out")
    check_location(out)
    check_unfinished(out)


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
def atomic_dir(out: Path, force: bool, keep: bool = False, scratch: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder, this run's alone (ownership.owned), that becomes `out` only if the block finishes
    (Ctrl-C leaves nothing); its files are flushed to the disk before it takes its name (atomic_write's durability
    policy). Folders made to hold it are removed again if it fails and they stay empty (a sweep's --out).

    With `keep`, what a killed run left in the temporary folder is used and kept, even on an error
    (calibrate --resume: committed progress is never thrown away; the folder never looks complete). Files matching
    the `scratch` patterns (that progress) are removed only once the folder is in place: a kill just before can
    still resume.
    """
    check_writable(out, force)
    with contextlib.ExitStack() as stack:
        tmp, made = _claim(stack, out, keep, folder=True)
        yield from _fill(tmp, out, keep, made, scratch)


def _claim(stack: contextlib.ExitStack, out: Path, keep: bool, folder: bool) -> tuple[Path, list[Path]]:
    """`out`'s unfinished twin taken for the stack's life (ownership.owned), with the folders made to hold it."""
    made = [p for p in out.absolute().parents if not p.exists()]
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        return stack.enter_context(owned(out, keep, folder)), made
    except OSError as exc:
        _remove_empty(made)
        raise write_error(out, exc) from None


@contextmanager
def claimed(path: Path) -> Iterator[None]:
    """A file output (a results file) this run's alone from now until atomic_write puts it in place: a second run
    writing it is refused from its start, not silently overwritten at its end (ownership.owned)."""
    with contextlib.ExitStack() as stack:
        _tmp, made = _claim(stack, path, keep=False, folder=False)
        try:
            yield
        except BaseException:
            stack.close()  # the claim goes first, then the folders it needed
            _remove_empty(made)
            raise


@contextmanager
def made_once(dest: Path, done: str) -> Iterator[Path | None]:
    """A cache folder (a converted model, sample text, a task) made by whichever process comes first: the others
    (torchrun's ranks, two commands at once) wait on a lock beside it, then find it made (None: nothing to do).
    `done`: the file whose presence says it is made."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest.with_name(f".{dest.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if (dest / done).exists():
            yield None
        else:
            with atomic_dir(dest, force=True) as tmp:
                yield tmp
    finally:
        os.close(fd)


def _fill(tmp: Path, out: Path, keep: bool, made: list[Path], scratch: tuple[str, ...]) -> Iterator[Path]:
    """atomic_dir's body: the caller fills `tmp`, which then takes `out`'s name, or goes on failure."""
    try:
        yield tmp
        mode = 0o666 & ~umask()  # some writers (safetensors) make their files 0600: shared statistics must be readable
        for f in sorted(tmp.rglob("*")):  # a folder that looks complete must be complete, even after a crash
            if f.is_file():
                f.chmod(mode)
                fsync_path(f)
        _swap_in(tmp, out, (MARKER, *scratch))
    except BaseException as exc:
        if keep:
            LEFT.append(f"the committed progress is kept in {str(tmp)!r}: rerun with --resume to go on from it")
        else:
            with signals_held():  # a second Ctrl-C must not stop the clean-up halfway
                shutil.rmtree(tmp, ignore_errors=True)
                _remove_empty(made)
        if is_write_error(exc, tmp):
            raise write_error(out, exc) from None
        raise


def _swap_in(tmp: Path, out: Path, scratch: tuple[str, ...]) -> None:
    """`tmp` takes `out`'s name, and then loses what only the unfinished folder needed (`scratch` patterns). An
    output replaced (--force) is first moved aside whole with one rename, and deleted only once the new one is in
    place: an interrupt never leaves it half-deleted in place."""
    aside = out.with_name(f".{out.name}.replaced.{os.getpid()}") if out.exists() else None
    try:
        with signals_held():  # between the renames an interrupt would leave neither output in place
            if aside is not None:
                os.replace(out, aside)
            os.replace(tmp, out)
            for pattern in scratch:
                for f in out.glob(pattern):
                    f.unlink()
            fsync_path(out.parent)
        if aside is not None:
            shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
    except BaseException:
        if out.exists() and not tmp.exists():  # stopped after the swap: say what is where
            old = f"; the one it replaced is partly deleted in {str(aside)!r}: remove it" if aside else ""
            LEFT.append(f"the new output {str(out)!r} is in place{old}")
        raise


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the `with` ends (a few renames), then take effect as usual."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run made, innermost first, where they are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def umask() -> int:
    """The process's umask (read by setting it, so set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk: after this a crash cannot lose it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes, durable: bool = False) -> None:
    """Write `path` whole or not at all: a temporary file renamed into place.

    The durability policy: `durable` writes are flushed to the disk before the rename and the folder after it,
    for what a crash must not lose (resume progress); a finished artifact folder is flushed whole before it takes its
    name (atomic_dir); other single files rely on the rename alone.
    """
    tmp = path.with_name(path.name + ".incomplete")
    raw = data.encode("utf8") if isinstance(data, str) else data
    held = HELD.get(tmp)  # an output this run took at its start (ownership.owned): its marker becomes the file
    try:
        if held is None:
            tmp.write_bytes(raw)
        else:
            os.ftruncate(held, 0)
            view = memoryview(raw)
            while view:
                view = view[os.pwrite(held, view, len(raw) - len(view)) :]
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        HELD.pop(tmp, None)  # written: the claim is spent (its lock goes with the `owned` block)
        if durable:
            fsync_path(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def write_json(path: Path, data: object, durable: bool = False, sort_keys: bool = False) -> None:
    """Write strict JSON atomically (see atomic_write for `durable`), indented as save_pretrained writes it."""
    atomic_write(path, json.dumps(strict_json(data), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n", durable)


def strict_json(obj: object) -> object:
    """`obj` with every non-finite number (a diverged perplexity) as the string "inf", "-inf" or "nan": `Infinity`
    and `NaN` are not JSON, and break `jq` and other strict readers (the artifacts' reader turns them back)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


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
