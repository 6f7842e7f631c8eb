"""The calibrate stage: statistics checked against an independent dense forward, determinism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from stade_cli.base.errors import StadeError
from stade_cli.driver.calibrate import CalibrationConfig, calibrate
from stade_cli.models.blocks import iterate_blocks
from stade_cli.models.fingerprint import fingerprint
from stade_cli.models.loading import load_model
from stade_cli.stats.artifact import Statistics

from helpers import assert_rel_close, invoke, recorded_versions

CPU = torch.device("cpu")
RTOL = 1e-4
TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. "
    "Statistics of activations tell which weights matter; pruning removes the ones that do not. "
) * 12


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A few long documents (byte-level tokens: one id per character)."""
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"Document {i}. {TEXT}" for i in range(4)))
    return path


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype="float32", device="cpu")


# ----------------------------------------------------------------------------------------------- reference


class DenseReference:
    """Hooks on every linear layer of a plain dense forward, accumulating in float64 (independent of stade)."""

    def __init__(self, model: nn.Module, hessian: bool) -> None:
        self.sum: dict[str, torch.Tensor] = {}
        self.sumsq: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.hessian = hessian
        self.handles = [
            mod.register_forward_hook(self._hook(name))
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and ".layers." in name
        ]

    def _hook(self, name: str):
        def hook(_mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            if name not in self.sum:
                self.sum[name] = torch.zeros(x.shape[1], dtype=torch.float64)
                self.sumsq[name] = torch.zeros(x.shape[1], dtype=torch.float64)
                self.xtx[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                self.count[name] = 0
            self.sum[name] += x.sum(0)
            self.sumsq[name] += x.square().sum(0)
            if self.hessian:
                self.xtx[name] += x.t() @ x
            self.count[name] += x.shape[0]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def expected(self, name: str) -> dict[str, torch.Tensor]:
        n = self.count[name]
        mean = self.sum[name] / n
        var = (self.sumsq[name] - n * mean.square()) / (n - 1)
        out = {"mean": mean, "var": var, "sumsq": self.sumsq[name]}
        if self.hessian:
            out["hessian"] = self.xtx[name] * (2.0 / n)
        return out


def dense_reference(model: nn.Module, input_ids: torch.Tensor, hessian: bool) -> DenseReference:
    ref = DenseReference(model, hessian)
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        ref.remove()
    return ref


def check_against_dense(model: nn.Module, stats: Statistics, hessian: bool) -> int:
    ids = stats.token_ids()
    ref = dense_reference(model, ids, hessian)
    names = set(stats.layers)
    assert names == set(ref.count), "the artifact must cover exactly the linear layers of the decoder blocks"
    for name in sorted(names):
        got = stats.layer(name, hessian=hessian)
        exp = ref.expected(name)
        assert got.count == ref.count[name] == ids.numel()
        assert_rel_close(got.mean, exp["mean"], f"{name} mean", RTOL)
        assert_rel_close(got.var, exp["var"], f"{name} var", RTOL)
        assert_rel_close(got.sumsq, exp["sumsq"], f"{name} sumsq", RTOL)
        if hessian:
            assert got.hessian is not None and got.hessian.dtype == torch.float32
            assert_rel_close(got.hessian, exp["hessian"], f"{name} hessian", RTOL)
    return len(names)


def run_calibrate(model_dir: Path | str, out: Path, **kwargs) -> Statistics:
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    return calibrate(loaded, CalibrationConfig(**kwargs), out, CPU)


# ----------------------------------------------------------------------------------------------- acceptance 1


@pytest.mark.parametrize("hessian", [False, True], ids=["moments", "hessian"])
def test_statistics_match_dense_forward(tiny_model_dir: Path, text_file: Path, tmp_path: Path, hessian: bool) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    config = CalibrationConfig(data=str(text_file), nsamples=6, seqlen=64, seed=1, hessian=hessian, batch_size=4)
    stats = calibrate(loaded, config, tmp_path / "stats", CPU)
    assert stats.token_ids().shape == (6, 64)
    in_blocks = [n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert check_against_dense(loaded.model, Statistics.load(tmp_path / "stats"), hessian) == len(in_blocks)


def test_batch_size_does_not_change_statistics(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    common = dict(data=str(text_file), nsamples=5, seqlen=32, seed=0, hessian=True)
    one = run_calibrate(tiny_llama_dir, tmp_path / "b1", batch_size=1, **common)
    several = run_calibrate(tiny_llama_dir, tmp_path / "b3", batch_size=3, **common)
    assert torch.equal(one.token_ids(), several.token_ids())
    for name in one.layers:
        a, b = one.layer(name, hessian=True), several.layer(name, hessian=True)
        assert a.count == b.count
        for what in ("mean", "var", "sumsq", "hessian"):
            assert_rel_close(getattr(a, what), getattr(b, what), f"{name} {what}", RTOL)


def test_groups_share_one_input(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    stats = run_calibrate(tiny_llama_dir, tmp_path / "s", data=str(text_file), nsamples=2, seqlen=16)
    layers = stats.layers
    q, k, v = (layers[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q.group == k.group == v.group
    assert layers["model.layers.0.mlp.gate_proj"].group == layers["model.layers.0.mlp.up_proj"].group
    assert q.fed_by_norm and layers["model.layers.0.mlp.up_proj"].fed_by_norm
    assert not layers["model.layers.0.self_attn.o_proj"].fed_by_norm
    assert not layers["model.layers.0.mlp.down_proj"].fed_by_norm
    assert layers["model.layers.0.mlp.down_proj"].shape == [64, 128]


def test_lazy_loading_gives_the_same_artifact(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """Blocks read from disk one at a time (what `stade calibrate` does) change nothing in the statistics."""
    config = CalibrationConfig(data=str(text_file), nsamples=4, seqlen=32, seed=2, hessian=True, batch_size=2)
    lazy = load_model(str(tiny_model_dir), dtype="float32", device="cpu", lazy=True)
    assert lazy.lazy
    assert all(p.is_meta for _i, _p, block in iterate_blocks(lazy.model) for p in block.parameters())
    eager = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    a = calibrate(lazy, config, tmp_path / "lazy", CPU)
    b = calibrate(eager, config, tmp_path / "eager", CPU)
    assert (
        a.manifest.dump()["model"]["fingerprint"]
        == b.manifest.dump()["model"]["fingerprint"]
        == fingerprint(eager.model)
    )
    assert a.manifest.dump()["layers"] == b.manifest.dump()["layers"]
    for name in a.layers:
        x, y = a.layer(name, hessian=True), b.layer(name, hessian=True)
        assert torch.equal(x.mean, y.mean) and torch.equal(x.m2, y.m2) and torch.equal(x.hessian, y.hessian)
    assert all(p.is_meta for _i, _p, block in iterate_blocks(lazy.model) for p in block.parameters())


def test_calibrate_never_reads_an_untied_head(
    tiny_llama_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head is never run by calibrate: `stade calibrate` leaves an untied one (1 GB of bf16 at 8B) on disk,
    and the statistics are still those of the model read whole."""
    import stade_cli.models.weights as weights

    read: list[str] = []
    real = weights.read_tensors

    def recording(file: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        read.extend(names or ["<all>"])
        return real(file, names)

    monkeypatch.setattr(weights, "read_tensors", recording)
    res = cli_calibrate(tiny_llama_dir, tmp_path / "stats", "--data", str(text_file), "--nsamples", "3", "--hessian")
    assert res.exit_code == 0, res.output
    assert "model.embed_tokens.weight" in read and "model.layers.1.mlp.up_proj.weight" in read
    assert "lm_head.weight" not in read and "<all>" not in read
    whole = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    assert not whole.model.config.tie_word_embeddings
    stats = Statistics.load(tmp_path / "stats")
    assert stats.manifest.model.fingerprint == fingerprint(whole.model)
    assert check_against_dense(whole.model, stats, hessian=True) == 14


def test_lazy_loading_falls_back_without_safetensors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A checkpoint in the old pickle format cannot be read a block at a time: it is loaded whole."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "bin-model"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder)
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), folder / "pytorch_model.bin")
    loaded = load_model(str(folder), dtype="float32", device="cpu", lazy=True)
    assert not loaded.lazy and loaded.fingerprint() == fingerprint(loaded.model)


def test_streamed_safetensors_file_reads_back(tmp_path: Path) -> None:
    """Hessians are written one at a time by our own writer: safetensors must read every tensor back exactly."""
    from safetensors.torch import load_file

    from stade_cli.base.tensorfiles import SafetensorsWriter

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.h": torch.randn(7, 7, generator=g),
        "a.m": torch.randn(5, generator=g, dtype=torch.float64),
        "c.bf": torch.randn(3, 4, generator=g).bfloat16(),
        "d.ids": torch.arange(6).reshape(2, 3),
        "e.scalar": torch.tensor(2.5),
    }
    # Room is kept for more tensors than come (as calibrate keeps room for one Hessian per layer).
    room = SafetensorsWriter.room_for(
        {n: (t.dtype, list(t.shape)) for n, t in {**tensors, "z": tensors["b.h"]}.items()}
    )
    writer = SafetensorsWriter(tmp_path / "t.safetensors", room)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    back = load_file(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # written in place: no side file
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert (tmp_path / "t.safetensors").stat().st_size == 8 + room + (-room % 8) + data

    # Killed after a commit (sync) and in the middle of the next tensor: a writer resumed from the committed state
    # cuts the file back there and goes on, and the file is the one written in one go, byte for byte.
    names = list(tensors)
    killed = SafetensorsWriter(tmp_path / "k.safetensors", room)
    for name in names[:2]:
        killed.add(name, tensors[name])
    state = json.loads(json.dumps(killed.sync()))  # as progress.json keeps it
    killed.add(names[2], tensors[names[2]])
    killed._file.truncate(killed._file.tell() - 3)  # the kill: part of the third tensor on disk
    killed.abort()
    resumed = SafetensorsWriter(tmp_path / "k.safetensors", room, resume=state)
    for name in names[2:]:
        resumed.add(name, tensors[name])
    resumed.close()
    assert (tmp_path / "k.safetensors").read_bytes() == (tmp_path / "t.safetensors").read_bytes()
    assert resumed.hashes == writer.hashes


@pytest.mark.slow
def test_smollm2_statistics_match_dense_forward(smollm2, tmp_path: Path) -> None:
    config = CalibrationConfig(data="sample-wiki", nsamples=8, seqlen=256, seed=0, hessian=True, batch_size=8)
    stats = calibrate(smollm2, config, tmp_path / "stats", CPU)
    assert stats.token_ids().shape == (8, 256)
    assert check_against_dense(smollm2.model, stats, hessian=True) == 30 * 7


# ----------------------------------------------------------------------------------------------- acceptance 2


def test_same_arguments_give_identical_statistics(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    common = dict(data=str(text_file), nsamples=4, seqlen=32, seed=3, hessian=True)
    a = run_calibrate(tiny_llama_dir, tmp_path / "a", **common)
    b = run_calibrate(tiny_llama_dir, tmp_path / "b", **common)
    assert a.manifest.dump()["files"] == b.manifest.dump()["files"]  # sizes and sha256 of stats, hessians, token ids
    assert a.fingerprint == b.fingerprint
    for name in a.layers:
        la, lb = a.layer(name, hessian=True), b.layer(name, hessian=True)
        assert torch.equal(la.mean, lb.mean) and torch.equal(la.m2, lb.m2) and torch.equal(la.hessian, lb.hessian)


def test_different_seed_gives_different_token_ids(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    a = run_calibrate(tiny_llama_dir, tmp_path / "a", data=str(text_file), nsamples=4, seqlen=32, seed=0)
    b = run_calibrate(tiny_llama_dir, tmp_path / "b", data=str(text_file), nsamples=4, seqlen=32, seed=1)
    assert not torch.equal(a.token_ids(), b.token_ids())
    assert a.manifest.dump()["data"]["token_ids_sha256"] != b.manifest.dump()["data"]["token_ids_sha256"]
    assert a.manifest.dump()["data"]["seed"] == 0 and b.manifest.dump()["data"]["seed"] == 1


def test_manifest_describes_the_artifact(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    stats = run_calibrate(tiny_llama_dir, tmp_path / "s", data=str(text_file), nsamples=3, seqlen=16, seed=2)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["kind"] == "stade-statistics" and m["schema"] == 1
    assert m["versions"] == recorded_versions()
    assert len(m["model"]["fingerprint"]) == 64 and m["model"]["architecture"] == "LlamaForCausalLM"
    assert m["dtype"] == "float32"
    assert m["data"]["nsamples"] == 3 and m["data"]["seqlen"] == 16 and m["data"]["seed"] == 2
    assert m["data"]["token_ids_sha256"] and m["data"]["source_sha256"]
    assert m["statistics"] == ["count", "mean", "m2"] and m["count"] == 48
    assert len(m["layers"]) == 14 and all(e["shape"] for e in m["layers"])
    assert set(m["files"]) == {"stats.safetensors", "tokens.safetensors"}
    assert stats.manifest.dump() == m
    with pytest.raises(StadeError, match="no Hessians"):
        stats.layer(m["layers"][0]["name"], hessian=True)


def test_truncated_artifact_is_refused(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    run_calibrate(tiny_llama_dir, tmp_path / "s", data=str(text_file), nsamples=2, seqlen=16)
    f = tmp_path / "s" / "stats.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(StadeError, match="corrupted or truncated"):
        Statistics.load(tmp_path / "s")


# ----------------------------------------------------------------------------------------------- CLI


def cli_calibrate(model: Path | str, out: Path, *extra: str):
    return invoke("calibrate", str(model), "--out", str(out), "--device", "cpu", *extra)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob("*.incomplete")), "no temporary folder may be left behind"


def test_cli_calibrate_then_stats_show(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    res = cli_calibrate(tiny_llama_dir, out, "--data", str(text_file), "--nsamples", "3", "--seqlen", "16", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["count"] == 48 and summary["layers"] == 14 and len(summary["blocks"]) == 2
    shown = invoke("stats", "show", str(out), "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == summary
    table = invoke("stats", "show", str(out))
    assert table.exit_code == 0, table.output
    assert "Layer inputs per block" in table.stdout and "LlamaForCausalLM" in table.stdout


def test_cli_stats_show_missing_folder(tmp_path: Path) -> None:
    res = invoke("stats", "show", str(tmp_path / "nope"))
    assert res.exit_code == 1
    assert "nope" in res.stderr


def test_cli_force_replaces_existing(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ("--data", str(text_file), "--nsamples", "2", "--seqlen", "16", "--force")
    res = cli_calibrate(tiny_llama_dir, out, *args)
    assert res.exit_code == 0, res.output
    assert not (out / "old.txt").exists()
    Statistics.load(out)


def _t5_dir(path: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "unknown-model",
        "missing-model-path",
        "not-a-model",
        "unsupported-architecture",
        "missing-data",
        "empty-data",
        "short-data",
        "unknown-data",
        "nsamples-zero",
        "seqlen-above-context",
        "existing-out",
        "cuda",
        "token-ids-int32",
        "token-ids-1d",
        "token-ids-wrong-name",
    ],
)
def test_cli_calibrate_bad_input(case: str, tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    out = tmp_path / "out"
    model: Path | str = tiny_llama_dir
    extra = ["--data", str(text_file), "--nsamples", "2", "--seqlen", "16"]
    if case == "unknown-model":
        model, named = "no-such-org/no-such-model", "no-such-org/no-such-model"
    elif case == "missing-model-path":
        model = named = str(tmp_path / "missing-model")
    elif case == "not-a-model":
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "readme.txt").write_text("hi")
        model, named = tmp_path / "plain", "plain"
    elif case == "unsupported-architecture":
        model, named = _t5_dir(tmp_path / "t5"), "T5"
    elif case == "missing-data":
        extra[1] = named = str(tmp_path / "missing.txt")
    elif case == "empty-data":
        (tmp_path / "empty.txt").write_text("\n\n  \n")
        extra[1] = named = str(tmp_path / "empty.txt")
    elif case == "short-data":
        (tmp_path / "short.txt").write_text("Too short.")
        extra[1], named = str(tmp_path / "short.txt"), "short.txt"
    elif case == "unknown-data":
        extra[1] = named = "no-such-corpus"
    elif case == "nsamples-zero":
        extra[3], named = "0", "--nsamples"
    elif case == "seqlen-above-context":
        extra[5], named = "4096", "4096"
    elif case == "existing-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        named = "out"
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra += ["--device", "cuda"]
        named = "cuda"
    else:
        ids = torch.arange(32).reshape(2, 16)
        if case == "token-ids-int32":
            tensors, named = {"input_ids": ids.int()}, "int32"
        elif case == "token-ids-1d":
            tensors, named = {"input_ids": ids.reshape(-1)}, "[32]"
        else:
            tensors, named = {"tokens": ids}, "input_ids"
        save_file(tensors, str(tmp_path / "ids.safetensors"))
        extra = ["--data", str(tmp_path / "ids.safetensors")]
    res = cli_calibrate(model, out, *extra)
    assert res.exit_code == 1, res.output
    message = " ".join(res.stderr.split())  # rich wraps long lines
    assert "Error:" in message and named in message, message
    assert "Traceback" not in res.output
    if case.startswith("token-ids"):
        assert "[n, seqlen]" in message, "the hint must show the expected shape (escape Rich markup)"
    if case == "existing-out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
        assert not list(tmp_path.glob("*.incomplete"))
    else:
        assert_nothing_written(out)


def test_token_id_file_is_taken_as_it_is(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    res = cli_calibrate(tiny_llama_dir, tmp_path / "s", "--data", str(tmp_path / "ids.safetensors"))
    assert res.exit_code == 0, res.output
    stats = Statistics.load(tmp_path / "s")
    assert torch.equal(stats.token_ids(), ids)
    assert stats.manifest.dump()["data"]["nsamples"] == 3 and stats.manifest.dump()["data"]["seqlen"] == 20


def test_interrupt_during_calibration_leaves_nothing(
    tiny_llama_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stade_cli.stats.collect as cal  # the one collector loop

    real, calls = cal.run_block, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # in the middle of the second block
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cal, "run_block", interrupted)
    out = tmp_path / "stats"
    res = cli_calibrate(tiny_llama_dir, out, "--data", str(text_file), "--nsamples", "4", "--seqlen", "16", "-b", "2")
    assert res.exit_code == 130
    assert "Interrupted" in res.stderr
    assert_nothing_written(out)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupt_while_writing_leaves_nothing_complete(
    tiny_llama_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type
) -> None:
    import stade_cli.stats.artifact as stats_mod

    def fail(*_args, **_kwargs):
        raise error("stop")

    monkeypatch.setattr(stats_mod, "write_json", fail)  # the manifest is the last file written
    out = tmp_path / "stats"
    loaded = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    with pytest.raises(error):
        calibrate(loaded, CalibrationConfig(data=str(text_file), nsamples=2, seqlen=16), out, CPU)
    assert_nothing_written(out)


def test_interrupted_force_keeps_the_old_artifact(
    tiny_llama_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stade_cli.stats.artifact as stats_mod

    out = tmp_path / "stats"
    old = run_calibrate(tiny_llama_dir, out, data=str(text_file), nsamples=2, seqlen=16, seed=0)

    def fail(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stats_mod, "write_json", fail)
    loaded = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        calibrate(loaded, CalibrationConfig(data=str(text_file), nsamples=2, seqlen=16, seed=5), out, CPU, force=True)
    assert Statistics.load(out).fingerprint == old.fingerprint
    assert not list(tmp_path.glob("*.incomplete"))
