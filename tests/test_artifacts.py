"""The artifacts' written schemas: what stade writes loads back field for field, artifacts of the previous release
still load (upgraded), a newer schema or a damaged field is refused by name, and docs/artifacts.md names every
field."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from stade_cli.base import artifacts
from stade_cli.base.artifacts import PruneRecord, Results, StatsManifest, SweepSummary
from stade_cli.base.errors import StadeError
from stade_cli.base.schema import Artifact, Record
from stade_cli.stats.artifact import Statistics

from helpers import calibrate, invoke

ROOT = Path(__file__).resolve().parent.parent
OLD = Path(__file__).parent / "data" / "artifacts-0.1.0"  # written by stade 0.1.0 (commit ac83709)


@pytest.fixture(scope="module")
def written(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every artifact of this version: statistics, a sweep (stade.json, summary.json) and a results file."""
    tmp = tmp_path_factory.mktemp("artifacts")
    stats = calibrate(tiny_llama_dir, tmp / "stats", "--hessian", seqlen=32)
    args = ["prune", tiny_llama_dir, "--stats", stats, "--method", "wanda,admm", "--update", "admm"]
    res = invoke(
        *args, "--sparsity", "0.5", "--reconstruct", "block", "--reconstruct-steps", "2", "--out", tmp / "sweep"
    )
    assert res.exit_code == 0, res.output
    text = tmp / "text.txt"
    text.write_text("the pruned model reads a few words of text here. " * 40)
    sweep = tmp / "sweep" / "wanda+admm+block-unstructured-0.5"
    res = invoke("eval", sweep, "--ppl", text, "--tasks", "none", "--seqlen", "32", "--out", tmp / "results.json")
    assert res.exit_code == 0, res.output
    return tmp


def test_what_is_written_loads_back_field_for_field(written: Path) -> None:
    """Each artifact parses into its record and dumps to the very JSON on disk: nothing is lost or invented."""
    cases = [
        (StatsManifest, written / "stats" / "manifest.json"),
        (PruneRecord, written / "sweep" / "admm+block-unstructured-0.5" / "stade.json"),
        (SweepSummary, written / "sweep" / "summary.json"),
        (Results, written / "results.json"),
    ]
    for record, path in cases:
        data = json.loads(path.read_text())
        assert data["kind"] == record.KIND and data["schema"] == record.SCHEMA
        assert record.load(data, str(path)).dump() == data, path.name
    report = PruneRecord.load(json.loads(cases[1][1].read_text()), "stade.json")
    assert report.stages.update.name == "admm" and report.stages.update.settings["iters"] == 20
    assert report.stages.reconstruct.settings["steps"] == 2 and len(report.reconstruction or []) == 2


def test_artifacts_of_the_previous_release_still_load(tmp_path: Path) -> None:
    """stade 0.1.0's statistics load as they are; its stade.json (schema 1, each stage's settings in its own shape,
    the reconstruction's recorded twice) and a results file embedding it are upgraded to the current schema."""
    stats = Statistics.load(OLD / "stats")
    assert stats.manifest.schema == 1 and stats.has_hessian and len(stats.manifest.layers) == 14
    assert stats.layer("model.layers.1.mlp.down_proj").count == 8 * 32
    res = invoke("stats", "show", OLD / "stats", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["layers"] == 14
    old = json.loads((OLD / "stade.json").read_text())
    assert old["schema"] == 1 and "reconstruct" in old
    report = PruneRecord.load(old, "stade.json")
    assert report.schema == 3 and report.finetune is None and report.stages.score == ["wanda"]
    assert report.stages.update.name == "admm" and report.stages.update.settings["iters"] == 20
    assert report.stages.allocation.dump() == {"name": "owl", "settings": {"m": 5.0, "lambda": 0.08}}
    assert report.stages.reconstruct.name == "block" and report.stages.reconstruct.settings["steps"] == 2
    assert [b["block"] for b in report.reconstruction or []] == ["model.layers.0", "model.layers.1"]
    results = Results.load(json.loads((OLD / "results.json").read_text()), "results.json")
    assert results.pruning is not None and results.pruning.stages.allocation.name == "owl"
    shutil.copy(OLD / "results.json", tmp_path / "old.json")
    res = invoke("compare", tmp_path / "old.json", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"][0]["method"] == "wanda"


@pytest.mark.parametrize("record", [StatsManifest, PruneRecord, SweepSummary, Results])
def test_a_newer_schema_is_refused_with_the_fix(record: type[Artifact]) -> None:
    with pytest.raises(StadeError) as info:
        record.load({"kind": record.KIND, "schema": record.SCHEMA + 1}, "x.json")
    assert f"schema {record.SCHEMA + 1}; this stade reads schema {record.SCHEMA}" in info.value.message
    assert info.value.hint is not None and "upgrade stade" in info.value.hint
    with pytest.raises(StadeError, match="is not a stade"):
        record.load({"kind": "something-else", "schema": 1}, "x.json")


def test_a_damaged_field_is_named(written: Path) -> None:
    path = written / "sweep" / "wanda+admm+block-unstructured-0.5" / "stade.json"
    data = json.loads(path.read_text())
    data["layers"][3]["sparsity"] = "half"
    with pytest.raises(StadeError, match=r"'layers\[3\]\.sparsity' of the wrong type \(str\)"):
        PruneRecord.load(data, str(path))
    del data["stages"]["update"]
    with pytest.raises(StadeError, match=r"has no 'stages\.update'"):
        PruneRecord.load(data, str(path))


def test_docs_name_every_field_of_every_artifact() -> None:
    """docs/artifacts.md is the written schema: a field added to a record and left out there fails here."""
    doc = (ROOT / "docs" / "artifacts.md").read_text()
    named = set(re.findall(r"`([a-z_0-9]+)`", doc))
    records = [
        obj
        for obj in vars(artifacts).values()
        if isinstance(obj, type) and issubclass(obj, Record) and obj not in (Record, Artifact)
    ]
    missing = {f"{r.__name__}.{f.name}" for r in records for f in dataclasses.fields(r) if f.name not in named}
    assert missing == set()
    for record in (StatsManifest, PruneRecord, SweepSummary, Results):
        assert f"`{record.KIND}`" in doc and f"schema {record.SCHEMA}" in doc
