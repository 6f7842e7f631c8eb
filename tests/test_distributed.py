"""Shards, merge, resume and torchrun: each part of a calibration merges back into the whole run's statistics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from test_calibrate import TEXT, check_against_dense

from stade_cli.driver.calibrate import CalibrationConfig, calibrate
from stade_cli.models.loading import load_model
from stade_cli.stats.artifact import Statistics
from stade_cli.stats.merge import merge_statistics

from helpers import invoke

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
REL = 1e-6


def assert_equal_statistics(got: Statistics, want: Statistics, rel: float = REL) -> None:
    """Same token ids, layers and counts; mean, variance and Hessian within `rel` of the largest entry."""
    assert torch.equal(got.token_ids(), want.token_ids())
    assert (
        got.manifest.dump()["layers"] == want.manifest.dump()["layers"]
        and got.manifest.dump()["count"] == want.manifest.dump()["count"]
    )
    hessian = want.has_hessian
    assert got.has_hessian == hessian
    for name in want.layers:
        a, b = got.layer(name, hessian=hessian), want.layer(name, hessian=hessian)
        for what in ("mean", "var", "hessian") if hessian else ("mean", "var"):
            x, y = getattr(a, what).double(), getattr(b, what).double()
            scale = y.abs().max().item()
            assert (x - y).abs().max().item() <= rel * scale, f"{name} {what}"


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(f"Document {i}. {TEXT}" for i in range(4)))
    return path


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four blocks, so that a run can be killed with blocks done and blocks to go."""
    from conftest import tiny_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("deep-llama")
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


COMMON = {"nsamples": 7, "seqlen": 24, "seed": 1, "hessian": True, "batch_size": 2}


def run(model: Path, out: Path, text: Path, **kwargs) -> Statistics:
    loaded = load_model(str(model), dtype="float32", device="cpu", lazy=True)
    result = calibrate(loaded, CalibrationConfig(**{"data": str(text), **COMMON, **kwargs}), out, CPU)
    assert result is not None
    return result


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path, text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Statistics]:
    """A whole run and its three shards (7 windows: 2, 2 and 3)."""
    root = tmp_path_factory.mktemp("runs")
    out = {"whole": run(tiny_llama_dir, root / "whole", text)}
    for i in range(3):
        out[f"{i}/3"] = run(tiny_llama_dir, root / f"shard{i}", text, shard=f"{i}/3")
    return out


# ----------------------------------------------------------------------------------------------- shards and merge


def test_shards_hold_their_windows(runs: dict[str, Statistics]) -> None:
    ids = runs["whole"].token_ids()
    for i, (start, stop) in enumerate([(0, 2), (2, 4), (4, 7)]):
        shard = runs[f"{i}/3"]
        w = shard.manifest.dump()["windows"]
        assert (w["drawn"], w["start"], w["stop"], w["shard"]) == (7, start, stop, [i, 3])
        assert torch.equal(shard.token_ids(), ids[start:stop])
        assert shard.manifest.dump()["count"] == (stop - start) * 24


def test_merged_shards_equal_the_whole_run(runs: dict[str, Statistics], tmp_path: Path, tiny_llama_dir: Path) -> None:
    shards = [runs[k].path for k in ("2/3", "0/3", "1/3")]  # any order: merged in window order
    res = invoke("stats", "merge", *shards, "--out", tmp_path / "merged", "--json")
    assert res.exit_code == 0, res.output
    merged = Statistics.load(tmp_path / "merged")  # passes the manifest checks and the hashes
    assert json.loads(res.stdout)["count"] == 7 * 24
    assert merged.manifest.dump()["windows"] == {**runs["whole"].manifest.dump()["windows"]}
    assert merged.manifest.dump()["data"] == runs["whole"].manifest.dump()["data"]
    assert [(m["start"], m["stop"]) for m in merged.manifest.dump()["merged_from"]] == [(0, 2), (2, 4), (4, 7)]
    assert_equal_statistics(merged, runs["whole"])
    model = load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model
    assert check_against_dense(model, merged, hessian=True) == 14  # and against a plain dense forward


def test_prune_refuses_a_shard_and_takes_the_merged_artifact(
    runs: dict[str, Statistics], tmp_path: Path, tiny_llama_dir: Path
) -> None:
    def prune(stats: Path):  # wanda 50% from `stats` into tmp_path/p
        return invoke(
            "prune", tiny_llama_dir, "--stats", stats, "-m", "wanda", "--sparsity", "0.5", "-o", tmp_path / "p"
        )

    res = prune(runs["1/3"].path)
    assert res.exit_code == 1 and "shard 1/3 of a calibration (windows 2-3 of 7)" in res.stderr, res.output
    assert "stade stats merge" in res.stderr and not (tmp_path / "p").exists()
    merged = merge_statistics([runs[k].path for k in ("0/3", "1/3", "2/3")], tmp_path / "merged")
    res = prune(merged.path)
    assert res.exit_code == 0, res.output


def test_merge_refuses_an_existing_out(runs: dict[str, Statistics], tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    res = invoke("stats", "merge", runs["0/3"].path, runs["1/3"].path, runs["2/3"].path, "--out", tmp_path / "m")
    assert res.exit_code == 1 and "already exists" in res.stderr


@pytest.fixture(scope="module")
def odd_shards(tiny_llama_dir: Path, text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shards that do not belong with runs['0/3'] (each differs in one way), plus a 2-way split."""
    root = tmp_path_factory.mktemp("odd")
    other = save_tiny_model("llama", root / "other-model", seed=1)
    other_text = root / "other.txt"
    other_text.write_text(text.read_text().replace("fox", "cat"))
    made = {
        "model": run(other, root / "model", text, shard="1/3"),
        "seqlen": run(tiny_llama_dir, root / "seqlen", text, shard="1/3", seqlen=16),
        "data": run(tiny_llama_dir, root / "data", other_text, shard="1/3"),
        "seed": run(tiny_llama_dir, root / "seed", text, shard="1/3", seed=2),
        "half": run(tiny_llama_dir, root / "half", text, shard="0/2"),
    }
    return {k: v.path for k, v in made.items()}


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("model", "differ in model (weights fingerprint)"),
        ("seqlen", "differ in seqlen: 24 vs 16"),
        ("data", "differ in data source"),
        ("seed", "differ in seed: 1 vs 2"),
        ("overlap", "overlap on windows 2-2"),
        ("gap", "Windows 2-3 of the 7 drawn are in none"),
        ("gap-end", "Windows 4-6 of the 7 drawn are in none"),
    ],
)
def test_merge_refuses_shards_that_do_not_fit(
    case: str, words: str, runs: dict[str, Statistics], odd_shards: dict[str, Path], tmp_path: Path
) -> None:
    first, rest = runs["0/3"].path, [runs["2/3"].path]
    if case in odd_shards:
        rest = [odd_shards[case], *rest]
    elif case == "overlap":  # windows 0-2 and 2-3
        first, rest = odd_shards["half"], [runs["1/3"].path, runs["2/3"].path]
    elif case == "gap-end":
        rest = [runs["1/3"].path]
    out = tmp_path / "merged"
    res = invoke("stats", "merge", first, *rest, "--out", out)
    assert res.exit_code == 1, res.output
    message = " ".join(res.stderr.split())
    assert words in message, message
    assert "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob("*.incomplete"))


def test_shard_argument_is_checked(tiny_llama_dir: Path, text: Path, tmp_path: Path) -> None:
    for bad, words in [("2/2", "out of range"), ("1-2", "not of the form I/N"), ("0/9", "cannot be split into 9")]:
        res = invoke(
            "calibrate", tiny_llama_dir, "--data", text, "--nsamples", "7", "--seqlen", "24", "--shard", bad,
            "--out", tmp_path / "s", "--device", "cpu",
        )  # fmt: skip
        assert res.exit_code == 1 and words in " ".join(res.stderr.split()), res.output
        assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------------- resume

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import stade_cli.driver.calibrate as cal
    import stade_cli.stats.collect as col
    from stade_cli.cli import main

    real_commit, real_run = cal.BlockLog.commit, col.run_block
    state = {"committed": -1, "calls": 0}

    def commit(self, block, *args, **kwargs):
        real_commit(self, block, *args, **kwargs)
        state["committed"] = block

    def run_block(*args, **kwargs):
        if state["committed"] == 1:  # block 2, after two committed blocks
            state["calls"] += 1
            if state["calls"] == 2:  # in the middle of it
                os.kill(os.getpid(), signal.SIGKILL)
        return real_run(*args, **kwargs)

    cal.BlockLog.commit, col.run_block = commit, run_block
    sys.argv = ["stade", *sys.argv[1:]]
    main()
    """
)


def test_resume_after_sigkill_gives_identical_statistics(deep_llama: Path, text: Path, tmp_path: Path) -> None:
    args = ["calibrate", str(deep_llama), "--data", str(text), "--nsamples", "7", "--seqlen", "24", "--seed", "1"]
    args += ["--hessian", "-b", "2", "--device", "cpu"]
    out = tmp_path / "stats"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", str(out)], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    unfinished = tmp_path / "stats.incomplete"
    progress = json.loads((unfinished / "progress.json").read_text())
    assert progress["blocks_done"] == 2 and not out.exists()
    assert sorted(p.name for p in unfinished.iterdir() if p.suffix == ".safetensors") == [
        "block-00000.safetensors",
        "block-00001.safetensors",
        "hessians.safetensors",  # the artifact's own file: two blocks' Hessians committed, written once
        "hidden-00001.safetensors",
    ]
    # Nothing takes the half-written folder for statistics.
    for target in (out, unfinished):
        res = invoke("stats", "show", target)
        assert res.exit_code == 1 and "unfinished" in res.stderr, res.output
        res = invoke("stats", "merge", target, target, "--out", tmp_path / "m")
        assert res.exit_code == 1 and "unfinished" in res.stderr, res.output
        res = invoke(
            "prune", deep_llama, "--stats", target, "--method", "wanda", "--sparsity", "0.5", "--out", tmp_path / "p"
        )
        assert res.exit_code == 1 and "unfinished" in res.stderr, res.output
    resumed = invoke(*args, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming after block 1" in resumed.stderr
    assert not unfinished.exists()
    whole = invoke(*args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    a, b = Statistics.load(out), Statistics.load(tmp_path / "whole")
    assert a.manifest.dump()["files"] == b.manifest.dump()["files"], (
        "bitwise the same statistics, Hessians and token ids"
    )
    assert a.manifest.dump()["layers"] == b.manifest.dump()["layers"] and len(a.manifest.dump()["layers"]) == 4 * 7


def test_resume_refuses_other_arguments(deep_llama: Path, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["calibrate", str(deep_llama), "--data", str(text), "--nsamples", "4", "--seqlen", "24", "-b", "2"]
    args += ["--hessian", "--device", "cpu", "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True)
    assert killed.returncode == -9
    res = invoke(*args[:-2], "--seed", "5", "--out", out, "--resume")
    assert res.exit_code == 1
    assert "started with seed 0, this run has 5" in " ".join(res.stderr.split()), res.output
    # The committed Hessians are float32 in the artifact's own file: a bfloat16 run must not append to it.
    res = invoke(*args[:-2], "--hessian-dtype", "bfloat16", "--out", out, "--resume")
    assert res.exit_code == 1
    assert "started with hessian_dtype 'float32', this run has 'bfloat16'" in " ".join(res.stderr.split())
    progress = tmp_path / "stats.incomplete" / "progress.json"
    assert progress.exists(), "a refused resume keeps the progress"
    older = json.loads(progress.read_text())
    del older["version"]  # what stade 0.1.0 committed: its Hessians in the block files
    progress.write_text(json.dumps(older))
    res = invoke(*args[:-2], "--out", out, "--resume")
    assert res.exit_code == 1 and "another version of stade started it" in " ".join(res.stderr.split())


def test_resume_with_nothing_to_resume_starts_afresh(tiny_llama_dir: Path, text: Path, tmp_path: Path) -> None:
    res = invoke(
        "calibrate", tiny_llama_dir, "--data", text, "--nsamples", "2", "--seqlen", "16", "--device", "cpu",
        "--out", tmp_path / "s", "--resume",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "nothing to resume" in res.stderr
    Statistics.load(tmp_path / "s")


# ----------------------------------------------------------------------------------------------- torchrun


def torchrun(nproc: int, *args: str, cwd: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}"]
    return subprocess.run([*cmd, "-m", "stade_cli", *args], env=env, cwd=cwd, capture_output=True, timeout=600)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tiny_llama_dir: Path, text: Path, tmp_path: Path) -> None:
    args = ["calibrate", str(tiny_llama_dir), "--data", str(text), "--nsamples", "7", "--seqlen", "24"]
    args += ["--seed", "1", "--hessian", "-b", "2", "--device", "cpu"]
    res = torchrun(2, *args, "--out", str(tmp_path / "two"), "--json", cwd=tmp_path, port=29611)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert json.loads(res.stdout)["count"] == 7 * 24  # one report, from rank 0
    two = Statistics.load(tmp_path / "two")
    assert two.manifest.dump()["distributed"] == {"world_size": 2, "backend": "gloo", "windows": [[0, 3], [3, 7]]}
    one = run(tiny_llama_dir, tmp_path / "one", text)
    assert (
        two.manifest.dump()["data"] == one.manifest.dump()["data"]
        and two.manifest.dump()["windows"] == one.manifest.dump()["windows"]
    )
    assert_equal_statistics(two, one)


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(str(f))
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stages", "folders", "port"),
    [
        (["--method", "wanda,sparsegpt"], ["wanda-unstructured-0.5", "sparsegpt-unstructured-0.5"], 29613),
        (["--method", "admm", "--pattern", "2:4"], [""], 29614),
        (["--method", "wanda", "--update", "admm"], [""], 29615),
        (["--method", "wanda", "--allocation", "owl"], [""], 29616),
    ],
    ids=["wanda,sparsegpt", "admm 2:4", "wanda+admm", "wanda+owl"],
)
def test_torchrun_sequential_prune_equals_one_process(
    stages: list[str], folders: list[str], port: int, tiny_llama_dir: Path, text: Path, tmp_path: Path
) -> None:
    """Every stage combination torchrun runs (sequential, no reconstruction), on 2 ranks each streaming the blocks
    from the files: the same masks and weights as one process.

    The ranks' statistics are merged exactly but sum in another order than one process does (float32
    batch means and X^T X), so a score tie closer than ~1e-7 could flip a mask: the bound allowed is
    1 flip per 10,000 weights. wanda's kept weights are the dense ones, bit for bit; those a solve updates
    (sparsegpt's Cholesky of H, ADMM's) amplify H's ~1e-7 differences: they must agree to 1e-4 of the largest.
    """
    stats = run(tiny_llama_dir, tmp_path / "stats", text, hessian=False)
    args = ["prune", str(tiny_llama_dir), "--stats", str(stats.path), *stages]
    args += [*([] if "--pattern" in stages else ["--sparsity", "0.5"]), "--sequential", "-b", "2", "--device", "cpu"]
    res = torchrun(2, *args, "--out", str(tmp_path / "two"), "--json", cwd=tmp_path, port=port)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    reports = json.loads(res.stdout)  # one report, from rank 0
    assert all(r["route"] == "streaming" for r in (reports if isinstance(reports, list) else [reports]))
    if port == 29613:  # the same on 2 ranks with the model held in memory (not in safetensors): byte for byte
        held = tmp_path / "bin-model"
        shutil.copytree(tiny_llama_dir, held, ignore=shutil.ignore_patterns("*.safetensors"))
        torch.save(_checkpoint(tiny_llama_dir), held / "pytorch_model.bin")
        res = torchrun(2, *[str(held) if a == str(tiny_llama_dir) else a for a in args], "--out", str(tmp_path / "mem"),
                       cwd=tmp_path, port=port + 10)  # fmt: skip
        assert res.returncode == 0, res.stderr.decode()[-3000:]
        for folder in folders:
            for f in ("model.safetensors", "config.json"):
                assert (tmp_path / "mem" / folder / f).read_bytes() == (tmp_path / "two" / folder / f).read_bytes()
            assert json.loads((tmp_path / "mem" / folder / "stade.json").read_text())["route"] == "in-memory"
    one = invoke(*args, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    flips = total = 0
    worst = {}
    for folder in folders:
        a, b = _checkpoint(tmp_path / "two" / folder), _checkpoint(tmp_path / "one" / folder)
        assert a.keys() == b.keys()
        worst[folder] = 0.0
        for name, w in b.items():
            if ".layers." not in name or not name.endswith("proj.weight"):
                assert torch.equal(a[name], w), name  # embeddings, norms, head: untouched
                continue
            flips += int(((a[name] == 0) != (w == 0)).sum())
            total += w.numel()
            both = (a[name] != 0) & (w != 0)
            worst[folder] = max(worst[folder], float((a[name] - w)[both].abs().max() / w.abs().max()))
    print(f"mask flips: {flips} of {total} weights; largest difference of kept weights: {worst}")
    solved = "admm" in stages or "sparsegpt" in ",".join(stages)
    for folder, diff in worst.items():
        assert diff <= 1e-4 if solved and not folder.startswith("wanda-") else diff == 0.0, folder
    assert flips <= total // 10_000


FAILING_RANK = textwrap.dedent(
    """
    import os, sys, time
    import stade_cli.stats.collect as cal
    from stade_cli.cli import main
    from stade_cli.base.errors import StadeError

    real = cal.run_block

    def run_block(*args, **kwargs):
        if os.environ["RANK"] == "1":
            if os.environ.get("HANG"):
                time.sleep(120)
            raise StadeError("block input broken on purpose")
        return real(*args, **kwargs)

    cal.run_block = run_block
    main()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("hang", [False, True], ids=["fails", "hangs"])
def test_torchrun_failing_rank_names_itself(hang: bool, tiny_llama_dir: Path, text: Path, tmp_path: Path) -> None:
    """A rank that fails says so and the job ends; a rank that hangs makes the others time out, not wait forever."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "STADE_DIST_TIMEOUT": "10"}
    env |= {"HANG": "1"} if hang else {}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={29615 + hang}"]
    args = ["calibrate", str(tiny_llama_dir), "--data", str(text), "--nsamples", "4", "--seqlen", "16"]
    t0 = time.perf_counter()
    res = subprocess.run(
        [*cmd, str(script), *args, "--device", "cpu", "--out", str(tmp_path / "s")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode != 0
    message = " ".join(res.stderr.split())
    if hang:
        assert "rank 0 of 2: a collective waited more than 10 s" in message, message[-3000:]
    else:
        assert "rank 1 of 2: block input broken on purpose" in message, message[-3000:]
    assert time.perf_counter() - t0 < 110, "no rank may wait for the one that hangs"
    assert not (tmp_path / "s").exists()


def test_merged_moe_shards_count_each_experts_tokens(text: Path, tmp_path: Path) -> None:
    """An expert's statistics merge with its own token counts (which differ shard to shard)."""
    from conftest import moe_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config("mixtral")).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    whole = run(tmp_path / "model", tmp_path / "whole", text, nsamples=6)
    shards = [run(tmp_path / "model", tmp_path / f"s{i}", text, nsamples=6, shard=f"{i}/2") for i in range(2)]
    expert = next(
        e for e in whole.manifest.dump()["layers"] if "count" in e and e["count"] != whole.manifest.dump()["count"]
    )
    counts = [next(e["count"] for e in s.manifest.dump()["layers"] if e["name"] == expert["name"]) for s in shards]
    assert sum(counts) == expert["count"] and counts[0] != counts[1]
    merged = merge_statistics([s.path for s in shards], tmp_path / "merged")
    assert_equal_statistics(Statistics.load(merged.path), whole)


RANKS_DIFFER = textwrap.dedent(
    """
    import os, sys
    import torch
    from stade_cli.cli import main

    rank = os.environ["RANK"]
    open(os.path.join(os.environ["PIDS"], rank), "w").write(str(os.getpid()))
    if os.environ["DIFFER"] == "argument" and rank == "1":
        sys.argv += ["--seed", "7"]  # a rank started with an argument of its own
    if os.environ["DIFFER"] == "data" and rank == "1":  # the same command line, another file on this node
        import stade_cli.driver.calibrate as cal
        real = cal.draw_windows
        def draw(*args, **kwargs):
            windows = real(*args, **kwargs)
            windows.input_ids = torch.flip(windows.input_ids, [1])
            return windows
        cal.draw_windows = draw
    if os.environ["DIFFER"] == "dies" and rank == "0":  # gone (as by SIGKILL) while rank 1 waits for it
        import stade_cli.stats.distributed as d
        d.Group.merge_collector = lambda self, collector: os._exit(1)
    if os.environ["DIFFER"] == "stuck" and rank == "1":  # never reaches the end of the first block
        import time
        import stade_cli.stats.collect as c
        c.run_block = lambda *a, **k: time.sleep(600)
    if os.environ["DIFFER"] == "stuck" and rank == "0":  # says when it enters the collective that will wait
        import stade_cli.stats.distributed as d
        merge = d.Group.merge_collector
        def entering(self, collector):
            open(os.path.join(os.environ["PIDS"], "waiting"), "w").close()
            return merge(self, collector)
        d.Group.merge_collector = entering
    main()
    """
)


def ranks_differing(differ: str, port: int, model: Path, text: Path, tmp_path: Path) -> tuple[list[str], dict]:
    """The torchrun command line and environment of a 2-rank calibrate whose rank 1 (or 0) differs as `differ`
    says (RANKS_DIFFER); each rank writes its pid into tmp_path/pids."""
    script = tmp_path / f"{differ}.py"
    script.write_text(RANKS_DIFFER)
    (tmp_path / "pids").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DIFFER": differ}
    env["PIDS"] = str(tmp_path / "pids")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}", str(script)]
    args = ["calibrate", str(model), "--data", str(text), "--nsamples", "4", "--seqlen", "16", "--device", "cpu"]
    return [*cmd, *args, "--out", str(tmp_path / "s")], env


@pytest.mark.slow
@pytest.mark.parametrize("differ", ["argument", "data"])
def test_torchrun_ranks_that_differ_are_refused(differ: str, tiny_llama_dir: Path, text: Path, tmp_path: Path) -> None:
    """Survey 2: ranks given another --seed (or, on their node, other data) were merged silently, and ranks that
    disagreed on --hessian waited for each other until the 1800 s timeout. They are refused before any work."""
    cmd, env = ranks_differing(differ, 29617 + (differ == "data"), tiny_llama_dir, text, tmp_path)
    t0 = time.perf_counter()
    res = subprocess.run([*cmd, "--hessian"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    message = " ".join(res.stderr.split())
    assert res.returncode != 0
    if differ == "argument":
        assert (
            "The ranks were started with different arguments: where rank 0 has nothing more, rank 1 has "
            "'--seed 7'." in message
        ), message[-3000:]
    else:
        assert "The ranks disagree on the calibration windows" in message, message[-3000:]
        assert "give every node the same file" in message
    assert time.perf_counter() - t0 < 120
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.incomplete").exists()


@pytest.mark.slow
def test_sigterm_ends_a_rank_waiting_in_a_collective(tiny_llama_dir: Path, text: Path, tmp_path: Path) -> None:
    """Survey 2: a rank blocked in a collective (its peer never came) ignored SIGTERM; it now ends, saying so."""
    cmd, env = ranks_differing("stuck", 29619, tiny_llama_dir, text, tmp_path)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "pids" / "waiting").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1)  # rank 0 is blocked in the collective by now, waiting for rank 1
    os.kill(int((tmp_path / "pids" / "0").read_text()), signal.SIGTERM)
    t0 = time.perf_counter()
    _, stderr = proc.communicate(timeout=120)
    assert time.perf_counter() - t0 < 60, "the rank ignored SIGTERM"
    assert "Stopped (SIGTERM) while waiting for the other ranks." in stderr, stderr[-3000:]
    assert proc.returncode != 0


@pytest.mark.slow
def test_the_rank_that_survives_a_peer_says_so(tiny_llama_dir: Path, text: Path, tmp_path: Path) -> None:
    """Survey 12: the rank left waiting for a peer that died said "Unexpected ... a bug in stade"."""
    cmd, env = ranks_differing("dies", 29620, tiny_llama_dir, text, tmp_path)
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    message = " ".join(res.stderr.split())
    assert res.returncode != 0
    assert "rank 1 of 2: another rank stopped mid-run" in message, message[-3000:]
    assert "Unexpected" not in message
