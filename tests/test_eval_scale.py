"""Perplexity with the head and log-softmax run in chunks of positions: the same figure as the whole logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def reference_nll(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Each window's mean NLL from the model's whole logits, in float64."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -logp.gather(-1, windows[:, 1:, None])[..., 0].mean(1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("chunk", [5, 256])
def test_chunked_nll_equals_whole_logits(tmp_path: Path, family: str, chunk: int) -> None:
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    from stade_cli.evaluation.perplexity import _chunks_agree, chunked_nll

    path = save_tiny_model(family, tmp_path / family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _chunks_agree(model, windows)
        got = chunked_nll(model, windows, chunk)
    assert torch.allclose(got.double(), reference_nll(model, windows), rtol=0, atol=1e-6)


def test_perplexity_takes_the_chunked_route_and_keeps_its_figure(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import math

    from transformers import AutoModelForCausalLM

    import stade_cli.evaluation.perplexity as ev

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 32 * 6), generator=torch.Generator().manual_seed(1))
    calls: list[tuple[int, ...]] = []
    real = ev.chunked_nll
    monkeypatch.setattr(ev, "chunked_nll", lambda m, w: calls.append(tuple(w.shape)) or real(m, w))
    bars: list = []
    real_progress = ev.progress
    monkeypatch.setattr(ev, "progress", lambda: bars.append(real_progress()) or bars[-1])
    result = ev.perplexity(model, ids, 32, batch_size=4)
    assert calls == [(4, 32), (2, 32)]
    (task,) = bars[0].tasks  # the chunked route advances the progress bar as the plain one does
    assert (task.completed, task.total) == (6, 6)
    expected = math.exp(float(reference_nll(model, ids.reshape(6, 32)).mean()))
    assert result.ppl == pytest.approx(expected, rel=1e-6)


def test_device_out_of_memory_is_one_line_with_a_hint(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import stade_cli.evaluation.evaluate as ev
    from stade_cli.cli import app

    def oom(*_a: object, **_k: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore detail")

    monkeypatch.setattr(ev, "evaluate_model", oom)
    args = ["eval", str(tiny_llama_dir), "--tasks", "none", "--ppl", "sample-news", "--out", str(tmp_path / "r.json")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "Out of memory: CUDA out of memory. Tried to allocate 8.00 GiB" in res.output
    assert "--batch-size" in res.output and "more detail" not in res.output


def test_eval_spread_within_max_memory_gives_the_same_perplexity(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Half the model within the host RAM budget, the rest read from disk as it runs: the same figure."""
    import json

    from typer.testing import CliRunner

    from stade_cli.cli import app

    size = sum(p.stat().st_size for p in tiny_llama_dir.glob("*.safetensors"))
    common = ["eval", str(tiny_llama_dir), "--tasks", "none", "--ppl", "sample-news", "--max-windows", "4"]
    common += ["--seqlen", "32"]
    res = CliRunner().invoke(app, [*common, "--device", "cpu", "--out", str(tmp_path / "plain.json")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        app, [*common, "--max-memory", f"cpu={size // 2}B", "--out", str(tmp_path / "spread.json")]
    )
    assert res.exit_code == 0, res.output
    plain = json.loads((tmp_path / "plain.json").read_text())
    spread = json.loads((tmp_path / "spread.json").read_text())
    assert spread["device"].startswith("device_map") and "disk" in spread["device"] and "cpu" in spread["device"]
    got, expected = spread["perplexity"]["sample-news"]["ppl"], plain["perplexity"]["sample-news"]["ppl"]
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("budget", "message"), [("gpu=3GiB", "DEVICE=SIZE"), ("cpu=lots", "DEVICE=SIZE")])
def test_bad_max_memory_is_refused_before_loading(
    tiny_llama_dir: Path, tmp_path: Path, budget: str, message: str
) -> None:
    from typer.testing import CliRunner

    from stade_cli.cli import app

    args = ["eval", str(tiny_llama_dir), "--tasks", "none", "--max-memory", budget, "--out", str(tmp_path / "r.json")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
