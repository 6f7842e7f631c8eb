"""The README.md model card of a pruned checkpoint: written by prune, given its results by eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stade_cli.base.artifacts import PruneRecord
from stade_cli.base.modelcard import RESULTS_END, RESULTS_START, render
from stade_cli.cli import app


def invoke(*args: object):
    res = CliRunner().invoke(app, [str(a) for a in args], prog_name="stade")
    assert res.exit_code == 0, res.output
    return res


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def outside_results(card: str) -> str:
    return card[: card.index(RESULTS_START)] + card[card.index(RESULTS_END) :]


@pytest.fixture(scope="module")
def pruned(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("card")
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Note {i}: " + "the market opens early and closes late. " * 6 for i in range(30)))
    stats = root / "stats"
    invoke("calibrate", tiny_llama_dir, "--data", text, "--nsamples", 4, "--seqlen", 48, "--out", stats)
    out = root / "sweep"
    invoke(
        *("prune", tiny_llama_dir, "--stats", stats, "--method", "wanda,magnitude", "--pattern", "unstructured,2:4"),
        *("--sparsity", "0.5", "--out", out),
    )
    return out, text


def test_each_checkpoint_gets_a_card(pruned: tuple[Path, Path], tiny_llama_dir: Path) -> None:
    out, text = pruned
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in folders] == sorted(
        ["wanda-unstructured-0.5", "wanda-2of4-0.5", "magnitude-unstructured-0.5", "magnitude-2of4-0.5"]
    )
    for folder in folders:
        report = json.loads((folder / "stade.json").read_text())
        card = (folder / "README.md").read_text()
        meta = front_matter(card)
        assert meta["library_name"] == "transformers"
        assert {"stade", "pruned", "sparse", report["method"]} <= set(meta["tags"])
        assert "base_model" not in meta  # a local folder is no hub id
        for phrase in (
            f"| base model | `{tiny_llama_dir}` |",
            f"| method | `{report['method']}` |",
            f"| pattern | {report['pattern']} |",
            "| target sparsity | 50.0% |",
            f"| achieved sparsity | {100 * report['achieved_sparsity']:.1f}% ",
            f"| calibration data | `{text}`, 4 windows x 48 tokens |",
            "| saved dtype | float32 |",
            f"stade prune {tiny_llama_dir} --stats {out.parent / 'stats'} --out {out} --method wanda,magnitude "
            "--sparsity 0.5 --pattern unstructured,2:4\n",
            "Not evaluated yet",
        ):
            assert phrase in card, (folder.name, phrase)


def test_eval_puts_its_results_into_the_card(pruned: tuple[Path, Path], tmp_path: Path) -> None:
    out, text = pruned
    folder = out / "wanda-unstructured-0.5"
    before = (folder / "README.md").read_text()
    invoke("eval", folder, "--ppl", text, "--seqlen", 32, "--out", tmp_path / "a.json")
    first = json.loads((tmp_path / "a.json").read_text())["perplexity"][str(text)]
    card = (folder / "README.md").read_text()
    assert outside_results(card) == outside_results(before)  # the rest is kept as it was
    assert f"| perplexity {text} | {first['ppl']:.3f} | {first['windows']} windows x 32 tokens |" in card
    assert "Not evaluated yet" not in card
    # Another run adds its result, and a result measured again replaces its own row only.
    invoke("eval", folder, "--ppl", text, "--seqlen", 16, "--max-windows", 3, "--out", tmp_path / "b.json")
    again = json.loads((tmp_path / "b.json").read_text())["perplexity"][str(text)]
    card = (folder / "README.md").read_text()
    assert f"| perplexity {text} | {again['ppl']:.3f} | 3 windows x 16 tokens;" in card
    assert card.count(f"| perplexity {text} |") == 1
    assert outside_results(card) == outside_results(before)
    assert not list(folder.glob("*.incomplete"))


def test_dense_model_folder_gets_no_card(tiny_llama_dir: Path, pruned: tuple[Path, Path], tmp_path: Path) -> None:
    _out, text = pruned
    invoke("eval", tiny_llama_dir, "--ppl", text, "--seqlen", 32, "--max-windows", 2, "--out", tmp_path / "r.json")
    assert not (tiny_llama_dir / "README.md").exists()


def _record(spec: str) -> PruneRecord:
    """A stade.json of a 2:4 SparseGPT prune of `spec` (calibrated on C4 as published)."""
    stage = {"name": "none"}
    return PruneRecord.load(
        {
            "schema": 2,
            "kind": "stade-prune-report",
            "method": "sparsegpt",
            "stages": {
                "score": None,
                "update": {"name": "obs"},
                "allocation": {"name": "uniform"},
                "reconstruct": stage,
            },
            "pattern": "2:4",
            "sparsity": 0.5,
            "achieved_sparsity": 0.5,
            "bias_update": False,
            "sequential": True,
            "seed": 0,
            "route": "streaming",
            "dtype": "bfloat16",
            "model": {"spec": spec, "path": spec},
            "statistics": {"path": "s", "fingerprint": "abc", "data": "c4", "nsamples": 128, "seqlen": 2048},
            "device": "cuda:0",
            "layers": [],
        },
        "stade.json",
    )


def test_hub_base_model_in_front_matter() -> None:
    report = _record("meta-llama/Llama-3.2-1B")
    card = render(report, "stade prune meta-llama/Llama-3.2-1B --stats s --method sparsegpt --pattern 2:4 --out p")
    meta = front_matter(card)
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "2of4-sparsity" in meta["tags"]
    assert "[meta-llama/Llama-3.2-1B](https://huggingface.co/meta-llama/Llama-3.2-1B)" in card
    assert "| calibration data | `c4`, 128 windows x 2048 tokens |" in card
    builtin = render(_record("smollm2-135m"))
    assert front_matter(builtin)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    snapshot = "/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abc"
    assert front_matter(render(_record(snapshot)))["base_model"] == ("Qwen/Qwen2.5-0.5B")
