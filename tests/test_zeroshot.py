"""The built-in offline cloze task, task resolution, and zero-shot accuracy through lm_eval."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from stade_cli.base.errors import StadeError
from stade_cli.data.sources import builtin_documents
from stade_cli.evaluation.zeroshot import (
    BUILTIN_TASK,
    CLOZE_CHOICES,
    PUBLISHED_TASKS,
    builtin_task_dir,
    cloze_items,
    parse_tasks,
    resolve_tasks,
    zero_shot,
)


def news() -> list[str]:
    return [t.strip() for t in builtin_documents("sample-news").texts]


def test_cloze_items_are_real_sentences_with_their_true_ending() -> None:
    stories = news()
    items = cloze_items(stories)
    assert items == cloze_items(stories)  # deterministic
    assert 300 <= len(items) <= 500
    text = " ".join(" ".join(stories).split())  # the items join words with single spaces
    labels = set()
    for item in items:
        endings, label = item["endings"], item["label"]
        assert len(endings) == CLOZE_CHOICES == len(set(endings))
        assert f"{item['context']} {endings[label]}" in text  # the true ending completes a real sentence
        labels.add(label)
    assert labels == set(range(CLOZE_CHOICES))  # the right answer is not always in one place


def test_builtin_task_is_written_once_as_a_local_lm_eval_task() -> None:
    folder = builtin_task_dir()
    config = yaml.safe_load((folder / f"{BUILTIN_TASK}.yaml").read_text())
    assert config["task"] == BUILTIN_TASK and config["output_type"] == "multiple_choice"
    assert config["dataset_path"] == "json"
    assert Path(config["dataset_kwargs"]["data_files"]["test"]).is_file()
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    mtime = (folder / "items.jsonl").stat().st_mtime_ns
    assert builtin_task_dir() == folder and (folder / "items.jsonl").stat().st_mtime_ns == mtime


def test_parse_tasks() -> None:
    assert parse_tasks(None) == ()  # perplexity only unless zero-shot is asked for
    assert (
        parse_tasks("paper")
        == PUBLISHED_TASKS
        == ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    )
    assert parse_tasks("paper, stade_cloze, boolq") == (*PUBLISHED_TASKS, "stade_cloze")
    assert parse_tasks("none") == parse_tasks("") == parse_tasks(" , ") == ()
    assert parse_tasks("boolq, stade_cloze") == ("boolq", "stade_cloze")


def test_local_task_yaml(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("task: my_task\ndataset_path: json\n")
    (spec,) = resolve_tasks((str(path),))
    assert spec.name == "my_task" and spec.include_path == str(tmp_path.resolve())
    with pytest.raises(StadeError, match="does not exist"):
        resolve_tasks((str(tmp_path / "missing.yaml"),))
    path.write_text("dataset_path: json\n")
    with pytest.raises(StadeError, match="no 'task:' name"):
        resolve_tasks((str(path),))


def test_zero_shot_on_a_tiny_model(tiny_llama_dir: Path) -> None:
    from stade_cli.models.loading import load_model

    loaded = load_model(str(tiny_llama_dir))
    result = zero_shot(loaded, resolve_tasks((BUILTIN_TASK,)), batch_size=4, limit=4)
    task = result["tasks"][BUILTIN_TASK]
    assert task["items"] == 4 and task["acc_stderr"] >= 0.0
    for name in ("acc", "acc_norm"):  # a share of 4 items: 0, 1/4, ..., 1
        assert task[name] * 4 == round(task[name] * 4) and 0.0 <= task[name] <= 1.0
    assert result["mean"] == {"acc": task["acc"], "acc_norm": task["acc_norm"]}
    with pytest.raises(StadeError, match="--limit must be at least 1"):
        zero_shot(loaded, resolve_tasks((BUILTIN_TASK,)), limit=0)


def magnitude_prune_rows(model: torch.nn.Module, sparsity: float) -> None:
    """Zero the smallest-|W| fraction of every row of every linear layer in the decoder blocks."""
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.data
                k = int(w.shape[1] * sparsity)
                idx = w.abs().topk(k, dim=1, largest=False).indices
                w.scatter_(1, idx, 0.0)


@pytest.mark.slow
def test_cloze_separates_dense_from_pruned_smollm2() -> None:
    """Acceptance 2: dense SmolLM2 well above chance (25%), 70% magnitude-pruned clearly lower."""
    from stade_cli.models.loading import load_model

    loaded = load_model("smollm2-135m")
    tasks = resolve_tasks((BUILTIN_TASK,))
    dense = zero_shot(loaded, tasks, batch_size=16, limit=60)["tasks"][BUILTIN_TASK]
    magnitude_prune_rows(loaded.model, 0.7)
    pruned = zero_shot(loaded, tasks, batch_size=16, limit=60)["tasks"][BUILTIN_TASK]
    assert dense["acc"] > 0.25 + 4 * dense["acc_stderr"]
    assert pruned["acc"] < dense["acc"] - 2 * dense["acc_stderr"]
