"""Bad input, one row per case: each fails with one clear line, no traceback, and leaves nothing behind.

Read a row of CASES as: the command line after `stade` ({placeholders} come from the shared `world` and the
case's own folder {tmp}), what is set up first, the exit code, and the phrases the `Error:` line must hold.
Every failing row also checks that no file appeared, changed or vanished, in the case's folder or among the
shared inputs (nothing partial, nothing destroyed); rows marked `upfront` check that no model was loaded
(the input was refused before any work). Cases that are not one command (compare keeping results apart,
an infinite perplexity, SIGTERM, a quiet stderr) follow the table.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import save_tiny_model
from typer.testing import Result

from helpers import invoke

ROOT = Path(__file__).resolve().parent.parent
TEXT = "\n\n".join(f"Story {i}. " + "The quick brown fox jumps over the lazy dog. " * 12 for i in range(30))


@dataclass
class World:
    """Inputs shared by every row (never modified: each row checks that)."""

    root: Path
    model: Path  # a tiny Llama
    qwen: Path  # a tiny Qwen2
    text: Path
    stats: Path  # the Llama's statistics, with Hessians
    results: Path  # folder of results files (Llama at seqlen 16 and 32, a pruned Qwen2)
    ro: Path | None  # a folder nobody can write into, even root (None: none on this machine)


def _read_only_dir(root: Path) -> Path | None:
    """As root, permission bits do not stop writes; sysfs does (for everyone). Otherwise a chmod-ed folder."""
    if os.geteuid() != 0:
        ro = root / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    sys_dir = Path("/sys")
    try:
        (sys_dir / "stade-probe").touch()
    except OSError:
        return sys_dir
    (sys_dir / "stade-probe").unlink()
    return None


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad-input-world")
    model, qwen = save_tiny_model("llama", root / "llama"), save_tiny_model("qwen2", root / "qwen2", seed=1)
    text = root / "text.txt"
    text.write_text(TEXT)
    results = root / "results"
    calibrate = "calibrate {m} --data {t} --nsamples 4 --seqlen 16 --device cpu --out {o}"
    evaluate = "eval {m} --ppl {t} --tasks none --seqlen {s} --max-windows 3 --device cpu --out {o}"
    for command in (
        calibrate.format(m=model, t=text, o=root / "stats") + " --hessian",
        calibrate.format(m=qwen, t=text, o=root / "qwen-stats"),
        f"prune {qwen} --stats {root / 'qwen-stats'} --method wanda --sparsity 0.5 --out {root / 'qwen-pruned'}",
        evaluate.format(m=model, t=text, s=16, o=results / "llama-16.json"),
        evaluate.format(m=model, t=text, s=32, o=results / "llama-32.json"),
        evaluate.format(m=root / "qwen-pruned", t=text, s=16, o=results / "qwen-pruned-16.json"),
    ):
        res = stade(command)
        assert res.exit_code == 0, res.output
    return World(root, model, qwen, text, root / "stats", results, _read_only_dir(root))


def stade(command: str | list[str], **kwargs: Any) -> Result:
    return invoke(*(shlex.split(command) if isinstance(command, str) else command), **kwargs)


# ----------------------------------------------------------------------------------------------- setups


def file_at(name: str, content: bytes = b"x") -> Callable[..., None]:
    def setup(_w: World, tmp: Path, _mp: pytest.MonkeyPatch) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content)

    return setup


def folder_at(name: str) -> Callable[..., None]:
    return lambda _w, tmp, _mp: (tmp / name).mkdir(parents=True)


def token_file(ids: torch.Tensor) -> Callable[..., None]:
    def setup(_w: World, tmp: Path, _mp: pytest.MonkeyPatch) -> None:
        from safetensors.torch import save_file

        save_file({"input_ids": ids}, str(tmp / "ids.safetensors"))

    return setup


def model_copy(change: Callable[[Path], None]) -> Callable[..., None]:
    """A copy of the Llama in {tmp}/m, damaged by `change`."""

    def setup(w: World, tmp: Path, _mp: pytest.MonkeyPatch) -> None:
        shutil.copytree(w.model, tmp / "m")
        change(tmp / "m")

    return setup


def truncate_weights(folder: Path) -> None:
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate((folder / "model.safetensors").stat().st_size // 2)


def sharded_truncated(w: World, tmp: Path, _mp: pytest.MonkeyPatch) -> None:
    """The Llama in shards in {tmp}/m, its last shard cut short (a copy interrupted)."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(w.model).save_pretrained(tmp / "m", max_shard_size="150KB")
    for f in w.model.glob("tokenizer*"):
        shutil.copy(f, tmp / "m")
    last = sorted((tmp / "m").glob("model-*.safetensors"))[-1]
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 2)


def bad_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "lla')


def drop_tokenizer(folder: Path) -> None:
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()


def stats_copy(edit: Callable[[dict], None]) -> Callable[..., None]:
    """A copy of the statistics with its manifest edited by hand."""

    def setup(w: World, tmp: Path, _mp: pytest.MonkeyPatch) -> None:
        shutil.copytree(w.stats, tmp / "stats")
        manifest = json.loads((tmp / "stats" / "manifest.json").read_text())
        edit(manifest)
        (tmp / "stats" / "manifest.json").write_text(json.dumps(manifest))

    return setup


def stats_tensors(file: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[..., None]:
    """A copy of the statistics with a data file's tensors edited and its hashes made to match (a consistent
    artifact of bad values, as a damaged model or a hand edit leaves)."""

    def setup(w: World, tmp: Path, _mp: pytest.MonkeyPatch) -> None:
        import hashlib

        from safetensors.torch import load_file, save_file

        shutil.copytree(w.stats, tmp / "stats")
        path = tmp / "stats" / file
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
        manifest = json.loads((tmp / "stats" / "manifest.json").read_text())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest["files"][file] = {"bytes": path.stat().st_size, "sha256": digest}
        if file == "hessians.safetensors":
            raw = {k: t.contiguous().reshape(-1).view(torch.uint8).numpy().data for k, t in tensors.items()}
            manifest["hessian_sha256"] = {k: hashlib.sha256(r).hexdigest() for k, r in raw.items()}
        (tmp / "stats" / "manifest.json").write_text(json.dumps(manifest))

    return setup


def poison(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name].view(-1)[3] = value

    return edit


def nan_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def link_at(name: str, target: str) -> Callable[..., None]:
    """{tmp}/name, a symbolic link to {tmp}/target (which exists only if the target names a setup's folder)."""

    def setup(_w: World, tmp: Path, _mp: pytest.MonkeyPatch) -> None:
        if target.endswith("/"):
            (tmp / target).mkdir()
        (tmp / name).symlink_to(tmp / target)

    return setup


def wider_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))


def rename_group(manifest: dict) -> None:
    manifest["layers"][0]["group"] = manifest["layers"][0]["group"].rsplit(".", 1)[0] + ".renamed"


def results_edited(w: World, tmp: Path, _mp: pytest.MonkeyPatch) -> None:
    doc = json.loads((w.results / "llama-16.json").read_text())
    (tmp / "r.json").write_text(json.dumps({**doc, "sparsity": "half"}))


def parquet(column: list) -> Callable[..., None]:
    def setup(_w: World, tmp: Path, _mp: pytest.MonkeyPatch) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": column}), tmp / "d.parquet")

    return setup


def raising(target: str, exc: BaseException) -> Callable[..., None]:
    def setup(_w: World, _tmp: Path, mp: pytest.MonkeyPatch) -> None:
        def fail(*_a: Any, **_k: Any) -> None:
            raise exc

        mp.setattr(target, fail)

    return setup


def sigterm_in(target: str) -> Callable[..., None]:
    """SIGTERM arrives (as from `timeout`) when the run reaches `target`: mid-run, inside the atomic output."""

    def setup(_w: World, _tmp: Path, mp: pytest.MonkeyPatch) -> None:
        module, name = target.rsplit(".", 1)
        original = getattr(importlib.import_module(module), name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)

        mp.setattr(target, wrapped)

    return setup


def no_space(_w: World, _tmp: Path, mp: pytest.MonkeyPatch) -> None:
    """The disk fills up as the results file is written."""
    write_bytes = Path.write_bytes

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name.endswith(".incomplete"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(self, *args, **kwargs)

    mp.setattr(Path, "write_bytes", full)

    def pwrite(*_a: Any) -> int:  # the results file claimed at the start is written through its descriptor
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr("stade_cli.base.files.os.pwrite", pwrite)


def heap_setting(value: str) -> Callable[..., None]:
    """STADE_HEAP (bench/heap.py's knob) set to `value`, read afresh by the next command."""

    def setup(_w: World, _tmp: Path, mp: pytest.MonkeyPatch) -> None:
        from stade_cli.base import heap

        mp.setenv("STADE_HEAP", value)
        heap._libc.cache_clear()  # a refused setting is not cached: the next command sets the default anew

    return setup


def small_disk(_w: World, _tmp: Path, mp: pytest.MonkeyPatch) -> None:
    """100 kB free: less than the tiny checkpoint's ~0.5 MB. Pruning must not even start."""
    full = SimpleNamespace(total=10**9, used=10**9, free=100_000)
    mp.setattr("stade_cli.base.files.shutil.disk_usage", lambda _p: full)
    for started in ("stade_cli.driver.loop.prune_step", "stade_cli.driver.loop.start_runs"):  # the one loop
        mp.setattr(started, lambda *a, **k: pytest.fail("pruning started"))


def markup_names(w: World, tmp: Path, mp: pytest.MonkeyPatch) -> None:
    """Names that read as Rich markup ([/x] would raise MarkupError, [red] would vanish); short, to show whole."""
    shutil.copytree(w.model, tmp / "m[/x]")
    shutil.copy(w.text, tmp / "d[red].txt")
    mp.chdir(tmp)


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A real write failure: files may grow to `limit` bytes only (EFBIG past it, as a full disk gives ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# ----------------------------------------------------------------------------------------------- checks


def results_on_stdout(res: Result, _tmp: Path) -> None:
    """Nothing computed is lost: the results that could not be written are on stdout."""
    doc = json.loads(res.stdout[res.stdout.index("{") :])
    assert doc["kind"] == "stade-results" and doc["perplexity"]


def report_logged(res: Result, _tmp: Path) -> None:
    match = re.search(r"report is in (\S+\.log)", " ".join(res.stderr.split()))
    assert match, res.stderr
    log = Path(match.group(1))
    assert log.parent == Path(os.environ["STADE_HOME"]) / "logs"
    assert "Traceback" in log.read_text() and "ZeroDivisionError: boom" in log.read_text()


def oom_hint(res: Result, _tmp: Path) -> None:
    assert "--batch-size" in res.stderr and "--device auto" in res.stderr


def nothing_pruned_noted(res: Result, tmp: Path) -> None:
    """Survey 18: a ratio under one weight per row prunes nothing; the run says so, and the checkpoint records it."""
    note = "--sparsity 1e-09 pruned no weight"
    assert note in " ".join(res.output.split()), res.output
    assert any(note in w for w in json.loads((tmp / "p" / "stade.json").read_text())["warnings"])


def names_shown(res: Result, _tmp: Path) -> None:
    assert "m[/x]" in res.stdout and "d[red].txt" in res.stdout, res.stdout


# ----------------------------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    args: str  # after `stade`; {model} {qwen} {text} {stats} {results} {ro}: shared inputs; {tmp}: the case's folder
    code: int
    phrases: tuple[str, ...]  # all in the Error line (exit 1), or in click's usage box (exit 2)
    setup: Callable[[World, Path, pytest.MonkeyPatch], None] | None = None
    upfront: bool = False  # refused before any model is loaded
    around: Callable[[], AbstractContextManager] = nullcontext
    check: Callable[[Result, Path], None] | None = None


PRUNE = "prune {model} --stats {stats} --method wanda --sparsity 0.5 --device cpu"
EVAL = "eval {model} --ppl {text} --tasks none --seqlen 16 --max-windows 2 --device cpu"
SWEEP = "prune {model} --stats {stats} --method wanda,magnitude --sparsity 0.5 --device cpu"
CALIBRATE = "calibrate {model} --data {text} --nsamples 2 --seqlen 16 --device cpu"
BIG = torch.tensor([[1, 2, 300, 4]] * 2)  # 300: the tiny models have 260 ids
NEGATIVE = torch.tensor([[1, 2, -3, 4]] * 2)
PPL = "stade_cli.evaluation.evaluate.perplexity"
BUG = ZeroDivisionError("boom")
CPU_OOM = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 80000000000 bytes.")
OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

UP = True  # refused before any model is loaded
P_TMP = PRUNE.replace("{stats}", "{tmp}/stats") + " --out {tmp}/p"
IDS = "calibrate {model} --data {tmp}/ids.safetensors --out {tmp}/s"
PARQUET = "calibrate {model} --data {tmp}/d.parquet --nsamples 2 --seqlen 16 --out {tmp}/s"
EVAL_IDS = "eval {model} --ppl {tmp}/ids.safetensors --tasks none --seqlen 2 --out {tmp}/r.json"
MARKUP = "eval 'm[/x]' --ppl 'd[red].txt' --tasks none --seqlen 16 --max-windows 2 --out r.json"  # in {tmp}
ONE = "--ppl {text} --tasks none --out {tmp}/r.json"  # the rest of an eval of one model
FULL_64K, FULL_1K = (lambda: file_size_limit(64_000)), (lambda: file_size_limit(1_000))

# fmt: off
CASES = [
    # 1. filesystem: found before any work; a write error is one line naming the path and the cause
    Case("1 prune --out under a file", PRUNE + " --out {tmp}/f/p",
         1, ("'{tmp}/f' is a file, not a folder",), file_at("f"), UP),
    Case("1 calibrate --out under a file", CALIBRATE + " --out {tmp}/f/s",
         1, ("'{tmp}/f' is a file, not a folder",), file_at("f"), UP),
    Case("1 eval --out under a file", EVAL + " --out {tmp}/f/r.json",
         1, ("'{tmp}/f' is a file, not a folder",), file_at("f"), UP),
    Case("1 prune --out read-only", PRUNE + " --out {ro}/p",
         1, ("Cannot write '{ro}/p'", "is not writable (Permission denied)"), upfront=UP),
    Case("1 calibrate --out read-only", CALIBRATE + " --out {ro}/s",
         1, ("is not writable",), upfront=UP),
    Case("1 eval --out read-only", EVAL + " --out {ro}/r.json",
         1, ("is not writable",), upfront=UP),
    Case("1 prune, disk too small: refused before pruning", PRUNE + " --out {tmp}/p",
         1, ("'{tmp}/p' needs about 0.", "only 0.00 GB are free"), small_disk),
    Case("1 prune, disk full", PRUNE + " --out {tmp}/p",
         1, ("Could not write '{tmp}/p'", "File too large"), around=FULL_64K),
    Case("1 calibrate, disk full", CALIBRATE + " --hessian --out {tmp}/s",
         1, ("Could not write '{tmp}/s'", "File too large"), around=FULL_64K),
    Case("1 eval, disk full: results on stdout", EVAL + " --out {tmp}/r.json",
         1, ("Could not write '{tmp}/r.json'", "File too large"), around=FULL_1K, check=results_on_stdout),
    Case("1 eval, no space left: results on stdout", EVAL + " --out {tmp}/r.json",
         1, ("'{tmp}/r.json'", "No space left on device"), no_space, check=results_on_stdout),
    # 2. an output that is, contains or lies inside an input
    Case("2 prune --out = --stats", PRUNE + " --out {stats} --force",
         1, ("is --stats",), upfront=UP),
    Case("2 prune --out = the model", PRUNE + " --out {model} --force",
         1, ("is the model",), upfront=UP),
    Case("2 prune --out holds --stats", P_TMP.replace("--out {tmp}/p", "--out {tmp} --force"),
         1, ("contains --stats",), stats_copy(lambda m: None), UP),
    Case("2 prune sweep inside the model", SWEEP + " --out {model}/pruned",
         1, ("is inside the model",), upfront=UP),
    Case("2 calibrate --out = the model", CALIBRATE + " --out {model} --force",
         1, ("is the model",), upfront=UP),
    Case("2 eval --out = the --ppl file", EVAL + " --out {text} --force",
         1, ("is the --ppl file",), upfront=UP),
    # 3. compare --plot
    Case("3 plot exists, no --force", "compare {results} --plot {tmp}/p.png",
         1, ("'{tmp}/p.png' already exists",), file_at("p.png", b"old")),
    Case("3 plot is a folder", "compare {results} --plot {tmp}/p.png",
         1, ("is a folder",), folder_at("p.png")),
    Case("3 plot read-only", "compare {results} --plot {ro}/p.png",
         1, ("is not writable",)),
    Case("3 plot not .png", "compare {results} --plot {tmp}/p.pdf",
         1, ("does not end in .png",)),
    # 5. empty lists (click's usage errors: exit 2)
    Case("5 --method ''", PRUNE.replace("wanda", "''") + " --out {tmp}/p",
         2, ("--method", "names nothing"), upfront=UP),
    Case("5 --pattern ''", PRUNE + " --pattern '' --out {tmp}/p",
         2, ("--pattern", "names nothing"), upfront=UP),
    Case("5 --sparsity ''", PRUNE.replace("0.5", "''") + " --out {tmp}/p",
         2, ("--sparsity", "names nothing"), upfront=UP),
    # survey 3: a setting that is not a finite number is refused by name, before any work
    Case("s3 --admm-rho nan", PRUNE + " --update admm --admm-rho nan --out {tmp}/p",
         1, ("--admm-rho must be a finite number, got nan",), upfront=UP),
    Case("s3 --admm-rho inf", PRUNE + " --update admm --admm-rho inf --out {tmp}/p",
         1, ("--admm-rho must be a finite number, got inf",), upfront=UP),
    Case("s3 --admm-rho-growth nan", PRUNE + " --update admm --admm-rho-growth nan --out {tmp}/p",
         1, ("--admm-rho-growth must be a finite number, got nan",), upfront=UP),
    Case("s3 --owl-m nan", PRUNE + " --allocation owl --owl-m nan --out {tmp}/p",
         1, ("--owl-m must be a finite number, got nan",), upfront=UP),
    Case("s3 --owl-m inf", PRUNE + " --allocation owl --owl-m inf --out {tmp}/p",
         1, ("--owl-m must be a finite number, got inf",), upfront=UP),
    Case("s3 --owl-lambda nan", PRUNE + " --allocation owl --owl-lambda nan --out {tmp}/p",
         1, ("--owl-lambda must be a finite number, got nan",), upfront=UP),
    # survey 3 and 12: statistics that are not finite, or not of the layer's shape, are refused naming the layer
    Case("s3 a NaN channel mean", P_TMP.replace("wanda", "stade"),
         1, ("layer model.layers.0.self_attn.q_proj: its mean holds NaN or Inf",),
         stats_tensors("stats.safetensors", poison("model.layers.0.self_attn.q_proj.mean", float("nan")))),
    Case("s3 an Inf in m2", P_TMP,
         1, ("layer model.layers.1.mlp.down_proj: its m2 holds NaN or Inf",),
         stats_tensors("stats.safetensors", poison("model.layers.1.mlp.down_proj.m2", float("inf")))),
    Case("s3 a NaN Hessian", P_TMP.replace("wanda", "sparsegpt"),
         1, ("layer model.layers.0.mlp.gate_proj: its Hessian holds NaN or Inf",),
         stats_tensors("hessians.safetensors", poison("model.layers.0.mlp.gate_proj", float("nan")))),
    Case("s12 a reshaped mean", P_TMP,
         1, ("layer model.layers.0.mlp.down_proj: its mean has shape [1, 128], not [128]",),
         stats_tensors("stats.safetensors", lambda t: t.update({k: t[k].reshape(1, -1) for k in list(t)
                                                                 if k.endswith("down_proj.mean")}))),
    Case("s3 calibrate a model with a NaN weight", "calibrate {tmp}/m --data {text} --nsamples 2 --seqlen 16 "
         "--out {tmp}/s", 1, ("Block 0, layer self_attn.o_proj: its mean holds NaN or Inf",), model_copy(nan_weight)),
    # survey 5, 7, 10: outputs are this run's alone; what stade did not make is never deleted; checked up front
    Case("s5 OUT.incomplete stade did not make, --force", PRUNE + " --out {tmp}/p --force",
         1, ("'{tmp}/p.incomplete' is in the way", "is not stade's"), file_at("p.incomplete/data.bin"), UP),
    Case("s10 OUT.incomplete is a file", PRUNE + " --out {tmp}/p",
         1, ("'{tmp}/p.incomplete' is in the way", "this file is not stade's"), file_at("p.incomplete"), UP),
    Case("s10 --out a link, --force", PRUNE + " --out {tmp}/p --force",
         1, ("Output '{tmp}/p' is a link to '{tmp}/real'", "will neither follow nor replace a link"),
         link_at("p", "real/"), UP),
    Case("s10 --out a dangling link", PRUNE + " --out {tmp}/p",
         1, ("Output '{tmp}/p' is a link to '{tmp}/gone', which does not exist",), link_at("p", "gone"), UP),
    Case("s10 --out . --force", PRUNE + " --out . --force",
         1, ("Output '.' is the folder you are in",), lambda _w, tmp, mp: mp.chdir(tmp), UP),
    Case("s7 a sweep stopped mid-run leaves no --out folder", SWEEP + " --out {tmp}/new/sweep",
         143, ("Terminated (SIGTERM). No partial output was left behind.",),
         sigterm_in("stade_cli.driver.loop.prune_step"), check=lambda _r, tmp: sorted(tmp.iterdir()) == []),
    # survey 12: bad input named in one line, not "Unexpected ... a bug in stade"
    Case("s12 plan --hessian-dtype int4", "plan {model} --hessian --hessian-dtype int4 --device cpu",
         1, ("--hessian-dtype 'int4' is not supported",), upfront=UP),
    Case("s12 eval: config.json hidden_size does not fit the weights", "eval {tmp}/m " + ONE,
         1, ("do not fit its config.json: model.embed_tokens.weight is [260, 64] in the weight files, but "
             "config.json makes it [260, 96]",), model_copy(wider_config)),
    Case("s12 calibrate: config.json hidden_size does not fit the weights", CALIBRATE.replace("{model}", "{tmp}/m")
         + " --out {tmp}/s", 1, ("do not fit its config.json",), model_copy(wider_config)),
    Case("s12 a renamed manifest layer group", P_TMP,
         1, ("layer model.layers.0.self_attn.q_proj's group 'model.layers.0.self_attn.renamed' is not in the data",),
         stats_copy(rename_group), UP),
    Case("s12 compare: a results file with sparsity 'half'", "compare {tmp}/r.json",
         1, ("Results file '{tmp}/r.json' has a 'sparsity' of the wrong type (str)",), results_edited),
    # survey 17: one rule for every list: a value named twice is refused, before any work
    Case("s17 --pattern 2:4,2of4", SWEEP + " --pattern 2:4,2of4 --out {tmp}/p",
         1, ("--pattern names '2of4' twice (the same as '2:4')",), upfront=UP),
    Case("s17 --pattern unstructured twice", PRUNE + " --pattern unstructured,unstructured --out {tmp}/p",
         1, ("--pattern names 'unstructured' twice",), upfront=UP),
    Case("s17 --method wanda,Wanda", PRUNE.replace("wanda", "wanda,Wanda") + " --out {tmp}/p",
         1, ("--method names 'Wanda' twice (the same as 'wanda')",), upfront=UP),
    Case("s17 --sparsity 0.5,0.50", PRUNE.replace("0.5", "0.5,0.50") + " --out {tmp}/p",
         1, ("--sparsity names 0.5 twice",), upfront=UP),
    Case("s17 --ppl twice", "eval {model} --ppl {text},{text} --tasks none --out {tmp}/r.json",
         1, ("--ppl names '{text}' twice",), upfront=UP),
    Case("s17 --tasks twice", "eval {model} --ppl none --tasks stade_cloze,stade_cloze --out {tmp}/r.json",
         1, ("--tasks names 'stade_cloze' twice",), upfront=UP),
    Case("s18 --sparsity 1e-9 prunes nothing: noted", PRUNE.replace("0.5", "1e-9") + " --out {tmp}/p",
         0, (), check=nothing_pruned_noted),
    # survey 14: clear messages
    Case("s14 calibrate ''", CALIBRATE.replace("{model}", "''") + " --out {tmp}/s",
         2, ("the model is an empty name",), upfront=UP),
    Case("s14 eval a model named ''", "eval {model} '' " + ONE.replace("r.json", "res"),
         2, ("the model is an empty name",), upfront=UP),
    Case("s14 --stats a file", PRUNE.replace("{stats}", "{text}") + " --out {tmp}/p",
         1, ("'{text}' is a file, not a statistics folder",), upfront=UP),
    Case("s14 stats show a file", "stats show {text}",
         1, ("'{text}' is a file, not a statistics folder",), upfront=UP),
    Case("s14 eval -b 1000000 of a short text: its windows planned", "eval {model} --ppl {text} --tasks none "
         "--seqlen 128 -b 1000000 --device cpu --out {tmp}/r.json", 0, ()),
    Case("s20 STADE_HEAP out of range", PRUNE + " --out {tmp}/p",
         1, ("STADE_HEAP='64' is not 'glibc' or a whole number of MiB from 1 to 32",), heap_setting("64"), UP),
    # 6. bad input data
    Case("6 calibrate ids past the vocabulary", IDS,
         1, ("token id 300", "vocabulary of 260"), token_file(BIG)),
    Case("6 calibrate negative ids", IDS,
         1, ("token id -3",), token_file(NEGATIVE)),
    Case("6 eval ids past the vocabulary", EVAL_IDS,
         1, ("token id 300",), token_file(BIG[:1])),
    Case("6 eval truncated weights", "eval {tmp}/m " + ONE,
         1, ("weights of model '{tmp}/m' are unreadable",), model_copy(truncate_weights)),
    Case("6 calibrate truncated weights", "calibrate {tmp}/m --data {text} --nsamples 2 --seqlen 16 --out {tmp}/s",
         1, ("are unreadable",), model_copy(truncate_weights)),
    Case("6 calibrate, a shard truncated", "calibrate {tmp}/m --data {text} --nsamples 2 --seqlen 16 --out {tmp}/s",
         1, ("is unreadable", "model-0000"), sharded_truncated),
    Case("6 parquet text not strings", PARQUET,
         1, ("'text' column holds int64",), parquet([1, 2, 3])),
    Case("6 parquet corrupt", PARQUET,
         1, ("is not readable",), file_at("d.parquet", b"PAR1 cut short")),
    Case("6 manifest without files", P_TMP,
         1, ("has no 'files'",), stats_copy(lambda m: m.pop("files")), UP),
    Case("6 manifest without layers", P_TMP,
         1, ("has no 'layers'",), stats_copy(lambda m: m.pop("layers")), UP),
    Case("6 manifest count not a number", P_TMP,
         1, ("'count' of the wrong type",), stats_copy(lambda m: m.update(count="many")), UP),
    Case("6 manifest forgets the Hessians", P_TMP,
         1, ("does not account for the data file 'hessians.safetensors'",),
         stats_copy(lambda m: m["files"].pop("hessians.safetensors")), UP),
    Case("6 manifest forgets the statistics", "stats show {tmp}/stats",
         1, ("does not account for the data file 'stats.safetensors'",),
         stats_copy(lambda m: m["files"].pop("stats.safetensors"))),
    # 7. eval --out folder with one model
    Case("7 eval --out folder --force", EVAL + " --out {tmp}/res --force",
         1, ("'{tmp}/res' is a folder",), folder_at("res"), UP),
    # 8. unexpected errors, markup, a sweep's summary
    Case("8 out of memory: one line, a hint", EVAL + " --out {tmp}/r.json",
         1, ("Out of memory", "CUDA out of memory"), raising(PPL, OOM), check=oom_hint),
    Case("8 out of main memory: one line, a hint", EVAL + " --out {tmp}/r.json",
         1, ("Out of memory", "can't allocate memory"), raising(PPL, CPU_OOM), check=oom_hint),
    Case("8 unexpected exception: logged", EVAL + " --out {tmp}/r.json",
         1, ("Unexpected ZeroDivisionError: boom",), raising(PPL, BUG), check=report_logged),
    Case("8 markup in names (works)", MARKUP,
         0, (), markup_names, check=names_shown),
    Case("8 markup in an error", "eval '{tmp}/no[/such]' " + ONE,
         1, ("'{tmp}/no[/such]' does not exist",)),
    Case("8 OS error on an input: one line", "stats show {tmp}/stats",
         1, ("Is a directory: '{tmp}/stats/manifest.json'",), folder_at("stats/manifest.json")),
    Case("8 sweep summary.json exists", SWEEP + " --out {tmp}/sweep",
         1, ("'{tmp}/sweep/summary.json' already exists",), file_at("sweep/summary.json", b"{}"), UP),
    # 9. smaller
    Case("9 SIGTERM mid-run", CALIBRATE + " --out {tmp}/s",
         143, ("Terminated (SIGTERM). No partial output was left behind.",),
         sigterm_in("stade_cli.driver.calibrate.collect")),
    Case("9 no tokenizer: the message whole", "eval {tmp}/m " + ONE,
         1, ("has no usable tokenizer", "from one of: (1) a `tokenizers` library serialization file"),
         model_copy(drop_tokenizer)),
    Case("9 corrupt config.json", "eval {tmp}/m " + ONE,
         1, ("config.json of model folder '{tmp}/m' is not valid JSON",), model_copy(bad_config)),
    Case("9 local name without a slash", "eval nosuchmodel " + ONE,
         1, ("'nosuchmodel' is neither a folder here nor a model on the hub",)),
    Case("9 unknown dataset: did you mean", "eval {model} --ppl wikitxt2 --tasks none --out {tmp}/r.json",
         1, ("Unknown data source 'wikitxt2'",), check=lambda res, _t: "did you mean wikitext2" in res.stderr),
    Case("9 token windows of one token", IDS,
         1, ("windows of 1 token", "at least 2"), token_file(torch.tensor([[5]] * 4))),
]
# fmt: on


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for root in roots for f in root.rglob("*") if f.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "{ro}" in case.args and world.ro is None:
        pytest.skip("no folder on this machine refuses writes to root")
    if case.setup:
        case.setup(world, tmp_path, monkeypatch)
    if case.upfront:
        monkeypatch.setattr("stade_cli.models.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    fill = {"model": world.model, "qwen": world.qwen, "text": world.text, "stats": world.stats}
    fill |= {"results": world.results, "ro": world.ro, "tmp": tmp_path}
    before = _tree(world.root, tmp_path)
    there = set(tmp_path.rglob("*"))
    with case.around():
        res = stade([a.format(**fill) for a in shlex.split(case.args)])
    assert res.exit_code == case.code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    if case.code == 1:
        lines = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1, res.stderr
        for phrase in case.phrases:
            assert phrase.format(**fill) in lines[0], lines[0]
    elif case.code != 0:  # click's usage box (exit 2) may wrap the message: compare its words
        words = " ".join(res.stderr.replace("│", " ").split())
        for phrase in case.phrases:
            assert phrase in words, words
    if case.code != 0:
        assert _tree(world.root, tmp_path) == before  # nothing written, nothing changed, nothing destroyed
    assert not [p for p in set(tmp_path.rglob("*")) - there if "incomplete" in p.name]
    if case.check:
        assert case.check(res, tmp_path) is not False


# ----------------------------------------------------------------------------------------------- the rest


def test_plot_force_replaces_with_a_png(world: World, tmp_path: Path) -> None:
    (tmp_path / "p.png").write_bytes(b"old")
    res = stade(["compare", str(world.results), "--plot", str(tmp_path / "p.png"), "--force"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_compare_keeps_protocols_and_models_apart(world: World) -> None:
    """4: seqlen 16 and 32 perplexities get a column each; the Qwen2 row gets no deltas against the Llama."""
    res = stade(["compare", str(world.results), "--baseline", str(world.results / "llama-16.json"), "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout)
    docs = {p.name: json.loads(p.read_text()) for p in world.results.iterdir()}
    ppl = [c for c in table["columns"] if c["result"] == "ppl"]
    assert len(ppl) == 2 and all("seqlen" in c["name"] for c in ppl)
    rows = {Path(r["source"]).name: r for r in table["rows"]}
    source = str(world.text)
    for name, doc in docs.items():  # each value in the column of its own protocol, and only there
        (key,) = rows[name]["values"]
        assert f"seqlen {doc['perplexity'][source]['seqlen']}," in key
        assert rows[name]["values"][key] == doc["perplexity"][source]["ppl"]
    assert rows["llama-32.json"]["deltas"] == {}  # no column shared with the baseline
    assert rows["qwen-pruned-16.json"]["deltas"] == {}  # same column, another model
    notes = " ".join(table["notes"])
    assert "different protocols" in notes and "qwen2" in notes and "llama" in notes


def test_compare_markdown_says_why_beside_the_table(world: World) -> None:
    res = stade(["compare", str(world.results), "--markdown"])
    assert res.exit_code == 0, res.output
    assert "(seqlen 16, 3 windows)" in res.stdout and "(seqlen 32, 3 windows)" in res.stdout
    assert "note: ppl" in res.stderr and "different protocols" in res.stderr


def test_perplexity_overflow_is_inf(world: World) -> None:
    """8: a broken model's mean NLL above 709 overflows math.exp; the perplexity is inf, not a crash."""
    from transformers import AutoModelForCausalLM

    from stade_cli.evaluation.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(world.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    ids = torch.arange(64).reshape(1, 64) % 200
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    nll = float(torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:]))  # one window: its mean NLL
    assert nll > 710
    result = perplexity(model, ids, 64)
    assert result.ppl == float("inf")
    assert result.window_nll[0] == pytest.approx(nll, rel=1e-3)


def test_debug_shows_the_traceback(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stade_cli.evaluation.evaluate.perplexity", lambda *a, **k: 1 / 0)
    args = [*shlex.split(EVAL.format(model=world.model, text=world.text)), "--out", str(tmp_path / "r.json")]
    res = stade(args, env={"STADE_DEBUG": "1"})
    assert isinstance(res.exception, ZeroDivisionError)


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: seconds, more on a loaded machine
def test_sigterm_cleans_up_like_ctrl_c(world: World, tmp_path: Path) -> None:
    """9: `timeout` or a scheduler sends SIGTERM mid-run: one line, exit 143, no X.incomplete left."""
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(0, 256, (3000, 64))}, str(tmp_path / "ids.safetensors"))
    out = tmp_path / "stats"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STADE_HOME": str(tmp_path / "home")}
    command = "from stade_cli.cli import main; main()"
    args = ["calibrate", str(world.model), "--data", str(tmp_path / "ids.safetensors"), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", command, *args, "--hessian", "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not out.with_name("stats.incomplete").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Terminated (SIGTERM). No partial output was left behind." in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["ids.safetensors"]


def test_zero_shot_leaves_stderr_to_stade(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """9: outside a git checkout, lm_eval's `git describe` and its tqdm bars used to print on stderr."""
    monkeypatch.chdir(tmp_path)  # not a git repository
    args = ["eval", str(world.model), "--ppl", "none", "--tasks", "stade_cloze", "--limit", "4"]
    res = stade([*args, "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    captured = capfd.readouterr()
    for stream in (res.stderr, captured.err):
        assert "fatal:" not in stream and "it/s]" not in stream and "examples/s]" not in stream, stream
    assert "zero-shot" in res.stderr  # stade's own bar is still there
