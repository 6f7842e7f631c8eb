"""`stade compare`: rows and columns, best values, deltas to the dense baseline, output formats, bad input."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from stade_cli.base import console
from stade_cli.base.artifacts import Results
from stade_cli.base.errors import StadeError
from stade_cli.evaluation.compare import Comparison, build, compare, load_sources
from stade_cli.evaluation.evaluate import write_results
from stade_cli.evaluation.plot import plot

import helpers
from helpers import said


def results_doc(
    spec: str,
    method: str,
    pattern: str | None,
    sparsity: float,
    ppl: dict[str, float],
    acc: dict[str, float],
) -> Results:
    tasks = {t: {"acc": a, "acc_stderr": 0.01, "acc_norm": a + 0.01, "acc_norm_stderr": 0.01} for t, a in acc.items()}
    mean = {"acc": sum(acc.values()) / len(acc), "acc_norm": sum(acc.values()) / len(acc) + 0.01} if acc else {}
    return Results.load(
        {
            "kind": "stade-results",
            "schema": 1,
            "created": "2026-12-03T10:00:00+00:00",
            "model": {"spec": spec, "path": spec},
            "method": method,
            "pattern": pattern,
            "sparsity": sparsity,
            "achieved_sparsity": sparsity,
            "device": "cpu",
            "config": {"ppl": list(ppl), "tasks": list(acc), "seqlen": 128, "batch_size": 8},
            "perplexity": {
                d: {"ppl": v, "mean_nll": 1.0, "windows": 10, "seqlen": 128, "tokens": 1280, "seconds": 1.0}
                for d, v in ppl.items()
            },
            "zeroshot": {"tasks": tasks, "mean": mean, "num_fewshot": 0, "limit": None},
        },
        "test",
    )


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    """Dense, two 50% methods and a 2:4 one; the 2:4 one lacks c4 and has an extra task (a mixed set)."""
    folder = tmp_path / "results"
    folder.mkdir()
    docs = {
        "dense.json": results_doc("smollm2", "dense", None, 0.0, {"wikitext2": 20.0, "c4": 25.0}, {"boolq": 0.6}),
        "wanda.json": results_doc(
            "out/wanda-50", "wanda", "unstructured", 0.5, {"wikitext2": 30.0, "c4": 33.0}, {"boolq": 0.62}
        ),
        "stade.json": results_doc(
            "out/stade-50", "stade", "unstructured", 0.5, {"wikitext2": 27.0, "c4": 35.0}, {"boolq": 0.55}
        ),
        "stade24.json": results_doc(
            "out/stade-24", "stade", "2:4", 0.5, {"wikitext2": 45.0}, {"boolq": 0.5, "rte": 0.58}
        ),
    }
    for name, doc in docs.items():
        write_results(folder / name, doc)
    (folder / "config.json").write_text('{"model_type": "llama"}')  # other JSON in a folder is skipped
    return folder


def invoke(*args: str) -> Result:
    return helpers.invoke("compare", *args)


def by_label(c: Comparison) -> dict[str, Any]:
    return {r.label: r for r in c.rows}


def test_columns_best_values_and_deltas(results_dir: Path) -> None:
    c = compare([results_dir])
    keys = [col.key for col in c.columns]
    assert keys == ["ppl:wikitext2", "ppl:c4", "acc:boolq", "acc:rte", "acc:mean", "acc_norm:mean"]
    assert len(c.rows) == 4 and c.baseline == str(results_dir / "dense.json")
    rows = by_label(c)
    assert rows["smollm2"].is_baseline and not rows["wanda-50"].is_baseline
    # direction from the registry: lowest perplexity, highest accuracy
    assert c.best["ppl:wikitext2"] == 20.0 and c.best["ppl:c4"] == 25.0
    assert c.best["acc:boolq"] == 0.62 and c.best["acc:rte"] == 0.58
    assert c.is_best(rows["wanda-50"], "acc:boolq") and not c.is_best(rows["smollm2"], "acc:boolq")
    assert c.is_best(rows["stade-24"], "acc:rte")
    assert rows["stade-50"].deltas["ppl:wikitext2"] == pytest.approx(7.0)
    assert rows["wanda-50"].deltas["acc:boolq"] == pytest.approx(0.02)
    assert "ppl:c4" not in rows["stade-24"].values and "ppl:c4" not in rows["stade-24"].deltas  # a blank
    assert "acc:rte" not in rows["stade-24"].deltas  # the baseline has no rte


def test_cli_table_shows_every_row_and_column(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console.out, "width", 250)
    res = invoke(str(results_dir))
    assert res.exit_code == 0, res.output
    for text in ("smollm2", "wanda-50", "stade-50", "stade-24", "(baseline)", "2:4", "50.0%"):
        assert text in res.output
    for header in (
        "method",
        "pattern",
        "target",
        "achieved",
        "ppl wikitext2 ↓",
        "ppl c4 ↓",
        "acc boolq ↑",
        "acc rte ↑",
    ):
        assert header in res.output
    assert "acc mean ↑" in res.output and "acc_norm mean ↑" in res.output
    assert "27.000 (+7.000)" in res.output and "62.00 (+2.00)" in res.output


def test_markdown_marks_the_best_values(results_dir: Path) -> None:
    res = invoke(str(results_dir), "--markdown", "--sort", "ppl:wikitext2")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 + 4
    assert [line.split("|")[1].strip() for line in lines[2:]] == [
        "smollm2 (baseline)",
        "stade-50",
        "wanda-50",
        "stade-24",
    ]
    assert "| **20.000** | **25.000** |" in lines[2]
    assert "**62.00 (+2.00)**" in lines[4] and "**58.00**" in lines[5]
    header = [h.strip() for h in lines[0].split("|")]
    assert [h.strip() for h in lines[5].split("|")][header.index("ppl c4")] == ""  # stade-24 has no c4: a blank


def test_json_round_trips(results_dir: Path) -> None:
    res = invoke(str(results_dir), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["kind"] == "stade-comparison"
    assert Comparison.from_dict(data) == compare([results_dir])
    assert Comparison.from_dict(json.loads(json.dumps(Comparison.from_dict(data).to_dict()))).to_dict() == data


def test_csv(results_dir: Path) -> None:
    res = invoke(str(results_dir), "--csv", "--sort", "acc:mean")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["model"] for r in rows] == ["wanda-50", "smollm2", "stade-50", "stade-24"]  # means .62 .60 .55 .54
    assert rows[0]["ppl:wikitext2"] == "30.0" and rows[3]["ppl:c4"] == ""
    assert float(rows[0]["delta:ppl:wikitext2"]) == pytest.approx(10.0)


def test_explicit_baseline_and_files(results_dir: Path) -> None:
    c = compare([results_dir / "stade.json", results_dir / "stade24.json"], baseline=results_dir / "wanda.json")
    rows = by_label(c)
    assert len(c.rows) == 3 and rows["wanda-50"].is_baseline
    assert rows["stade-50"].deltas["ppl:wikitext2"] == pytest.approx(-3.0)
    assert compare([results_dir / "wanda.json"]).baseline is None  # no dense model: no deltas
    assert build(load_sources([results_dir / "wanda.json"])).rows[0].deltas == {}


def test_plot(results_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "plots" / "ppl.png"
    res = invoke(str(results_dir), "--plot", str(png))
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(results_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = invoke(str(results_dir), "--plot", str(tmp_path / "p.png"))
    assert res.exit_code == 1 and "--plot needs matplotlib" in said(res) and "pip install" in said(res)
    with pytest.raises(StadeError) as info:
        plot(compare([results_dir]), tmp_path / "p.png")
    assert info.value.hint == "pip install 'stade[plot]'"
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"kind": "stade-results", "schema": 2}', "schema 2; this stade reads schema 1"),
        ('{"kind": "stade-statistics", "schema": 1}', "is not a stade results file"),
        ('{"kind": "stade-res', "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
    ],
)
def test_bad_results_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    res = invoke(str(path))
    assert res.exit_code == 1 and message in said(res)


def test_other_errors(results_dir: Path, tmp_path: Path) -> None:
    res = invoke(str(tmp_path / "missing.json"))
    assert res.exit_code == 1 and "does not exist" in said(res)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = invoke(str(empty))
    assert res.exit_code == 1 and "No stade results files found" in said(res)
    res = invoke(str(results_dir), "--sort", "ppl:wikitext")
    assert res.exit_code == 1 and "Unknown --sort column" in said(res) and "ppl:wikitext2" in said(res)
    with pytest.raises(StadeError, match="Unknown --sort"):
        compare([results_dir], sort="nope")
    res = invoke(str(results_dir), "--json", "--csv")
    assert res.exit_code == 2 and "choose one of --json, --markdown and --csv" in said(res)
