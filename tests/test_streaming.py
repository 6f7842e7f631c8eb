"""Streaming prune writes the very checkpoint the in-memory route writes; a killed run leaves nothing complete."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stade_cli.cli import app

from helpers import calibrate

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
RUN_CLI = "from stade_cli.cli import main; main()"
# The same CLI with every streamed block slowed down, so that a test can kill it mid-run.
RUN_SLOW_CLI = (
    "import time, stade_cli.driver.loop as s; f = s.prune_step; "
    "s.prune_step = lambda *a: (time.sleep(0.4), f(*a))[1]; " + RUN_CLI
)


def files_digest(folder: Path, skip: tuple[str, ...] = ("stade.json", "summary.json")) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def save_model(family: str, path: Path, tied: bool = False, layers: int = 2) -> Path:
    from conftest import tiny_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    cfg.tie_word_embeddings = tied
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def calibrate_cli(model: Path, out: Path) -> Path:
    return calibrate(model, out, "--hessian", seqlen=32)


def stage_combinations(bias: bool) -> list:
    """Every preset kind (a bias update, the OBS solver, a sequential score) and every stage combination: ADMM
    (gradual mask, and after a score), block reconstruction, OWL; at 50% and 2:4, one-shot and sequential."""
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stages.reconstructions.block import BlockSettings

    short = (BlockSettings(steps=4),)
    return [
        PruneConfig("stade", 0.5, bias_update=bias),
        PruneConfig("sparsegpt", None, "2:4"),
        PruneConfig("wanda", 0.5, sequential=True),
        PruneConfig("admm", 0.5),
        PruneConfig("admm", None, "2:4", sequential=True),
        PruneConfig("admm", 0.5, reconstruct="block", settings=short),
        PruneConfig("admm", None, "2:4", sequential=True, reconstruct="block", settings=short),
        PruneConfig("wanda", 0.5, update="admm"),
        PruneConfig("wanda", None, "2:4", update="admm", sequential=True),
        PruneConfig("wanda", 0.5, allocation="owl"),
        PruneConfig("wanda", 0.5, allocation="owl", sequential=True),
    ]


@pytest.mark.parametrize(
    ("family", "tied", "dtype", "shard"),
    [("llama", False, None, "40KB"), ("qwen2", True, torch.bfloat16, "30KB"), ("llama", False, None, "2GB")],
)
def test_streaming_writes_the_in_memory_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, tied: bool, dtype: torch.dtype | None, shard: str
) -> None:
    """Every stage combination, one sweep three ways: streamed from the files into planned shards (one pass), pruned
    in memory into planned shards, and pruned in memory then written by transformers' own save_pretrained (a pass
    per checkpoint, the dense weights restored in between): the same files, byte for byte."""
    import stade_cli.driver.sinks as sinks
    from stade_cli.driver.sweep import prune_checkpoints
    from stade_cli.models.loading import load_model
    from stade_cli.stats.artifact import Statistics

    monkeypatch.setattr(sinks, "MAX_SHARD_SIZE", shard)
    model = save_model(family, tmp_path / "m", tied)
    stats = Statistics.load(calibrate_cli(model, tmp_path / "stats"))
    configs = stage_combinations(bias=family == "llama")  # Qwen2 has no switch for o_proj/down_proj biases
    cpu = torch.device("cpu")
    for mode in ("one-shot", "sequential"):  # a sweep's folders are named by method, pattern and ratio alone
        sweep = [c for c in configs if c.sequential == (mode == "sequential")]
        lazy = load_model(str(model), "auto", cpu, lazy=True)
        assert lazy.lazy
        streamed = prune_checkpoints(lazy, stats, sweep, tmp_path / "str" / mode, cpu, dtype=dtype)
        whole = load_model(str(model), "auto", cpu)
        shards = prune_checkpoints(whole, stats, sweep, tmp_path / "shards" / mode, cpu, dtype=dtype)
        whole = load_model(str(model), "auto", cpu)
        saved = prune_checkpoints(whole, stats, sweep, tmp_path / "mem" / mode, cpu, dtype=dtype, save_pretrained=True)
        for (_, ra), (_, rb), (_, rc) in zip(saved, streamed, shards, strict=True):
            assert (ra.route, rb.route, rc.route) == ("in-memory", "streaming", "in-memory")
            for key in ("layers", "achieved_sparsity", "bias_update", "statistics", "stages", "block_sparsity"):
                assert getattr(ra, key) == getattr(rb, key) == getattr(rc, key)
    a, b, c = (files_digest(tmp_path / d) for d in ("mem", "str", "shards"))
    assert a == b == c
    files = [n for n in a if n.endswith(".safetensors")]
    assert len(files) > 3 * len(configs) if shard != "2GB" else len(files) == len(configs)
    assert any(n.endswith("index.json") for n in a) == (shard != "2GB")
    if family == "llama":
        cfg = json.loads((tmp_path / "str" / "one-shot" / configs[0].name / "config.json").read_text())
        assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    if tied:
        index = json.loads(
            (tmp_path / "str" / "one-shot" / configs[0].name / "model.safetensors.index.json").read_text()
        )
        assert "lm_head.weight" not in index["weight_map"]


def test_streamed_checkpoint_gives_the_pruned_models_logits(tmp_path: Path) -> None:
    """Reloaded with plain transformers, the streamed checkpoint computes what the pruned model in memory computes."""
    from transformers import AutoModelForCausalLM

    from stade_cli.driver.sweep import prune_checkpoints
    from stade_cli.models.loading import load_model
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.artifact import Statistics

    model = save_model("llama", tmp_path / "m")
    stats_dir = calibrate_cli(model, tmp_path / "stats")
    stats = Statistics.load(stats_dir)
    cpu = torch.device("cpu")
    loaded = load_model(str(model), "float32", cpu)
    prune_checkpoints(loaded, stats, [PruneConfig("stade", 0.5)], tmp_path / "mem", cpu)
    res = runner.invoke(
        app,
        [str(a) for a in ["prune", model, "--stats", stats_dir, "--method", "stade", "--sparsity", 0.5]]
        + ["--device", "cpu", "--out", str(tmp_path / "str")],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "str" / "stade.json").read_text())["route"] == "streaming"
    ids = stats.token_ids()[:2]
    with torch.no_grad():
        expected = loaded.model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "str", dtype=torch.float32)(ids).logits
    assert torch.equal(expected, got)


def test_checkpoint_not_in_safetensors_is_pruned_in_memory_and_says_so(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    dense = save_model("llama", tmp_path / "m")
    stats = calibrate_cli(dense, tmp_path / "stats")
    bin_model = tmp_path / "bin"
    bin_model.mkdir()
    torch.save(AutoModelForCausalLM.from_pretrained(dense).state_dict(), bin_model / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bin_model / f).write_bytes((dense / f).read_bytes())
    assert not list(bin_model.glob("*.safetensors"))
    args = ["prune", bin_model, "--stats", stats, "--method", "wanda", "--sparsity", 0.5, "--device", "cpu"]
    res = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "o"]])
    assert res.exit_code == 0, res.output
    assert "pruned in memory" in res.output
    report = json.loads((tmp_path / "o" / "stade.json").read_text())
    assert report["route"] == "in-memory" and any("in memory" in w for w in report["warnings"])


@pytest.mark.slow
def test_killed_streaming_prune_leaves_nothing_complete_and_reruns(tmp_path: Path) -> None:
    """SIGKILL mid-run: no final folder, the .incomplete one is refused as a model; the same command then works."""
    model = save_model("llama", tmp_path / "m", layers=6)
    stats = calibrate_cli(model, tmp_path / "stats")
    out = tmp_path / "pruned"
    args = ["prune", str(model), "--stats", str(stats), "--method", "wanda", "--sparsity", "0.5"]
    args += ["--device", "cpu", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", RUN_SLOW_CLI, *args], cwd=ROOT, env=env)
    partial = out.with_name(out.name + ".incomplete")
    deadline = time.monotonic() + 120
    while not (partial / "model.safetensors").exists():
        assert child.poll() is None, "the prune ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # a block or two into the run
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not out.exists() and partial.exists()
    res = runner.invoke(app, ["eval", str(partial), "--out", str(tmp_path / "r.json"), "--tasks", "none"])
    assert res.exit_code == 1 and "interrupted run" in res.output
    rerun = subprocess.run([sys.executable, "-c", RUN_CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not partial.exists()
    assert json.loads((out / "stade.json").read_text())["route"] == "streaming"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("disk_dtype", [torch.float32, torch.bfloat16])
def test_fingerprint_from_strided_file_samples_equals_the_loaded_ones(tmp_path: Path, disk_dtype: torch.dtype) -> None:
    """The lazy fingerprint reads a strided sample of each tensor from the files; it must equal the in-memory one."""
    from transformers import AutoModelForCausalLM

    from stade_cli.models.fingerprint import fingerprint
    from stade_cli.models.loading import load_model

    dense = save_model("qwen2", tmp_path / "m", tied=True)
    if disk_dtype != torch.float32:
        AutoModelForCausalLM.from_pretrained(dense, dtype=disk_dtype).save_pretrained(dense)
    for dtype in ("float32", "bfloat16"):
        lazy = load_model(str(dense), dtype, "cpu", lazy=True)
        assert lazy.lazy and not lazy.block_samples
        assert lazy.fingerprint() == fingerprint(load_model(str(dense), dtype, "cpu").model)


def test_statistics_of_another_model_are_refused_before_any_block_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stade_cli.models.blocks

    stats = calibrate_cli(save_model("llama", tmp_path / "a"), tmp_path / "stats")
    other = tmp_path / "b"
    from conftest import save_tiny_model

    save_tiny_model("llama", other, seed=1)
    monkeypatch.setattr(stade_cli.models.blocks, "materialized", lambda *a: pytest.fail("a block was read"))
    args = ["prune", other, "--stats", stats, "--method", "wanda", "--sparsity", 0.5, "--device", "cpu"]
    res = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "o"]])
    assert res.exit_code == 1 and "another model" in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.incomplete").exists()


def test_a_checkpoint_transformers_would_rename_falls_back_to_memory_before_any_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where save_pretrained would rename or convert tensors, the streamed layout is unknown: prune in memory."""
    import stade_cli.driver.sweep as sweep
    from stade_cli.models import hf

    model = save_model("llama", tmp_path / "m")
    stats = calibrate_cli(model, tmp_path / "stats")

    def renamed(*_a: object, **_k: object) -> None:
        assert not (tmp_path / "o.incomplete").exists()
        raise hf.Renamed("transformers renames or converts this model's tensors when it saves them")

    monkeypatch.setattr(sweep, "plan_layout", renamed)
    args = ["prune", model, "--stats", stats, "--method", "wanda", "--sparsity", 0.5, "--device", "cpu"]
    res = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "o"]])
    assert res.exit_code == 0, res.output
    assert "renames or converts" in res.output and "pruned in memory" in res.output
    report = json.loads((tmp_path / "o" / "stade.json").read_text())
    assert report["route"] == "in-memory" and report["model"]["spec"] == str(model)
