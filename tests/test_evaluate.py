"""`stade eval`: perplexity as published (checked against a plain loop), results artifact, and its errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import Result

from stade_cli.base.errors import StadeError
from stade_cli.evaluation.evaluate import EvalConfig, load_results, write_results
from stade_cli.evaluation.perplexity import cut_windows, perplexity

from helpers import invoke, recorded_versions, said

PARAGRAPH = (
    "The committee met on Tuesday to discuss the new rail line, which would link the northern suburbs to the "
    "city centre in under twenty minutes. Residents raised concerns about noise and the cost of the project."
)


def reference_ppl(model: torch.nn.Module, ids: torch.Tensor, seqlen: int) -> float:
    """docs/methods.md#evaluation, written out plainly: batch 1, non-overlapping windows, mean NLL of seqlen-1
    tokens each."""
    n = ids.shape[1] // seqlen
    nlls = []
    for i in range(n):
        window = ids[:, i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            logits = model(window).logits.float()
        nlls.append(F.cross_entropy(logits[0, :-1], window[0, 1:]).item())
    return math.exp(sum(nlls) / n)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "held-out.txt"
    path.write_text("\n\n".join(f"{i}. {PARAGRAPH}" for i in range(12)) + "\n")
    return path


def run_eval(*args: str) -> Result:
    return invoke("eval", *args)


@pytest.mark.parametrize("batch", [1, 8])
def test_cli_perplexity_matches_plain_loop(tiny_llama_dir: Path, text_file: Path, tmp_path: Path, batch: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / f"results-{batch}.json"
    args = [str(tiny_llama_dir), "--ppl", str(text_file), "--tasks", "none", "--seqlen", "64"]
    res = run_eval(*args, "--batch-size", str(batch), "--device", "cpu", "--out", str(out))
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    paragraphs = [p.strip() for p in text_file.read_text().split("\n\n") if p.strip()]
    ids = torch.tensor([tok("\n\n".join(paragraphs))["input_ids"]])
    expected = reference_ppl(model, ids, 64)
    got = json.loads(out.read_text())["perplexity"][str(text_file)]
    assert got["ppl"] == pytest.approx(expected, rel=1e-4)
    assert got["windows"] == ids.shape[1] // 64 and got["seqlen"] == 64 and got["tokens"] == got["windows"] * 64


def test_batching_does_not_change_the_figure(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 32 * 10 + 7), generator=torch.Generator().manual_seed(0))
    one = perplexity(model, ids, 32, batch_size=1)
    many = perplexity(model, ids, 32, batch_size=4)  # 10 windows: batches of 4, 4, 2
    assert one.windows == many.windows == 10 and one.tokens == 320
    assert many.ppl == pytest.approx(one.ppl, rel=1e-5)
    assert many.window_nll == pytest.approx(one.window_nll, rel=1e-5)


def test_c4_keeps_the_first_256_windows(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stade_cli.data.sources
    from stade_cli.evaluation.evaluate import dataset_perplexity
    from stade_cli.models.loading import load_model

    ids = torch.randint(0, 256, (1, 300 * 4 + 3), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(stade_cli.data.sources, "eval_ids", lambda source, tok, cache_dir=None: (ids, "x"))
    loaded = load_model(str(tiny_llama_dir))
    c4 = dataset_perplexity(loaded, "c4", 4, 64, torch.device("cpu"))
    other = dataset_perplexity(loaded, "other.txt", 4, 64, torch.device("cpu"))
    assert c4.windows == 256 and other.windows == 300


def test_cut_windows_drops_the_remainder_and_refuses_short_text() -> None:
    ids = torch.arange(10).unsqueeze(0)
    assert cut_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(StadeError, match="fewer than one window of 16"):
        cut_windows(ids, 16, "short.txt")


def test_results_artifact_of_a_pruned_folder(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    from stade_cli.base.artifacts import PruneRecord

    from helpers import calibrate

    stats = calibrate(tiny_llama_dir, tmp_path / "stats", seqlen=32)
    pruned = tmp_path / "pruned"
    prune = ["prune", str(tiny_llama_dir), "--stats", str(stats), "--method", "wanda", "--pattern", "2:4"]
    assert invoke(*prune, "--device", "cpu", "--out", pruned).exit_code == 0
    report = json.loads((pruned / "stade.json").read_text())
    out = tmp_path / "r.json"
    args = [str(pruned), "--ppl", str(text_file), "--tasks", "stade_cloze", "--limit", "3", "--seqlen", "64"]
    res = run_eval(*args, "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert json.loads(res.stdout) == data == load_results(out).dump()
    assert data["kind"] == "stade-results" and data["schema"] == 1
    assert data["pruning"] == report and PruneRecord.load(report, "stade.json").dump() == report
    assert (data["method"], data["pattern"], data["sparsity"]) == ("wanda", "2:4", 0.5)
    assert data["model"]["spec"] == str(pruned) and data["device"] == "cpu"
    task = data["zeroshot"]["tasks"]["stade_cloze"]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "version", "items"} <= set(task)
    assert task["items"] == 3 and data["zeroshot"]["mean"]["acc"] == task["acc"]
    assert data["versions"] == recorded_versions()
    assert {"ppl:" + str(text_file), "zeroshot", "total"} <= set(data["timings"])
    assert len(data["perplexity"][str(text_file)]["source_sha256"]) == 64

    again = run_eval(*args, "--out", str(out))  # no overwrite without --force
    assert again.exit_code == 1 and "already exists" in said(again) and "--force" in said(again)


def test_dense_model_is_marked_dense(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "dense.json"
    args = [str(tiny_llama_dir), "--ppl", str(text_file), "--tasks", "", "--seqlen", "128", "--out", str(out)]
    res = run_eval(*args)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert "pruning" not in data and data["method"] == "dense" and data["sparsity"] == 0.0
    assert data["zeroshot"]["tasks"] == {}
    assert run_eval(*args, "--force").exit_code == 0


def test_several_models_in_one_call(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """One results file per model, named after its folder, each what a call of its own would write."""
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    common = ["--ppl", str(text_file), "--tasks", "none", "--seqlen", "64"]
    res = run_eval(str(tiny_llama_dir), str(other) + "/", *common, "--out", str(tmp_path / "all"), "--json")
    assert res.exit_code == 0, res.output
    docs = json.loads(res.stdout)
    assert [d["model"]["spec"] for d in docs] == [str(tiny_llama_dir), str(other) + "/"]
    bars = [line.split(" · ")[0].strip() for line in res.stderr.splitlines() if " · " in line]
    assert bars == [tiny_llama_dir.name, "other"], res.stderr  # each bar names its model
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted([f"{tiny_llama_dir.name}.json", "other.json"])
    alone = tmp_path / "alone.json"
    assert run_eval(str(other), *common, "--out", str(alone)).exit_code == 0
    ppl = load_results(tmp_path / "all" / "other.json").perplexity[str(text_file)].ppl
    assert ppl == load_results(alone).perplexity[str(text_file)].ppl

    clash = run_eval(str(other), str(tmp_path / "x" / "other"), *common, "--out", str(tmp_path / "c"))
    assert clash.exit_code == 1 and "would both write other.json" in said(clash)
    to_file = run_eval(str(other), str(tiny_llama_dir), *common, "--out", str(alone))
    assert to_file.exit_code == 1 and "need a folder" in said(to_file)
    again = run_eval(str(tiny_llama_dir), str(other), *common, "--out", str(tmp_path / "all"))
    assert again.exit_code == 1 and "already exists" in said(again)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--limit", "0"], "--limit must be at least 1"),
        (["--ppl", "none", "--tasks", "none"], "Nothing to evaluate"),
        (["--seqlen", "4096"], "above the model's context"),
    ],
)
def test_bad_options(tiny_llama_dir: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    res = run_eval(str(tiny_llama_dir), "--ppl", "sample-news", "--tasks", "none", *extra, "--out", str(tmp_path / "r"))
    assert res.exit_code == 1 and message in said(res)
    assert not (tmp_path / "r").exists()


def test_text_too_short_for_one_window(tiny_llama_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    res = run_eval(str(tiny_llama_dir), "--ppl", str(short), "--tasks", "none", "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 1 and "fewer than one window of 128" in said(res) and "--seqlen" in said(res)
    assert not (tmp_path / "r.json").exists()


def test_model_folder_without_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", broken / "config.json")
    res = run_eval(str(broken), "--ppl", "sample-news", "--tasks", "none", "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 1 and "no weights" in said(res)


class FakeTaskManager:
    all_tasks = ("hellaswag", "hellaswag_de", "boolq", "arc_easy")

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass


def test_unknown_task_lists_close_matches(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeTaskManager)  # lm_eval's real index takes ~8 s
    res = run_eval(str(tiny_llama_dir), "--ppl", "none", "--tasks", "boolq,hellaswg", "--out", str(tmp_path / "r"))
    assert res.exit_code == 1 and "Unknown lm_eval task 'hellaswg'" in said(res) and "hellaswag" in said(res)


@pytest.mark.slow
def test_unknown_task_against_lm_evals_own_index(tiny_llama_dir: Path, tmp_path: Path) -> None:
    res = run_eval(str(tiny_llama_dir), "--ppl", "none", "--tasks", "hellaswg", "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 1 and "Unknown lm_eval task 'hellaswg'" in said(res) and "hellaswag" in said(res)


def test_results_files_are_checked(tmp_path: Path) -> None:
    """A newer schema, another kind, or a field of the wrong type is refused by name; nothing is overwritten."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"kind": "stade-results", "schema": 99}))
    with pytest.raises(StadeError, match="schema 99; this stade reads schema 1"):
        load_results(path)
    path.write_text(json.dumps({"kind": "other"}))
    with pytest.raises(StadeError, match="not a stade results file"):
        load_results(path)
    doc = {"kind": "stade-results", "schema": 1, "created": "x", "model": {"spec": "m", "path": "m"}, "device": "cpu"}
    doc["config"] = {"ppl": ["a"], "tasks": [], "seqlen": 8, "batch_size": "eight"}
    path.write_text(json.dumps(doc))
    with pytest.raises(StadeError, match=r"'config\.batch_size' of the wrong type"):
        load_results(path)
    doc["config"]["batch_size"] = 8
    path.write_text(json.dumps(doc))
    with pytest.raises(StadeError, match="already exists"):
        write_results(path, load_results(path))


def test_config_from_strings() -> None:
    config = EvalConfig.from_strings("wikitext2, c4", "none")
    assert config.ppl == ("wikitext2", "c4") and config.tasks == ()
    default = EvalConfig.from_strings(None, None)
    assert default.ppl == ("wikitext2",) and default.tasks == ()  # a first run: perplexity only
    assert EvalConfig.from_strings(None, "paper").tasks[0] == "boolq"
    with pytest.raises(StadeError, match="--batch-size"):
        EvalConfig(batch_size=0)


@pytest.mark.slow
def test_smollm2_perplexity_matches_plain_loop(tmp_path: Path) -> None:
    """The real model, on the start of the built-in news text, at batch 1 and 8 (acceptance 1)."""
    from safetensors.torch import save_file

    from stade_cli.data.sources import eval_ids
    from stade_cli.models.loading import load_model

    loaded = load_model("smollm2-135m")
    ids, _ = eval_ids("sample-news", loaded.tokenizer)
    ids = ids[:, : 16 * 128 + 5].contiguous()
    ids_file = tmp_path / "ids.safetensors"
    save_file({"input_ids": ids}, str(ids_file))
    expected = reference_ppl(loaded.model, ids, 128)
    for batch in (1, 8):
        out = tmp_path / f"r{batch}.json"
        args = ["smollm2-135m", "--ppl", str(ids_file), "--tasks", "none", "--seqlen", "128", "-b", str(batch)]
        res = run_eval(*args, "--out", str(out))
        assert res.exit_code == 0, res.output
        got = json.loads(out.read_text())["perplexity"][str(ids_file)]
        assert got["windows"] == 16
        assert got["ppl"] == pytest.approx(expected, rel=1e-4)
