"""`stade plan`: sizes from the config alone, checked against known parameter counts and against the files
calibrate and prune really write; the commands print the plan and refuse runs that cannot fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from stade_cli.cli import app
from stade_cli.planning import memory as plan_memory
from stade_cli.planning import plan as plan_mod
from stade_cli.planning.plan import PlanConfig, make_plan

runner = CliRunner()
CONFIGS = Path(__file__).parent / "data" / "configs"
CPU = torch.device("cpu")
CPU_OUT = ["--device", "cpu", "--out"]


def files_bytes(folder: Path) -> int:
    """Bytes on disk of a checkpoint's weight files: its safetensors shards and their index."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith((".safetensors", ".index.json")))


def tensor_bytes(folder: Path) -> int:
    """Bytes of every tensor in a folder's safetensors files, read from the files themselves."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                t = st.get_tensor(k)
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize(("name", "params"), [("llama-3.1-8B", 8_030_261_248), ("llama-3.1-70B", 70_553_706_496)])
def test_llama_31_checkpoint_is_its_published_parameter_count_in_bfloat16(name: str, params: int) -> None:
    res = runner.invoke(app, ["plan", str(CONFIGS / name), "--device", "cpu", "--no-time", "--hessian", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["parameters"] == params
    # The weight files, exactly: the parameters in the config's own dtype (bfloat16), the shards' headers, the index.
    assert params * 2 < doc["checkpoint_bytes"] < params * 2 + 2 * 10**6
    assert doc["stages"]["prune"]["disk_bytes"] == doc["checkpoint_bytes"] + plan_memory.SMALL_FILES
    # Hessians: 4 groups per block (qkv, o, gate/up, down), float32 on disk by default.
    h, i, layers = (4096, 14336, 32) if name.endswith("8B") else (8192, 28672, 80)
    hessians = layers * (3 * h * h + i * i) * 4
    assert hessians < doc["artifact_bytes"] < hessians * 1.01


def test_plan_prints_a_table_and_says_the_time_is_an_estimate(tiny_llama_dir: Path) -> None:
    res = runner.invoke(app, ["plan", str(tiny_llama_dir), "--nsamples", "4", "--seqlen", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for word in ("calibrate", "prune", "eval", "checkpoint", "ESTIMATE"):
        assert word in res.output


def test_groups_and_artifact_match_what_calibrate_writes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The meta-device pass finds the groups calibration finds, and the artifact's tensors are exactly planned."""
    out = tmp_path / "stats"
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))}, str(ids))
    args = ["calibrate", str(tiny_model_dir), "--data", str(ids)]
    res = runner.invoke(app, [*args, "--hessian", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "plan (calibrate)" in res.output  # the one-line plan on stderr
    manifest = json.loads((out / "manifest.json").read_text())
    p = make_plan(str(tiny_model_dir), PlanConfig(4, 16, hessian=True, timed=False, data=str(ids)), CPU)
    block0 = {
        e["name"].split(".0.", 1)[1]: e["group"].split(".0.", 1)[1] for e in manifest["layers"] if e["block"] == 0
    }
    assert {g: len(m) for g, m in p.shapes.groups.items()} == {
        g: list(block0.values()).count(g) for g in set(block0.values())
    }
    written = tensor_bytes(out)
    assert plan_memory.artifact_tensors(p.shapes, 4 * 16, True, "float32") == written
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert written <= on_disk <= p.artifact_bytes


def test_checkpoint_bytes_match_the_pruned_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    stats, out = tmp_path / "stats", tmp_path / "pruned"
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))}, str(ids))
    cal = ["calibrate", str(tiny_model_dir), "--data", str(ids), "--device", "cpu", "--out"]
    assert runner.invoke(app, [*cal, str(stats)]).exit_code == 0
    res = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            "--stats",
            str(stats),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            *CPU_OUT,
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "plan (prune)" in res.output
    p = make_plan(str(tiny_model_dir), PlanConfig(2, 16, timed=False), CPU)
    assert p.checkpoint_bytes == files_bytes(out)  # every byte of the weight files, headers and index included


def test_calibrate_refuses_early_when_memory_cannot_hold_the_run(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plan_mod, "available_memory", lambda _device: 1000)
    out = tmp_path / "stats"
    res = runner.invoke(app, ["calibrate", str(tiny_llama_dir), "--nsamples", "2", "--seqlen", "16", "--out", str(out)])
    assert res.exit_code == 1
    assert "but only 0.00 GB" in res.output and "--batch-size" in res.output
    assert not out.exists()


def test_calibrate_refuses_early_when_the_disk_cannot_hold_the_artifact(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9, 10))
    out = tmp_path / "stats"
    args = ["calibrate", str(tiny_llama_dir), "--nsamples", "2", "--seqlen", "16", "--hessian", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert "GB are free there" in res.output
    assert not out.exists()


def test_eval_prints_the_plan(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ids = tmp_path / "held-out.safetensors"
    save_file({"input_ids": torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(0))}, str(ids))
    args = ["eval", str(tiny_llama_dir), "--ppl", str(ids), "--tasks", "none", "--seqlen", "16"]
    res = runner.invoke(app, [*args, *CPU_OUT, str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "plan (eval)" in res.output


def test_memory_terms_follow_the_shapes(tiny_llama_dir: Path) -> None:
    """Doubling the calibration windows doubles exactly the hidden-state term (block inputs and outputs, kept
    for every window), and nothing else; Hessians add one float32 in x in matrix per group (scaled in place)."""
    a = make_plan(str(tiny_llama_dir), PlanConfig(4, 16, hessian=True, batch_size=4, timed=False), CPU)
    b = make_plan(str(tiny_llama_dir), PlanConfig(8, 16, hessian=True, batch_size=4, timed=False), CPU)
    ta, tb = a.stages["calibrate"].host, b.stages["calibrate"].host
    hidden = 64
    assert tb["hidden states"] - ta["hidden states"] == 4 * 16 * (2 * hidden * 4 + a.shapes.arg_bytes_per_token)
    assert {k: v for k, v in ta.items() if k != "hidden states"} == {
        k: v for k, v in tb.items() if k != "hidden states"
    }
    assert ta["hessians"] == 4 * (3 * 64 * 64 + 128 * 128)


def test_plan_of_a_config_file_without_weights(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["plan", str(CONFIGS / "synthetic" / "config.json"), "--device", "cpu", "--no-time", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    # bench/results/scale.json: the synthetic model's float32 bytes, and its shards' headers and index
    assert 2_600_673_280 < doc["checkpoint_bytes"] < 2_600_673_280 + 10**5


def test_a_gpu_run_is_planned_from_a_machine_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster's login node has no GPU: `plan --device cuda` still gives the GPU plan (not timed), while the
    commands that would run on it still refuse `--device cuda` there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = str(CONFIGS / "llama-3.1-8B")
    res = runner.invoke(app, ["plan", model, "--device", "cuda", "--nsamples", "128", "--seqlen", "2048", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["device"] == "cuda" and doc["dtype"] == "bfloat16"  # the config's own dtype, as on a GPU
    hidden = 2 * 128 * 2048 * 4096 * 2  # every window's block inputs and outputs, hidden 4096, in bfloat16
    cal = doc["stages"]["calibrate"]
    assert "hidden states" not in cal["device_terms"] and cal["host_terms"]["hidden states"] >= hidden
    assert all(s["seconds_estimate"] is None for s in doc["stages"].values())
    assert any("not on this machine" in n for n in doc["notes"])
    res = runner.invoke(app, ["calibrate", model, "--device", "cuda", "--out", "unused"])
    assert res.exit_code == 1 and "no CUDA GPU" in res.output


def test_a_model_that_is_not_read_block_by_block_is_planned_whole(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint in pytorch_model.bin, or under names stade cannot map onto the model's (here Mixtral's per-expert
    tensors with the conversion mapping hidden from the plan: test_moe_streaming streams them), is held whole by
    calibrate and prune (the loader says so): the plan counts the whole model and keeps it through the loop, and a
    renamed one's sweep a copy of the dense blocks between its save_pretrained passes."""
    from conftest import moe_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from stade_cli.models import hf
    from stade_cli.models.loading import load_model
    from stade_cli.stages.config import PruneConfig

    binary = tmp_path / "bin"
    binary.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.name != "model.safetensors":
            (binary / f.name).write_bytes(f.read_bytes())
    torch.save(load_model(str(tiny_llama_dir)).model.state_dict(), binary / "pytorch_model.bin")
    mixtral = tmp_path / "mixtral"
    AutoModelForCausalLM.from_config(moe_config("mixtral")).save_pretrained(mixtral)
    tiny_tokenizer().save_pretrained(mixtral)
    sweep = (PruneConfig("wanda", 0.5), PruneConfig("wanda", 0.6))
    plans = {}
    for name, folder in [("lazy", tiny_llama_dir), ("whole", binary)]:
        assert (load_model(str(folder), lazy=True).whole_reason is None) == (name == "lazy")
        plans[name] = make_plan(str(folder), PlanConfig(4, 16, configs=sweep, timed=False), CPU)
    monkeypatch.setattr(hf, "covered", lambda *_a: set())
    plans["renamed"] = make_plan(str(mixtral), PlanConfig(4, 16, configs=sweep, timed=False), CPU)
    whole = load_model(str(binary), "float32").model
    params = sum(p.numel() for p in whole.parameters())  # an untied head: every parameter once
    whole_term = "the model, whole (not read block by block)"
    for name in ("calibrate", "prune"):
        lazy, held = plans["lazy"].stages[name].host, plans["whole"].stages[name].host
        assert held.pop(whole_term) == params * 4  # kept through the loop, its blocks in it rather than read
        assert held == {k: v for k, v in lazy.items() if k != "block"}
    prune = plans["renamed"].stages["prune"].host
    moe = AutoModelForCausalLM.from_config(moe_config("mixtral"))
    blocks = sum(p.numel() for p in moe.model.layers.parameters())
    assert prune["the dense blocks (a copy, between passes)"] == blocks * 4
    assert "dense copy of the block" not in prune  # one checkpoint per pass
    assert any("MoE" in n for n in plans["renamed"].notes) and not any("MoE" in n for n in plans["lazy"].notes)
