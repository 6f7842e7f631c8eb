"""The published protocol, number for number: sequential wanda at 50% on SmolLM2 lands on the reference figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DATA

REF = DATA / "reference-smollm2"
WANDA_50 = 68.751  # the Wanda repository's figure with these exact ids (tests/data/reference-smollm2/README.md)


@pytest.mark.slow
def test_sequential_wanda_reproduces_reference_figure(tmp_path: Path) -> None:
    from stade_cli.data.sources import load_token_file
    from stade_cli.driver.calibrate import CalibrationConfig, calibrate
    from stade_cli.driver.sweep import prune_model
    from stade_cli.evaluation.perplexity import perplexity
    from stade_cli.models.loading import load_model
    from stade_cli.stages.config import PruneConfig

    cpu = torch.device("cpu")
    loaded = load_model("smollm2-135m", "float32", cpu)
    stats = calibrate(
        loaded, CalibrationConfig(data=str(REF / "calibration_ids.safetensors"), nsamples=None), tmp_path / "stats", cpu
    )
    assert stats.manifest.dump()["data"]["nsamples"] == 32 and stats.manifest.dump()["data"]["seqlen"] == 512
    report = prune_model(loaded, stats, PruneConfig("wanda", 0.5, sequential=True), cpu)
    assert report.achieved_sparsity == pytest.approx(0.5)
    heldout = load_token_file(REF / "heldout_ids.safetensors", "[1, N]")
    result = perplexity(loaded.model, heldout, 512, 8, cpu)
    assert result.windows == 147
    assert abs(result.ppl - WANDA_50) / WANDA_50 < 0.01, result.ppl
