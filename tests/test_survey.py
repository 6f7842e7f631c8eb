"""The hostile survey's defects that are not one refused command (those are rows of test_bad_input.CASES):
each test names its item and failed before the fix."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from test_bad_input import CALIBRATE, ROOT, World, stade, world  # noqa: F401 (world: the shared fixture)
from transformers import AutoModelForCausalLM

from stade_cli.base.ownership import MARKER


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_artifacts_honour_the_umask(world: World, tmp_path: Path) -> None:  # noqa: F811
    """15: safetensors writes its files 0600, so a colleague could not read shared statistics or checkpoints."""
    fill = {"model": world.model, "text": world.text, "stats": world.stats}
    with umask(0o002):  # group-writable: neither safetensors' 0600 nor the usual 0644
        res = stade([*shlex.split(CALIBRATE.format(**fill)), "--hessian", "--out", str(tmp_path / "s")])
        assert res.exit_code == 0, res.output
        prune = f"prune {world.model} --stats {tmp_path / 's'} --method wanda,sparsegpt --sparsity 0.5 --device cpu"
        res = stade([*shlex.split(prune), "--out", str(tmp_path / "p")])
        assert res.exit_code == 0, res.output
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"stats.safetensors", "tokens.safetensors", "model.safetensors"}
    modes = {str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert set(modes.values()) == {"0o664"}, modes


def test_streaming_keeps_the_generation_config(world: World, tmp_path: Path) -> None:  # noqa: F811
    """16: the streaming prune wrote a generation config derived from config.json, dropping pad_token_id."""
    from transformers import GenerationConfig

    model = tmp_path / "m"
    model.mkdir()
    for f in world.model.iterdir():
        (model / f.name).symlink_to(f)
    (model / "generation_config.json").unlink()
    own = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=True, temperature=0.6, top_p=0.9)
    own.save_pretrained(model)
    prune = f"prune {model} --stats {world.stats} --method wanda --sparsity 0.5 --device cpu --out {tmp_path / 'p'}"
    res = stade(shlex.split(prune))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "stade.json").read_text())["route"] == "streaming"
    written = json.loads((tmp_path / "p" / "generation_config.json").read_text())
    saved = json.loads((model / "generation_config.json").read_text())
    assert written == saved


def test_results_files_are_strict_json(world: World, tmp_path: Path) -> None:  # noqa: F811
    """3: a diverged model's perplexity was written as a bare `Infinity`, which strict JSON readers refuse."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # mean NLL past 709: exp overflows (test_bad_input's overflow case)
    model.save_pretrained(tmp_path / "m")
    for f in world.model.glob("tokenizer*"):
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "r.json"
    args = f"--ppl {world.text} --tasks none --seqlen 64 --max-windows 2 --device cpu --out {out}"
    res = stade(["eval", str(tmp_path / "m"), *shlex.split(args)])
    assert res.exit_code == 0, res.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    doc = json.loads(out.read_text(), parse_constant=refuse)
    assert doc["perplexity"][str(world.text)]["ppl"] == "inf"
    res = stade(["compare", str(out), "--json"])  # and it reads back as the number
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["rows"]
    assert list(row["values"].values()) == ["inf"]


# ----------------------------------------------------------------------------------------------- outputs owned


CLI = "from stade_cli.cli import main; main()"


def spawn(args: list[str], home: Path, before: str = "") -> subprocess.Popen:
    """stade in a fresh process (`before`: Python run first, e.g. a patch), as a user's shell starts it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STADE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", before + CLI, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=hear_ctrl_c)  # fmt: skip


def hear_ctrl_c() -> None:
    """A job started in the background (`make test &`, a CI runner) inherits Ctrl-C ignored, and Python keeps it
    so: the child gets the default back, as a terminal would give it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def outputs(kind: str, world: World, out: Path) -> tuple[list[str], Path]:  # noqa: F811
    """The command line of a run of `kind` writing `out`, and the unfinished twin that shows it has started."""
    if kind == "prune":
        args = f"prune {world.model} --stats {world.stats} --method wanda,magnitude --sparsity 0.5 --device cpu"
        return [*shlex.split(args), "--out", str(out)], out / "wanda-unstructured-0.5.incomplete" / MARKER
    if kind == "calibrate":
        args = shlex.split(CALIBRATE.format(model=world.model, text=world.text))
        return [*args, "--out", str(out)], out.with_name(out.name + ".incomplete") / MARKER
    args = f"eval {world.model} --ppl {world.text} --tasks none --seqlen 16 --max-windows 2 --device cpu"
    return [*shlex.split(args), "--out", str(out)], out.with_name(out.name + ".incomplete")


@pytest.mark.slow  # fresh interpreters: seconds each
def test_a_second_sweep_on_the_same_out_is_refused(world: World, tmp_path: Path) -> None:  # noqa: F811
    """1: two sweeps on one --out both exited 0, and their checkpoints lost model.safetensors. The second run is
    refused, naming the first, which then finishes whole."""
    out = tmp_path / "o"
    args, started = outputs("prune", world, out)
    first = spawn(args, tmp_path / "home")
    wait_for(started, first)
    first.send_signal(signal.SIGSTOP)  # holds its claim, mid-run
    try:
        second = stade(args)
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert second.exit_code == 1, second.output
    said = " ".join(second.stderr.split())
    assert f"Another stade run is writing '{out}" in said and f"(process {first.pid} on" in said
    assert first.returncode == 0, stderr
    for name in ("wanda-unstructured-0.5", "magnitude-unstructured-0.5"):
        model = AutoModelForCausalLM.from_pretrained(out / name)  # whole: it loads
        assert model.num_parameters() > 0 and (out / name / "stade.json").is_file()
    assert not [p.name for p in tmp_path.rglob("*") if "incomplete" in p.name or p.name == MARKER]


@pytest.mark.parametrize("kind", ["calibrate", "eval"])
def test_calibrate_and_eval_refuse_an_out_another_run_writes(kind: str, world: World, tmp_path: Path) -> None:  # noqa: F811
    """1: the same for calibrate and eval, against another run's live claim (its marker, locked by another open file
    as by another process), then nothing left of the refused run once the first is gone."""
    out = tmp_path / ("r.json" if kind == "eval" else "o")
    args, marker = outputs(kind, world, out)
    if marker.name == MARKER:  # a folder's marker; a results file's claim is the marker itself
        marker.parent.mkdir()
    record = {"kind": "stade-run", "pid": 4242, "host": "node7", "started": time.time(), "command": "stade " + kind}
    marker.write_text(json.dumps(record))
    fd = os.open(marker, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the other run lives
    try:
        res = stade(args)
    finally:
        os.close(fd)
    assert res.exit_code == 1, res.output
    assert f"Another stade run is writing '{out}' (process 4242 on node7, started" in " ".join(res.stderr.split())
    assert marker.exists() and not out.exists()  # the other run's claim untouched
    res = stade(args)  # the other run is gone (its lock with it): its leftover goes, and this run is whole
    assert res.exit_code == 0, res.output
    assert not marker.exists() and out.exists()


def test_a_dead_runs_leftover_is_cleared_but_not_a_stranger(world: World, tmp_path: Path) -> None:  # noqa: F811
    """5: only an unfinished folder carrying stade's marker, whose run is gone, is removed."""
    left = tmp_path / "p.incomplete"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    record = {"kind": "stade-run", "pid": 999999, "host": "gone", "started": 0, "command": "stade prune"}
    (left / MARKER).write_text(json.dumps(record))  # a killed run's: nobody holds its lock
    args = f"prune {world.model} --stats {world.stats} --method wanda --sparsity 0.5 --device cpu --out {tmp_path}/p"
    res = stade(shlex.split(args))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert MARKER not in {p.name for p in (tmp_path / "p").iterdir()}


@pytest.mark.slow  # a fresh interpreter, and a folder of many files
def test_interrupting_force_never_leaves_the_old_output_half_deleted(world: World, tmp_path: Path) -> None:  # noqa: F811
    """6: Ctrl-C while --force removed the old output left it half-deleted, and threw the new one away. The old
    output is moved aside whole first; the new one is in place before the old one is deleted."""
    old = tmp_path / "p"
    old.mkdir()
    for i in range(40_000):
        (old / f"f{i}").write_bytes(b"")
    args = f"prune {world.model} --stats {world.stats} --method wanda --sparsity 0.5 --device cpu --out {old} --force"
    proc = spawn(shlex.split(args), tmp_path / "home")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".p.replaced.*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    said = " ".join(stderr.split())
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "No partial output" not in said, stderr
    assert f"the new output '{old}' is in place; the one it replaced is partly deleted in" in said
    assert AutoModelForCausalLM.from_pretrained(old).num_parameters() > 0  # the new output, whole
    assert json.loads((old / "stade.json").read_text())["kind"] == "stade-prune-report"
    assert not list(old.glob("f*"))


@pytest.mark.slow  # fresh interpreters
def test_a_kill_as_calibrate_assembles_keeps_every_block(world: World, tmp_path: Path) -> None:  # noqa: F811
    """4: a kill after the last block, as the artifact was being put in place, lost every committed block: the
    progress was deleted first. It stays until the artifact is in place, so --resume finishes from there."""
    args = [*shlex.split(CALIBRATE.format(model=world.model, text=world.text)), "--hessian", "--resume"]
    kill = "import os, signal, stade_cli.base.files as f\n"
    kill += "f._swap_in = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"  # as it puts the artifact in place
    proc = spawn([*args, "--out", str(tmp_path / "s")], tmp_path / "home", before=kill)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    res = stade([*args, "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "Resuming after block 1: 2 block(s) were committed." in " ".join(res.stderr.split())
    whole = stade([*args[:-1], "--out", str(tmp_path / "w")])  # the same calibration, never killed
    assert whole.exit_code == 0, whole.output
    for name in ("stats.safetensors", "hessians.safetensors", "tokens.safetensors"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "w" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(p.name for p in (tmp_path / "w").iterdir())


def test_an_interrupted_resumable_calibration_says_what_it_kept(
    world: World,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """4: Ctrl-C said "No partial output was left behind" while the committed blocks were kept for --resume."""
    from stade_cli.stats.resume import BlockLog

    commit = BlockLog.commit

    def commit_then_interrupt(self: BlockLog, block: int, *args: Any) -> None:
        commit(self, block, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(BlockLog, "commit", commit_then_interrupt)
    args = [*shlex.split(CALIBRATE.format(model=world.model, text=world.text)), "--resume"]
    res = stade([*args, "--out", str(tmp_path / "s")])
    said = " ".join(res.stderr.split())
    assert res.exit_code == 130, res.output
    assert "No partial output" not in said
    assert f"Kept: the committed progress is kept in '{tmp_path}/s.incomplete': rerun with --resume" in said
    assert (tmp_path / "s.incomplete" / "progress.json").is_file()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_statistics_in_another_dtype_fit_the_model(dtype: str, world: World, tmp_path: Path) -> None:  # noqa: F811
    """8: statistics calibrated in float16 on a float32 model were refused by every prune ("computed on another
    model"): the fingerprint followed the dtype computed in. It now reads the values the files store."""
    fill = {"model": world.model, "text": world.text}
    res = stade([*shlex.split(CALIBRATE.format(**fill)), "--dtype", dtype, "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    same = json.loads((world.stats / "manifest.json").read_text())["model"]["fingerprint"]
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["model"]["fingerprint"] == same
    prune = f"prune {world.model} --stats {tmp_path / 's'} --method wanda --sparsity 0.5 --device cpu"
    res = stade([*shlex.split(prune), "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output


def test_calibrate_plans_the_disk_its_progress_takes(
    world: World,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """9: calibrate's disk pre-flight left out the hidden states it commits each block (for --resume): the plan said
    0.00 GB and the disk filled after two blocks. The plan holds the peak the folder reaches."""
    import torch

    import stade_cli.stats.resume as resume
    from stade_cli.planning.plan import PlanConfig, make_plan

    peak = 0
    write_json = resume.write_json

    def measured(path: Path, *args: Any, **kwargs: Any) -> None:  # at each commit, before the last hidden states go
        nonlocal peak
        write_json(path, *args, **kwargs)
        peak = max(peak, sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file()))

    monkeypatch.setattr(resume, "write_json", measured)
    ids = torch.randint(0, 250, (8, 32))
    from safetensors.torch import save_file

    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    args = f"calibrate {world.model} --data {tmp_path / 'ids.safetensors'} --hessian --device cpu"
    res = stade([*shlex.split(args), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    config = PlanConfig(8, 32, hessian=True, timed=False, data=str(tmp_path / "ids.safetensors"))
    stage = make_plan(str(world.model), config, torch.device("cpu")).stages["calibrate"]
    assert peak > stage.disk  # the progress is more than the artifact alone
    assert peak <= stage.disk + stage.scratch <= 1.25 * peak


def test_plan_and_preflight_on_a_bfloat16_mixtral(world: World, tmp_path: Path) -> None:  # noqa: F811
    """11: `stade plan` crashed on Mixtral ("Expected inputs of BF16 type"), and calibrate, prune and eval of MoE
    models then skipped their memory and disk pre-flight. (Fixed with the one driver, issue 18.)"""
    import torch
    from conftest import moe_config, tiny_tokenizer

    model = tmp_path / "mixtral"
    AutoModelForCausalLM.from_config(moe_config("mixtral")).to(torch.bfloat16).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    res = stade(["plan", str(model), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "MoE: the experts' statistics" in " ".join(res.stdout.split())
    res = stade([*shlex.split(CALIBRATE.format(model=model, text=world.text)), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "plan (calibrate): peak host RAM" in res.stderr


def test_plan_of_the_builtin_model_converts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """19: `stade plan smollm2-135m` converted the GGUF (517 MB under $STADE_HOME), though a plan reads no weights.
    It reads the GGUF's metadata alone, and plans what the conversion will be."""
    converted = stade(["plan", "smollm2-135m", "--device", "cpu", "--json"])  # the session's home: converted
    assert converted.exit_code == 0, converted.output
    monkeypatch.setenv("STADE_HOME", str(tmp_path / "home"))
    fresh = stade(["plan", "smollm2-135m", "--device", "cpu", "--json"])
    assert fresh.exit_code == 0, fresh.output
    made = [p for p in (tmp_path / "home").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in made) < 100_000 and not (tmp_path / "home" / "models").exists(), made

    def figures(doc: dict) -> dict:
        return {k: v for k, v in doc.items() if k not in ("model", "notes")} | {
            "stages": {k: {t: v for t, v in s.items() if t != "seconds_estimate"} for k, s in doc["stages"].items()}
        }

    assert figures(json.loads(fresh.stdout)) == figures(json.loads(converted.stdout))


@pytest.mark.slow  # a fresh interpreter
def test_two_quick_ctrl_c_print_no_traceback(world: World, tmp_path: Path) -> None:  # noqa: F811
    """13: a second Ctrl-C while the first was handled printed a KeyboardInterrupt traceback (from torch's atexit
    hooks), or stopped the clean-up halfway. The clean-up finishes, and the exit is quiet."""
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(0, 256, (3000, 64))}, str(tmp_path / "ids.safetensors"))
    args = ["calibrate", str(world.model), "--data", str(tmp_path / "ids.safetensors"), "--hessian", "--device", "cpu"]
    proc = spawn([*args, "--out", str(tmp_path / "s")], tmp_path / "home")
    wait_for(tmp_path / "s.incomplete" / "progress.json", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "Interrupted. No partial output was left behind." in stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["ids.safetensors"]
