"""Pruning stages: ADMM against the least-squares closed form, OWL's ratios, presets, CLI, device-agnostic code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stade_cli.stages.pattern import parse_pattern
from stade_cli.stages.solvers.admm import admm_prune
from stade_cli.stages.updates.admm import AdmmSettings

from helpers import calibrate, invoke, read_weights


def _layer(seed: int = 0, rows: int = 24, cols: int = 32, n: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """A small layer with correlated, off-centre inputs (where an update matters most)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cols)) @ (np.eye(cols) + 0.5 * rng.standard_normal((cols, cols)))
    x = x * rng.uniform(0.2, 3.0, cols) + rng.standard_normal(cols)
    return rng.standard_normal((rows, cols)).astype(np.float32), x.astype(np.float32)


def _exact(w: np.ndarray, h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """min over kept weights of (w' - w) H (w' - w)^T, row by row in float64: H_KK w'_K = (H w)_K."""
    out = np.zeros_like(w, dtype=np.float64)
    for i in range(w.shape[0]):
        keep = ~mask[i]
        out[i, keep] = np.linalg.solve(h[np.ix_(keep, keep)], (h @ w[i].astype(np.float64))[keep])
    return out


def _err(w: np.ndarray, w_new: np.ndarray, x: np.ndarray) -> float:
    return float(np.square((w.astype(np.float64) - w_new) @ x.T.astype(np.float64)).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_admm_with_fixed_mask_reaches_least_squares_optimum(pattern: str) -> None:
    w, x = _layer()
    h = 2 / x.shape[0] * x.T.astype(np.float64) @ x.astype(np.float64)
    rng = np.random.default_rng(1)
    score = np.abs(w) * np.sqrt(np.square(x).sum(0))  # a wanda mask, held fixed
    if pattern == "2:4":
        order = np.argsort(score.reshape(w.shape[0], -1, 4) + 1e-9 * rng.random((w.shape[0], w.shape[1] // 4, 4)), -1)
        mask = np.zeros((w.shape[0], w.shape[1] // 4, 4), dtype=bool)
        np.put_along_axis(mask, order[..., :2], True, -1)
        mask = mask.reshape(w.shape)
    else:
        mask = np.zeros_like(w, dtype=bool)
        np.put_along_axis(mask, np.argsort(score, 1)[:, : w.shape[1] // 2], True, 1)
    damped = h + 0.01 * np.diag(h).mean() * np.eye(h.shape[0])
    exact = _exact(w, damped, mask)
    masked_err, exact_err = _err(w, np.where(mask, 0, w), x), _err(w, exact, x)
    assert exact_err < 0.7 * masked_err  # the layer is one where the update matters
    ht, mt = torch.from_numpy(h).float(), torch.from_numpy(mask)
    default = admm_prune(torch.from_numpy(w), ht, mt, AdmmSettings())
    assert torch.equal(default.mask, mt) and np.all(default.weight.numpy()[mask] == 0)
    assert _err(w, default.weight.double().numpy(), x) < 0.8 * masked_err
    converged = admm_prune(torch.from_numpy(w), ht, mt, AdmmSettings(iters=400))
    assert _err(w, converged.weight.double().numpy(), x) == pytest.approx(exact_err, rel=1e-3)
    np.testing.assert_allclose(converged.weight.numpy(), exact, rtol=1e-3, atol=1e-3 * np.abs(exact).max())
    grown = admm_prune(torch.from_numpy(w), ht, mt, AdmmSettings(iters=60, rho=0.3, rho_growth=1.1))
    assert _err(w, grown.weight.double().numpy(), x) == pytest.approx(exact_err, rel=1e-3)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_admm_gradual_selection_gives_the_pattern_and_beats_its_score(pattern: str) -> None:
    w, x = _layer(2, rows=16, cols=64)
    h = torch.from_numpy(2 / x.shape[0] * x.T @ x)
    p = parse_pattern(pattern)
    res = admm_prune(torch.from_numpy(w), h, None, AdmmSettings(), 0.5, p)
    mask = res.mask.numpy()
    if p.structured:
        assert np.all(mask.reshape(16, -1, p.m).sum(-1) == p.n)
    else:
        assert np.all(mask.sum(1) == 32)
    assert np.all(res.weight.numpy()[mask] == 0)
    # Better than the wanda mask of the dense weights with the weights left as they are.
    score = np.abs(w) * np.sqrt(np.square(x).sum(0))
    wanda = np.zeros_like(w, dtype=bool)
    np.put_along_axis(wanda, np.argsort(score, 1)[:, :32], True, 1)
    assert _err(w, res.weight.double().numpy(), x) < _err(w, np.where(wanda, 0, w), x)


def test_stage_code_follows_the_inputs_device() -> None:
    """Every tensor the stages create follows the weights' device: run them with `meta` as the default device.

    A tensor made without `device=` would land on `meta` and the CPU arithmetic would fail or come back meta.
    """
    from stade_cli.driver.prune import prune_group
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.accumulators import Hessian, LayerStats, Moments

    w, x = _layer(3, rows=16, cols=32)
    xt = torch.from_numpy(x)
    mom, hes = Moments(32, torch.device("cpu")), Hessian(32, torch.device("cpu"))
    mom.update(xt)
    hes.update(xt)
    st = LayerStats(mom.count, mom.mean, mom.m2, False, hes.value())
    configs = [
        PruneConfig("wanda", 0.5, update="admm"),
        PruneConfig("admm", None, "2:4"),
        PruneConfig("stade", 0.5),
        PruneConfig("sparsegpt", 0.5),
        PruneConfig("random", None, "2:4"),
    ]
    ws = [torch.from_numpy(w)]
    expected = [prune_group(ws, st, c, ["layer"]) for c in configs]
    torch.set_default_device("meta")
    try:
        got = [prune_group(ws, st, c, ["layer"]) for c in configs]
    finally:
        torch.set_default_device("cpu")
    for c, (e,), (g,) in zip(configs, expected, got, strict=True):
        assert g[0].device.type == "cpu" and g[0].dtype == torch.float32, c.name
        assert torch.equal(e[1], g[1]) and torch.allclose(e[0], g[0]), c.name


def _owl_expected(model_dir: Path, stats_dir: Path, target: float, m: float = 5.0, lam: float = 0.08) -> np.ndarray:
    """OWL's block ratios recomputed from the artifact and the weights with numpy."""
    weights = read_weights(model_dir)
    manifest = json.loads((stats_dir / "manifest.json").read_text())
    with safe_open(str(stats_dir / "stats.safetensors"), framework="np") as fh:
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    blocks: dict[int, list[np.ndarray]] = {}
    for layer in manifest["layers"]:
        mean, m2 = arrays[f"{layer['group']}.mean"], arrays[f"{layer['group']}.m2"]
        norm = np.sqrt(m2 + manifest["count"] * mean**2)
        w = weights[f"{layer['name']}.weight"].float().numpy()
        blocks.setdefault(layer["block"], []).append((np.abs(w) * norm).ravel())
    d = np.array([(np.concatenate(s) > m * np.concatenate(s).mean()).mean() for _, s in sorted(blocks.items())])
    dens = (d - d.min()) / (d.max() - d.min()) * 2 * lam
    return target - (dens - dens.mean())


def test_owl_ratios_average_to_target(tiny_llama_dir: Path, tmp_path: Path) -> None:
    stats = calibrate(tiny_llama_dir, tmp_path / "stats")
    out = tmp_path / "owl"
    res = invoke(
        "prune", tiny_llama_dir, "--stats", stats, "--method", "wanda", "--allocation", "owl", "--sparsity", "0.6",
        "--owl-lambda", "0.1", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "stade.json").read_text())
    ratios = np.array(list(report["block_sparsity"].values()))
    assert ratios.mean() == pytest.approx(0.6, abs=1e-6)
    np.testing.assert_allclose(ratios, _owl_expected(tiny_llama_dir, stats, 0.6, lam=0.1), atol=1e-6)
    assert report["stages"]["allocation"] == {"name": "owl", "settings": {"m": 5.0, "lambda": 0.1}}
    for layer in report["layers"]:  # each layer at its block's ratio (int(in * s) per row)
        block = ".".join(layer["name"].split(".")[:3])
        assert layer["sparsity"] == pytest.approx(
            int(layer["shape"][1] * report["block_sparsity"][block]) / layer["shape"][1]
        )
    res = invoke(
        "prune", tiny_llama_dir, "--stats", stats, "--method", "wanda", "--allocation", "owl", "--pattern", "2:4",
        "--out", tmp_path / "nm",
    )  # fmt: skip
    assert res.exit_code == 1 and "needs unstructured sparsity" in res.output and not (tmp_path / "nm").exists()


def test_stages_from_the_cli_are_recorded(tiny_llama_dir: Path, tmp_path: Path) -> None:
    stats = calibrate(tiny_llama_dir, tmp_path / "stats", "--hessian")
    out = tmp_path / "sweep"
    res = invoke(
        "prune", tiny_llama_dir, "--stats", stats, "--method", "wanda,stade", "--update", "admm", "--pattern",
        "2:4", "--admm-iters", "30", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "stade+admm-2of4-0.5" / "stade.json").read_text())
    assert report["method"] == "stade" and report["stages"]["score"] == ["stade"]
    assert report["stages"]["update"]["name"] == "admm" and report["stages"]["update"]["settings"]["iters"] == 30
    assert not any(layer["bias_updated"] for layer in report["layers"])  # --update replaced STADE's bias
    # wanda's mask, ADMM's weights: the kept weights moved, the pruned ones are the mask's
    dense = read_weights(tiny_llama_dir)
    wanda = read_weights(tmp_path / "sweep" / "wanda+admm-2of4-0.5")
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.all((wanda[key] == 0).reshape(-1, 4).sum(-1) >= 2)
    assert not torch.equal(wanda[key][wanda[key] != 0], dense[key][wanda[key] != 0])

    def fails(*args: object, expect: str) -> None:
        r = invoke("prune", tiny_llama_dir, "--stats", stats, "--out", tmp_path / "x", *args)
        assert r.exit_code == 1 and expect in r.output, r.output

    fails("--method", "sparsegpt", "--update", "admm", "--sparsity", "0.5", expect="chooses its mask with its own")
    fails("--method", "wanda", "--update", "obs", "--sparsity", "0.5", expect="chooses its own mask")
    fails("--method", "wanda", "--update", "admn", "--sparsity", "0.5", expect="did you mean 'admm'")
    fails("--method", "wanda", "--allocation", "owls", "--sparsity", "0.5", expect="did you mean 'owl'")
    fails(
        "--method", "wanda", "--allocation", "owl", "--owl-lambda", "-1", "--sparsity", "0.5", expect="lambda -1 >= 0"
    )
    # The options of a stage the run does not use are not read (as before stages described themselves).
    args = ["--method", "wanda", "--sparsity", "0.5", "--owl-lambda", "-1", "--out", tmp_path / "unused"]
    ok = invoke("prune", tiny_llama_dir, "--stats", stats, *args)
    assert ok.exit_code == 0, ok.output


def test_stade_with_update_none_is_stade_without_bias() -> None:
    from stade_cli.stages.config import PruneConfig

    assert PruneConfig("stade", 0.5, update="bias") == PruneConfig("stade", 0.5)  # the preset's own update
    w, x = _layer(4)
    from stade_cli.stats.accumulators import LayerStats, Moments

    mom = Moments(32, torch.device("cpu"))
    mom.update(torch.from_numpy(x))
    st = LayerStats(mom.count, mom.mean, mom.m2, False)
    from stade_cli.driver.prune import prune_weight

    a = prune_weight(torch.from_numpy(w), st, PruneConfig("stade", 0.5, update="none"))
    b = prune_weight(torch.from_numpy(w), st, PruneConfig("stade", 0.5, bias_update=False))
    assert a[2] is None and b[2] is None and torch.equal(a[0], b[0])
    c = prune_weight(torch.from_numpy(w), st, PruneConfig("wanda", 0.5, update="bias"))
    assert c[2] is not None and torch.equal(c[0], prune_weight(torch.from_numpy(w), st, PruneConfig("wanda", 0.5))[0])


def test_layer_error_with_hessian_is_the_exact_output_error() -> None:
    """stade.json's rel_error for a run with H: ||(W' - W)X + db||² / ||WX||², from the inputs themselves."""
    from stade_cli.driver.prune import output_error
    from stade_cli.stats.accumulators import Hessian, LayerStats, Moments

    w, x = _layer(5)
    wt, xt = torch.from_numpy(w), torch.from_numpy(x)
    mom, hes = Moments(32, torch.device("cpu")), Hessian(32, torch.device("cpu"))
    mom.update(xt)
    hes.update(xt)
    st = LayerStats(mom.count, mom.mean, mom.m2, False, hes.value())
    w_new = wt * (torch.rand(wt.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    db = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1))
    err, energy = output_error(wt, w_new, db, st)
    x64 = x.astype(np.float64)
    direct = np.square(x64 @ (w_new.numpy() - w).T.astype(np.float64) + db.numpy()).sum(1).mean()
    assert err == pytest.approx(direct, rel=1e-4)
    assert energy == pytest.approx(np.square(x64 @ w.T.astype(np.float64)).sum(1).mean(), rel=1e-4)
