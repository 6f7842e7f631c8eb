"""Choosing layers: --ignore keeps the layers it matches exactly dense and prunes the rest as without it; --only
prunes just what it matches; both are recorded and every refusal names the pattern."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import calibrate, invoke, read_weights

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def stats(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrate(tiny_llama_dir, tmp_path_factory.mktemp("sel") / "s", "--hessian", nsamples=4, seqlen=32)


def prune(model: Path, stats: Path, out: Path, method: str, *extra: str, pattern: str = "unstructured") -> dict:
    args = ["--method", method, "--pattern", pattern, "--device", "cpu", "--out", out]
    res = invoke("prune", model, "--stats", stats, "--sparsity", "0.5", *args, *extra)
    assert res.exit_code == 0, res.output
    return json.loads((out / "stade.json").read_text())


def prunable(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if ".layers." in k and k.rsplit(".", 2)[-2] in LINEAR}


@pytest.mark.parametrize(
    ("method", "pattern", "ignore", "kept"),
    [
        ("sparsegpt", "unstructured", "re:.*down_proj", "down_proj"),
        ("wanda", "2:4", "re:.*down_proj", "down_proj"),
        ("sparsegpt", "2:4", "v_proj", "v_proj"),  # one of the q/k/v solved stacked: q and k as without it
    ],
)
def test_ignore_keeps_layers_dense_and_prunes_the_rest_as_before(
    tiny_llama_dir: Path, stats: Path, tmp_path: Path, method: str, pattern: str, ignore: str, kept: str
) -> None:
    full = prune(tiny_llama_dir, stats, tmp_path / "all", method, pattern=pattern)
    part = prune(tiny_llama_dir, stats, tmp_path / "part", method, "--ignore", ignore, pattern=pattern)
    dense, a, b = (prunable(read_weights(p)) for p in (tiny_llama_dir, tmp_path / "all", tmp_path / "part"))
    ignored = [k for k in dense if k.rsplit(".", 2)[-2] == kept]
    assert len(ignored) == 2  # one per block
    for name in dense:
        if name in ignored:
            assert torch.equal(b[name], dense[name]), name
            assert not torch.equal(a[name], dense[name]), name
        else:
            assert torch.equal(b[name], a[name]), name  # same masks and same updated weights
    zeros = sum(int((t == 0).sum()) for t in b.values())
    assert part["achieved_sparsity"] == pytest.approx(zeros / sum(t.numel() for t in b.values()), abs=1e-6)
    assert part["selection"] == {"only": [], "ignore": [ignore]} and full.get("selection") is None
    assert sorted(r["name"] + ".weight" for r in part["layers"] if r.get("dense")) == sorted(ignored)
    card = (tmp_path / "part" / "README.md").read_text()
    assert "layers kept dense" in card and f"2 of {len(dense)}" in card


def test_only_prunes_just_what_it_matches(tiny_llama_dir: Path, stats: Path, tmp_path: Path) -> None:
    prune(tiny_llama_dir, stats, tmp_path / "p", "wanda", "--only", r"re:model\.layers\.1\.mlp\.,re:.*q_proj")
    dense, got = prunable(read_weights(tiny_llama_dir)), prunable(read_weights(tmp_path / "p"))
    for name, w in got.items():
        chosen = name.startswith("model.layers.1.mlp.") or name.endswith("q_proj.weight")
        assert (int((w == 0).sum()) == w.numel() // 2) if chosen else torch.equal(w, dense[name]), name


@pytest.mark.parametrize(
    ("option", "value", "phrase"),
    [
        ("--ignore", "re:.*down_prj", "--ignore 're:.*down_prj' matches none of the model's 14 prunable layers"),
        ("--only", "mlp.gate", "--only 'mlp.gate' matches none of the model's 14 prunable layers"),
        ("--ignore", "re:.*(proj", "--ignore 're:.*(proj' is not a regular expression"),
        ("--ignore", "re:.*", "leave no layer to prune"),
    ],
)
def test_a_bad_selection_is_refused_before_the_model_loads(
    tiny_llama_dir: Path, stats: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, value: str,
    phrase: str,
) -> None:  # fmt: skip
    monkeypatch.setattr("stade_cli.models.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    res = invoke("prune", tiny_llama_dir, "--stats", stats, "--method", "wanda", "--sparsity", "0.5", option, value,
                 "--out", tmp_path / "p")  # fmt: skip
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and phrase in errors[0], res.stderr
    assert not (tmp_path / "p").exists()


def test_patterns_split_on_commas_outside_brackets() -> None:
    from stade_cli.stages.selection import LayerSelection, split_patterns

    assert split_patterns(r"re:.*layers\.(0|1)\.,down_proj, re:.{1,3}q_proj") == (
        r"re:.*layers\.(0|1)\.",
        "down_proj",
        "re:.{1,3}q_proj",
    )
    sel = LayerSelection.parse(None, "self_attn.q_proj,re:model\\.layers\\.1\\.")
    assert not sel.pruned("model.layers.0.self_attn.q_proj") and sel.pruned("model.layers.0.self_attn.k_proj")
    assert not sel.pruned("model.layers.1.mlp.up_proj") and sel.pruned("model.layers.10.mlp.up_proj")
    assert sel.pruned("model.layers.0.self_attn.xq_proj")  # a plain name matches whole name parts only


def test_plan_counts_the_dense_layers_and_refuses_as_prune_does(tiny_llama_dir: Path) -> None:
    res = invoke("plan", tiny_llama_dir, "--ignore", r"re:model\.layers\.1\.,down_proj", "--no-time", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "layers: 8 of 14 prunable layers kept dense" in " ".join(res.stdout.split())  # block 1's 7, block 0's down
    res = invoke("plan", tiny_llama_dir, "--only", "re:.*dwn", "--no-time", "--device", "cpu")
    assert res.exit_code == 1 and "--only 're:.*dwn' matches none of the model's 14 prunable layers" in res.stderr
