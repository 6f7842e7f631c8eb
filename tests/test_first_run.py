"""What a first run meets: the defaults of `calibrate` and `eval`, offline, with a plain install.

A default that cannot work here must fail in seconds, before any model is loaded or any perplexity
computed, with one line naming the offline way.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import stade_cli.evaluation.evaluate
import stade_cli.models.loading
from stade_cli.cli import app

TASK_YAML = """\
task: local_broken
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: endings
doc_to_target: label
metric_list:
  - metric: acc
"""


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), prog_name="stade")


def said(res: Result) -> str:
    return " ".join(res.output.split())


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: " + "the quick brown fox jumps over it. " * 8 for i in range(12)))
    return path


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every model load (and refuse it): a default that cannot work must fail before one."""
    loads: list[str] = []

    def refuse(spec: str, *args: object, **kwargs: object) -> None:
        loads.append(spec)
        raise AssertionError(f"{spec} was loaded before the inputs were checked")

    monkeypatch.setattr(stade_cli.models.loading, "load_model", refuse)
    return loads


def test_eval_default_is_perplexity_only_with_a_hint(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = invoke("eval", str(tiny_llama_dir), "--ppl", str(text_file), "--seqlen", "32", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "--tasks paper" in said(res)  # the hint, on stderr (CliRunner mixes the streams)
    results = json.loads(out.read_text())
    assert results["config"]["tasks"] == [] and results["zeroshot"]["tasks"] == {}
    assert list(results["perplexity"]) == [str(text_file)]


def test_eval_default_ppl_offline_fails_before_the_model_loads(
    tiny_llama_dir: Path, tmp_path: Path, no_model_loads: list[str]
) -> None:
    res = invoke("eval", str(tiny_llama_dir), "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 1 and no_model_loads == []
    text = said(res)
    assert "Could not load 'wikitext2'" in text and "sample-news" in text and ".txt" in text
    assert not (tmp_path / "r.json").exists()


def test_a_task_that_cannot_load_fails_before_any_perplexity(
    tiny_llama_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that lm_eval cannot load fails before the first model's perplexity (not hours later)."""
    yaml = tmp_path / "tasks" / "broken.yaml"
    yaml.parent.mkdir()
    yaml.write_text(TASK_YAML.format(data=json.dumps(str(tmp_path / "missing.jsonl"))))
    computed: list[str] = []
    monkeypatch.setattr(stade_cli.evaluation.evaluate, "perplexity", lambda *a, **k: computed.append("ppl"))
    out = tmp_path / "r.json"
    res = invoke("eval", str(tiny_llama_dir), "--ppl", str(text_file), "--tasks", str(yaml), "--out", str(out))
    assert res.exit_code == 1, res.output
    assert "Could not load zero-shot task 'local_broken'" in said(res) and computed == []
    assert not out.exists()


@pytest.mark.slow
def test_paper_tasks_offline_fail_in_one_line_before_the_model_loads(
    tiny_llama_dir: Path, text_file: Path, tmp_path: Path, no_model_loads: list[str]
) -> None:
    res = invoke("eval", str(tiny_llama_dir), "--ppl", str(text_file), "--tasks", "paper", "--out", str(tmp_path / "r"))
    assert res.exit_code == 1 and no_model_loads == []
    text = said(res)
    assert "Could not load zero-shot task 'boolq'" in text and "stade_cloze" in text


@pytest.mark.slow
def test_loaded_tasks_serve_several_models(tiny_llama_dir: Path) -> None:
    """Tasks loaded once give each later run the same figures as tasks loaded afresh."""
    from stade_cli.evaluation.zeroshot import BUILTIN_TASK, load_tasks, resolve_tasks, zero_shot
    from stade_cli.models.loading import load_model

    loaded = load_model(str(tiny_llama_dir), "float32", "cpu")
    specs = resolve_tasks((BUILTIN_TASK,))
    ready = load_tasks(specs)
    first = zero_shot(loaded, ready, batch_size=8, limit=12)["tasks"][BUILTIN_TASK]
    again = zero_shot(loaded, ready, batch_size=8, limit=12)["tasks"][BUILTIN_TASK]
    fresh = zero_shot(loaded, specs, batch_size=8, limit=12)["tasks"][BUILTIN_TASK]
    assert first["items"] == 12
    assert first == again == fresh


def test_calibrate_default_is_c4_and_offline_names_the_offline_way(
    tiny_llama_dir: Path, tmp_path: Path, no_model_loads: list[str]
) -> None:
    res = invoke("calibrate", str(tiny_llama_dir), "--out", str(tmp_path / "s"))
    assert res.exit_code == 1 and no_model_loads == []
    text = said(res)
    assert "Could not load 'c4' (train)" in text
    assert "sample-wiki" in text and all(s in text for s in (".txt", ".jsonl", ".parquet", ".safetensors"))
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("source", ["sample-wiki", "sample-news"])
@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_samples_without_gensim_name_the_demo_extra(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_loads: list[str], source, command
) -> None:
    monkeypatch.setenv("STADE_HOME", str(tmp_path / "home"))  # nothing prepared from an earlier run
    real = importlib.metadata.distribution

    def without_gensim(name: str):
        if name == "gensim":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_gensim)
    data = ["--data", source] if command == "calibrate" else ["--ppl", source]
    res = invoke(command, str(tiny_llama_dir), *data, "--out", str(tmp_path / "out"))
    assert res.exit_code == 1 and no_model_loads == []
    assert f"{source} is built from the gensim wheel" in said(res) and "pip install 'stade[demo]'" in said(res)
