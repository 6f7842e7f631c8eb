"""The prune stage: masks recomputed independently of the tool from docs/methods.md, STADE's bias, SparseGPT,
checkpoints, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import calibrate, invoke, read_weights, recorded_versions

SCORED = ["magnitude", "wanda", "stade", "stadew", "stade_plus"]


def artifact_stats(stats_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    manifest = json.loads((stats_dir / "manifest.json").read_text())
    with safe_open(str(stats_dir / "stats.safetensors"), framework="np") as fh:
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    return manifest, arrays


def expected_scores(method: str, w: np.ndarray, mean: np.ndarray, m2: np.ndarray, n: int, norm_fed: bool) -> np.ndarray:
    """Scores straight from docs/methods.md#scores, float32 like the tool (statistics derived in float64 first)."""
    var = m2 / (n - 1)
    if method == "stadew":
        method = "wanda" if norm_fed else "stade"
    if method == "magnitude":
        return np.abs(w)
    if method == "wanda":
        return np.abs(w) * np.sqrt(m2 + n * mean**2).astype(np.float32)
    if method == "stade":
        return np.abs(w) * np.sqrt(var).astype(np.float32)
    if method == "stade_plus":
        return np.square(w) * (var + mean**2).astype(np.float32)
    raise ValueError(method)


def expected_mask(scores: np.ndarray, sparsity: float, n: int, m: int) -> np.ndarray:
    rows, cols = scores.shape
    mask = np.zeros_like(scores, dtype=bool)
    if m:
        grouped = scores.reshape(rows, cols // m, m)
        order = np.argsort(grouped, axis=-1, kind="stable")[..., :n]
        gm = np.zeros_like(grouped, dtype=bool)
        np.put_along_axis(gm, order, True, axis=-1)
        return gm.reshape(rows, cols)
    k = int(cols * sparsity)
    order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def check_masks(model_dir: Path, stats_dir: Path, pruned: Path, method: str, sparsity: float, n: int, m: int) -> int:
    original = read_weights(model_dir)
    written = read_weights(pruned)
    manifest, arrays = artifact_stats(stats_dir)
    count = manifest["count"]
    checked = 0
    for layer in manifest["layers"]:
        key = f"{layer['name']}.weight"
        w = original[key].float().numpy()
        mean, m2 = arrays[f"{layer['group']}.mean"], arrays[f"{layer['group']}.m2"]
        mask = expected_mask(expected_scores(method, w, mean, m2, count, layer["fed_by_norm"]), sparsity, n, m)
        got = written[key].float().numpy()
        assert np.all(got[mask] == 0), f"{method}: {key} keeps a weight the method prunes"
        assert np.array_equal(got[~mask], w[~mask]), f"{method}: {key} changed or pruned a weight it should keep"
        if m:
            per_block = mask.reshape(mask.shape[0], -1, m).sum(-1)
            assert np.all(per_block == n)
        else:
            assert np.all(mask.sum(1) == int(w.shape[1] * sparsity))
        checked += 1
    return checked


@pytest.fixture(scope="module")
def llama_stats(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrate(tiny_llama_dir, tmp_path_factory.mktemp("stats") / "s", "--hessian")


@pytest.mark.parametrize(
    "pattern,sparsity,n,m",
    [("unstructured", 0.5, 0, 0), ("unstructured", 0.7, 0, 0), ("2:4", 0.5, 2, 4), ("4:8", 0.5, 4, 8)],
)
def test_masks_match_method_definitions(
    tiny_llama_dir: Path, llama_stats: Path, tmp_path: Path, pattern: str, sparsity: float, n: int, m: int
) -> None:
    out = tmp_path / "sweep"
    args = ["--sparsity", sparsity] if not m else []
    res = invoke(
        "prune",
        tiny_llama_dir,
        "--stats",
        llama_stats,
        "--method",
        ",".join(SCORED),
        "--pattern",
        pattern,
        *args,
        "--no-bias-update",
        "--device",
        "cpu",
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    slug = pattern.replace(":", "of")
    for method in SCORED:
        folder = out / f"{method}-{slug}-{sparsity:g}"
        assert check_masks(tiny_llama_dir, llama_stats, folder, method, sparsity, n, m) == 14
        report = json.loads((folder / "stade.json").read_text())
        assert report["method"] == method and abs(report["achieved_sparsity"] - (n / m if m else sparsity)) < 0.02
        assert report["versions"] == recorded_versions()
        assert report["stages"]["update"]["name"] != "bias"  # --no-bias-update is what the checkpoint records


def test_stade_bias_restores_mean_output_and_reduces_error() -> None:
    """On one layer with off-centre inputs, the compensated output has the dense mean and a smaller error."""
    from stade_cli.driver.prune import prune_weight
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.accumulators import LayerStats, Moments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 96, generator=g) * torch.rand(96, generator=g) * 2 + torch.randn(96, generator=g) * 3
    w = torch.randn(48, 96, generator=g)
    mom = Moments(96, torch.device("cpu"))
    mom.update(x)
    st = LayerStats(mom.count, mom.mean, mom.m2, fed_by_norm=False)
    dense = x @ w.t()
    for cfg in (PruneConfig("stade", 0.5), PruneConfig("stade", None, "2:4")):
        w_new, mask, db, _ = prune_weight(w, st, cfg)
        assert db is not None and mask.float().mean().item() == pytest.approx(0.5)
        compensated = x @ w_new.t() + db
        plain = x @ w_new.t()
        assert torch.allclose(compensated.mean(0), dense.mean(0), atol=1e-3, rtol=1e-4)
        assert (compensated - dense).square().mean() < 0.8 * (plain - dense).square().mean()
    _, _, db_off, _ = prune_weight(w, st, PruneConfig("stade", 0.5, bias_update=False))
    assert db_off is None


@pytest.mark.parametrize("method", ["stade", "stadew", "sparsegpt", "random"])
def test_checkpoint_reloads_with_same_logits(
    tiny_llama_dir: Path, llama_stats: Path, tmp_path: Path, method: str
) -> None:
    from transformers import AutoModelForCausalLM

    from stade_cli.driver.sweep import prune_checkpoints
    from stade_cli.models.loading import load_model, resolve_device
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.artifact import Statistics

    loaded = load_model(str(tiny_llama_dir), "float32", "cpu")
    stats = Statistics.load(llama_stats)
    ((path, report),) = prune_checkpoints(
        loaded, stats, [PruneConfig(method, 0.5)], tmp_path / "out", resolve_device("cpu")
    )
    ids = stats.token_ids()[:2]
    with torch.no_grad():
        in_memory = loaded.model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits
    assert torch.allclose(in_memory, reloaded, atol=1e-5, rtol=1e-5)
    biased = [layer.name for layer in report.layers if layer.bias_updated]
    if method == "stade":
        assert len(biased) == 14
    if method == "stadew":
        assert biased and all(name.endswith(("o_proj", "down_proj")) for name in biased)
    if method in ("stade", "stadew"):
        assert json.loads((path / "config.json").read_text())["attention_bias"] is True


def test_qwen2_bias_update_is_refused_not_dropped(tmp_path: Path) -> None:
    from conftest import save_tiny_model

    model = save_tiny_model("qwen2", tmp_path / "qwen2")
    stats = calibrate(model, tmp_path / "stats")
    res = invoke("prune", model, "--stats", stats, "--method", "stade", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert res.exit_code == 1
    assert "no config switch" in res.output and "--no-bias-update" in res.output
    assert not (tmp_path / "o").exists()
    res = invoke(
        "prune",
        model,
        "--stats",
        stats,
        "--method",
        "stade",
        "--sparsity",
        "0.5",
        "--no-bias-update",
        "--out",
        tmp_path / "o",
    )
    assert res.exit_code == 0, res.output


def test_opt_keeps_its_own_biases(tmp_path: Path) -> None:
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    model = save_tiny_model("opt", tmp_path / "opt")
    stats = calibrate(model, tmp_path / "stats")
    res = invoke("prune", model, "--stats", stats, "--method", "stade", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    before = AutoModelForCausalLM.from_pretrained(model).model.decoder.layers[0].fc2.bias
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "o").model.decoder.layers[0].fc2.bias
    assert not torch.allclose(before, after)


def test_sequential_differs_from_one_shot_after_first_block(
    tiny_llama_dir: Path, llama_stats: Path, tmp_path: Path
) -> None:
    for mode in ("one", "seq"):
        extra = ["--sequential"] if mode == "seq" else []
        res = invoke(
            "prune",
            tiny_llama_dir,
            "--stats",
            llama_stats,
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            *extra,
            "--out",
            tmp_path / mode,
        )
        assert res.exit_code == 0, res.output
    one, seq = read_weights(tmp_path / "one"), read_weights(tmp_path / "seq")
    first = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(one[first], seq[first])  # block 0 sees the same (dense) inputs in both modes
    assert not torch.equal(one["model.layers.1.mlp.down_proj.weight"], seq["model.layers.1.mlp.down_proj.weight"])
    assert json.loads((tmp_path / "seq" / "stade.json").read_text())["sequential"] is True


def test_same_command_twice_gives_identical_bytes(tiny_llama_dir: Path, llama_stats: Path, tmp_path: Path) -> None:
    digests = []
    for run in ("a", "b"):
        res = invoke(
            "prune",
            tiny_llama_dir,
            "--stats",
            llama_stats,
            "--method",
            "sparsegpt,random,stade",
            "--sparsity",
            "0.5",
            "--out",
            tmp_path / run,
        )
        assert res.exit_code == 0, res.output
        digests.append(
            {
                p.relative_to(tmp_path / run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((tmp_path / run).rglob("*.safetensors"))
            }
        )
    assert digests[0] == digests[1] and len(digests[0]) == 3


def test_sparsegpt_beats_wanda_mask_on_reconstruction() -> None:
    """A layer with correlated inputs: the OBS update lowers ||WX - W'X|| below the same-sparsity wanda mask."""
    from stade_cli.driver.prune import prune_weight
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stages.pattern import Pattern
    from stade_cli.stages.solvers.sparsegpt import sparsegpt_prune
    from stade_cli.stats.accumulators import Hessian, LayerStats, Moments

    g = torch.Generator().manual_seed(1)
    mixing = torch.eye(128) + torch.randn(128, 128, generator=g) * 0.4
    x = torch.randn(4096, 128, generator=g) @ mixing * (torch.rand(128, generator=g) * 3)
    w = torch.randn(64, 128, generator=g)
    mom, hes = Moments(128, torch.device("cpu")), Hessian(128, torch.device("cpu"))
    mom.update(x)
    hes.update(x)
    st = LayerStats(mom.count, mom.mean, mom.m2, False, hes.value())
    for pattern, ratio in ((Pattern(), 0.5), (Pattern(2, 4), 0.5)):
        res = sparsegpt_prune(w, hes.value(), ratio, pattern)
        assert torch.isfinite(res.weight).all() and res.mask.float().mean().item() == pytest.approx(0.5, abs=0.01)
        cfg = PruneConfig("wanda", None if pattern.structured else ratio, str(pattern))
        w_wanda, _, _, _ = prune_weight(w, st, cfg)
        err_sparsegpt = torch.linalg.norm(x @ (w - res.weight).t())
        err_wanda = torch.linalg.norm(x @ (w - w_wanda).t())
        assert err_sparsegpt < err_wanda


def test_sparsegpt_escalates_damping_on_singular_hessian() -> None:
    from stade_cli.stages.pattern import Pattern
    from stade_cli.stages.solvers.sparsegpt import sparsegpt_prune

    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 64, generator=g)  # rank 16 < 64 and a negative direction: Cholesky fails at first
    h = 2 / 16 * x.t() @ x - 0.05 * torch.eye(64)
    res = sparsegpt_prune(torch.randn(8, 64, generator=g), h, 0.5, Pattern())
    assert res.retries >= 1 and torch.isfinite(res.weight).all()


@pytest.mark.parametrize("shift", [0.0, -0.05], ids=["first-try", "after-retries"])
def test_hessian_factor_is_the_textbook_one_and_leaves_h_as_it_was(shift: float) -> None:
    """The factor is computed in place (two n x n matrices at most), yet it is the upper Cholesky factor of
    (H + lambda I)^-1 with dead channels set to 1, and the caller's H comes back bit for bit."""
    from stade_cli.stages.solvers.sparsegpt import hessian_factor

    g = torch.Generator().manual_seed(4)
    x = torch.randn(48, 64, generator=g)
    x[:, :3] = 0  # dead channels
    h = 2 / 48 * x.t() @ x + shift * torch.eye(64)
    h[:3, :3] = 0
    before = h.clone()
    factor = hessian_factor(h)
    assert torch.equal(h, before)
    assert (factor.retries >= 1) == (shift < 0) and factor.dead[:3].all() and not factor.dead[3:].any()
    damped = h.double().clone()
    damped[range(3), range(3)] = 1
    damped += factor.damping * damped.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.allclose(factor.upper.double(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("levels", [None, 3, 8])  # continuous scores, then heavy ties
def test_selection_equals_stable_sort(levels: int | None) -> None:
    """lowest_k (kthvalue selection) picks exactly what a stable ascending sort's first k would."""
    from stade_cli.stages.masks import lowest_k

    g = torch.Generator().manual_seed(3)
    scores = torch.rand(40, 96, generator=g)
    if levels:
        scores = (scores * levels).floor()
    for k in (0, 1, 17, 48, 95, 96):
        expected = torch.zeros_like(scores, dtype=torch.bool)
        expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(lowest_k(scores, k), expected), k


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_on_stacked_layers_equals_one_layer_at_a_time(pattern: str) -> None:
    """q/k/v share a Hessian and are solved stacked: each layer must get what it would get alone."""
    from stade_cli.stages.pattern import parse_pattern
    from stade_cli.stages.solvers.sparsegpt import sparsegpt_prune

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g))
    h = 2 / x.shape[0] * x.t() @ x
    ws = [torch.randn(rows, 256, generator=g) for rows in (48, 16, 16)]
    stacked = sparsegpt_prune(torch.cat(ws), h, 0.5, parse_pattern(pattern), segments=[48, 16, 16])
    for w, w_new, mask in zip(ws, stacked.weight.split([48, 16, 16]), stacked.mask.split([48, 16, 16]), strict=True):
        alone = sparsegpt_prune(w, h, 0.5, parse_pattern(pattern))
        assert torch.equal(mask, alone.mask)
        torch.testing.assert_close(w_new, alone.weight, rtol=1e-5, atol=1e-6)


def test_nan_scores_name_the_layer() -> None:
    from stade_cli.base.errors import StadeError
    from stade_cli.driver.prune import prune_weight
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.accumulators import LayerStats

    st = LayerStats(10, torch.tensor([0.0, float("nan"), 1.0, 2.0]), torch.ones(4), False)
    with pytest.raises(StadeError, match=r"model\.layers\.0\.mlp\.down_proj has NaN wanda scores"):
        prune_weight(torch.ones(2, 4), st, PruneConfig("wanda", 0.5), "model.layers.0.mlp.down_proj")


def test_an_in_memory_sweep_keeps_one_dense_block_not_a_second_model(
    tiny_llama_dir: Path, llama_stats: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep of a model in memory is one pass over the blocks: each block's dense weights are kept while it is
    pruned once per run (never a copy of the whole model), and every checkpoint equals the one pruned alone."""
    import hashlib

    import stade_cli.driver.dense as dense
    from stade_cli.driver.sweep import prune_checkpoints
    from stade_cli.models.loading import load_model
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.artifact import Statistics

    stats = Statistics.load(llama_stats)
    configs = [PruneConfig("stade", 0.5), PruneConfig("wanda", None, "2:4"), PruneConfig("magnitude", 0.3)]
    kept: list[int] = []
    real = dense.DenseBlock.__init__
    monkeypatch.setattr(dense.DenseBlock, "__init__", lambda self, b: kept.append(1) or real(self, b))
    monkeypatch.setattr(dense.Snapshot, "__init__", lambda *_a: pytest.fail("a copy of the whole model"))
    cpu = torch.device("cpu")
    prune_checkpoints(load_model(str(tiny_llama_dir), "auto", "cpu"), stats, configs, tmp_path / "sweep", cpu)
    assert len(kept) == 2  # one per block of the tiny model, each dropped after its block
    for c in configs:
        prune_checkpoints(load_model(str(tiny_llama_dir), "auto", "cpu"), stats, [c], tmp_path / c.name, cpu)
        for f in ("model.safetensors", "config.json"):
            a, b = (tmp_path / "sweep" / c.name / f).read_bytes(), (tmp_path / c.name / f).read_bytes()
            assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), (c.name, f)


def test_prune_model_refuses_a_model_whose_blocks_are_on_disk(tiny_llama_dir: Path, llama_stats: Path) -> None:
    from stade_cli.base.errors import StadeError
    from stade_cli.driver.sweep import prune_model
    from stade_cli.models.loading import load_model
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stats.artifact import Statistics

    lazy = load_model(str(tiny_llama_dir), "auto", "cpu", lazy=True)
    with pytest.raises(StadeError, match="blocks are on disk"):
        prune_model(lazy, Statistics.load(llama_stats), PruneConfig("wanda", 0.5), torch.device("cpu"))


def test_bad_inputs_are_refused_before_any_work(tiny_llama_dir: Path, llama_stats: Path, tmp_path: Path) -> None:
    from conftest import save_tiny_model

    out = tmp_path / "o"

    def fails(*args: object, expect: str) -> None:
        res = invoke("prune", *args)
        assert res.exit_code != 0, res.output
        assert expect in res.output, res.output
        assert not out.exists()

    base = (tiny_llama_dir, "--stats", llama_stats, "--out", out)
    fails(*base, "--method", "wandaa", "--sparsity", "0.5", expect="did you mean 'wanda'")
    fails(*base, "--method", "wanda", "--sparsity", "1.0", expect="outside [0, 1)")
    fails(*base, "--method", "wanda", "--sparsity", "-0.1", expect="outside [0, 1)")
    fails(*base, "--method", "wanda", "--pattern", "2:4", "--sparsity", "0.6", expect="contradicts pattern 2:4")
    fails(*base, "--method", "wanda", "--pattern", "3:5", expect="not divisible by M=5")
    fails(*base, "--method", "wanda", "--pattern", "5:4", expect="0 < N < M")
    other = save_tiny_model("llama", tmp_path / "other", seed=1)
    fails(
        other,
        "--stats",
        llama_stats,
        "--out",
        out,
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        expect="computed on another model",
    )
    no_h = calibrate(tiny_llama_dir, tmp_path / "noh")
    fails(
        tiny_llama_dir,
        "--stats",
        no_h,
        "--out",
        out,
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        expect="calibrate --hessian",
    )
    out.mkdir()
    res = invoke(*("prune", *base), "--method", "wanda", "--sparsity", "0.5")
    assert res.exit_code == 1 and "--force" in res.output and not any(out.iterdir())
    out.rmdir()
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(llama_stats, broken)
    data = (broken / "stats.safetensors").read_bytes()
    (broken / "stats.safetensors").write_bytes(data[: len(data) // 2])
    fails(
        tiny_llama_dir,
        "--stats",
        broken,
        "--out",
        out,
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        expect="corrupted or truncated",
    )


def test_methods_lists_registry() -> None:
    res = invoke("methods", "--json")
    assert res.exit_code == 0
    listed = json.loads(res.output)
    rows = {r["name"]: r for r in listed if r["kind"] == "method"}
    assert set(rows) == {"random", "magnitude", "wanda", "sparsegpt", "stade", "stadew", "stade_plus", "admm"}
    assert rows["sparsegpt"]["needs"] == ["hessian"] and rows["stade"]["bias_update"] == "all layers"
    stages = {(r["kind"], r["name"]) for r in listed if r["kind"] != "method"}
    assert {("update", u) for u in ("none", "bias", "obs", "admm")} <= stages
    assert {("allocation", "uniform"), ("allocation", "owl"), ("score", "stade_plus")} <= stages


@pytest.mark.slow
def test_smollm2_masks_match_definitions(tmp_path: Path) -> None:
    from stade_cli.models.loading import resolve_model

    model_dir = Path(resolve_model("smollm2-135m"))
    stats = tmp_path / "stats"
    res = invoke("calibrate", "smollm2-135m", "--data", "sample-wiki", "--nsamples", 4, "--seqlen", 256, "--out", stats)
    assert res.exit_code == 0, res.output
    out = tmp_path / "sweep"
    res = invoke(
        "prune",
        "smollm2-135m",
        "--stats",
        stats,
        "--method",
        "wanda,stade,stadew",
        "--sparsity",
        "0.5",
        "--pattern",
        "unstructured,2:4",
        "--no-bias-update",
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    for method in ("wanda", "stade", "stadew"):
        assert check_masks(model_dir, stats, out / f"{method}-unstructured-0.5", method, 0.5, 0, 0) == 210
        assert check_masks(model_dir, stats, out / f"{method}-2of4-0.5", method, 0.5, 2, 4) == 210


@pytest.mark.slow
def test_sparsegpt_beats_wanda_on_real_smollm2_layer() -> None:
    """Real inputs of a real layer (block 2's down_proj on real text): the OBS update wins, with no NaN."""
    from stade_cli.data.sources import calibration_windows
    from stade_cli.driver.prune import prune_weight
    from stade_cli.models.loading import load_model
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stages.solvers.sparsegpt import sparsegpt_prune
    from stade_cli.stats.accumulators import Hessian, LayerStats, Moments

    loaded = load_model("smollm2-135m")
    ids = calibration_windows("sample-wiki", loaded.tokenizer, 8, 256, 0).input_ids
    layer = loaded.model.model.layers[2].mlp.down_proj
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, a, _o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        loaded.model(ids)
    handle.remove()
    x = torch.cat(seen)
    w = layer.weight.detach().float()
    mom, hes = Moments(x.shape[1], torch.device("cpu")), Hessian(x.shape[1], torch.device("cpu"))
    mom.update(x)
    hes.update(x)
    st = LayerStats(mom.count, mom.mean, mom.m2, False, hes.value())
    res = sparsegpt_prune(w, hes.value(), 0.5, PruneConfig("wanda", 0.5).parsed_pattern)
    assert torch.isfinite(res.weight).all()
    w_wanda, _, _, _ = prune_weight(w, st, PruneConfig("wanda", 0.5))
    assert torch.linalg.norm(x @ (w - res.weight).t()) < 0.9 * torch.linalg.norm(x @ (w - w_wanda).t())


def test_checkpoint_keeps_source_dtype_unless_asked(tmp_path: Path) -> None:
    """A bfloat16 model calibrated in float32 on the CPU is pruned and written in bfloat16; --dtype overrides."""
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    src = save_tiny_model("llama", tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(src)
    stats = calibrate(src, tmp_path / "stats")
    assert json.loads((stats / "manifest.json").read_text())["dtype"] == "float32"
    for extra, want in (((), torch.bfloat16), (("--dtype", "float16"), torch.float16)):
        out = tmp_path / f"out-{want}"
        res = invoke("prune", src, "--stats", stats, "--method", "stade", "--sparsity", "0.5", *extra, "--out", out)
        assert res.exit_code == 0, res.output
        weights = read_weights(out)
        assert weights["model.layers.0.mlp.down_proj.weight"].dtype == want
        assert weights["model.layers.0.mlp.down_proj.bias"].dtype == want
