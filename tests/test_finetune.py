"""`stade finetune`: the mask held exactly (full and LoRA, unstructured and 2:4), checked against the input
checkpoint's zeros read from its files; the chunked loss against whole-logit formulas; the LoRA merge; the loss
falling; resume equal to an uninterrupted run; torchrun's 2 ranks equal to 1 process; bad input in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, tiny_config, tiny_tokenizer

from stade_cli.base.artifacts import PruneRecord
from stade_cli.stages.finetune.lora import MaskedLoRA
from stade_cli.stages.finetune.losses import LossSpec, sequence_loss

from helpers import invoke, read_weights, said

ROOT = Path(__file__).resolve().parent.parent
TEXT = "\n\n".join(f"Story {i}. " + "The quick brown fox jumps over the lazy dog. " * 12 for i in range(30))
LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAST = ["--max-steps", "3", "--eval-every", "3", "--heldout-windows", "4", "--seqlen", "16", "-b", "2"]
FAST += ["--device", "cpu", "--lr", "1e-2"]


@dataclass
class World:
    root: Path
    model: Path
    text: Path
    pruned: dict[str, Path]  # by pattern


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("finetune")
    model = save_tiny_model("llama", root / "llama")
    text = root / "text.txt"
    text.write_text(TEXT)
    stats = root / "stats"
    res = invoke("calibrate", model, "--data", text, "--nsamples", 4, "--seqlen", 16, "--device", "cpu", "--out", stats)
    assert res.exit_code == 0, res.output
    pruned = {}
    for pattern in ("unstructured", "2:4"):
        out = root / f"pruned-{pattern.replace(':', 'of')}"
        res = invoke("prune", model, "--stats", stats, "--method", "wanda", "--pattern", pattern, "--sparsity",
                     0.5, "--out", out)  # fmt: skip
        assert res.exit_code == 0, res.output
        pruned[pattern] = out
    return World(root, model, text, pruned)


def pruned_layers(folder: Path) -> dict[str, torch.Tensor]:
    """The pruned layers' weights, read with safetensors alone."""
    return {k: v for k, v in read_weights(folder).items() if k.endswith(".weight") and k.split(".")[-2] in LAYERS}


def finetune(world: World, pattern: str, out: Path, *extra: object) -> PruneRecord:
    res = invoke("finetune", world.pruned[pattern], "--teacher", world.model, "--data", world.text, *FAST,
                 "--out", out, *extra)  # fmt: skip
    assert res.exit_code == 0, res.output
    return PruneRecord.load(json.loads((out / "stade.json").read_text()), "stade.json")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("mode", [[], ["--lora", "4"]], ids=["full", "lora"])
def test_the_mask_is_held_exactly(world: World, pattern: str, mode: list[str], tmp_path: Path) -> None:
    record = finetune(world, pattern, tmp_path / "tuned", *mode)
    before, after = pruned_layers(world.pruned[pattern]), pruned_layers(tmp_path / "tuned")
    assert sorted(before) == sorted(after) and len(before) == 14
    changed = 0
    for name, w in before.items():
        assert torch.equal(after[name] == 0, w == 0), name  # the same zeros, not one more or less
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        if pattern == "2:4":  # every group of 4 consecutive inputs holds exactly 2 zeros
            assert ((after[name] == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
        changed += int(not torch.equal(after[name], w))
    assert changed == len(before)  # every layer trained: the test would see a broken mask
    ft = record.finetune
    assert ft is not None and ft.mode == ("lora" if mode else "full") and ft.steps == 3
    assert (tmp_path / "tuned" / "finetune-curve.png").stat().st_size > 1000


def test_the_chunked_loss_is_the_whole_logits_loss() -> None:
    """KL from the teacher plus cross-entropy, chunked and checkpointed, against torch's own whole-logit losses,
    value and gradient."""
    torch.manual_seed(0)
    head_w = torch.randn(50, 8)
    hidden = torch.randn(2, 11, 8, requires_grad=True)
    windows = torch.randint(0, 50, (2, 11))
    teacher = torch.randn(2, 11, 50)
    spec = LossSpec(kd_weight=0.3, temperature=2.0, chunk=4)
    got = sequence_loss(lambda h: h @ head_w.t(), hidden, windows, spec, lambda a, b: teacher[:, a:b])
    (g_got,) = torch.autograd.grad(got, hidden)
    logits = (hidden @ head_w.t())[:, :-1].reshape(-1, 50)
    lm = torch.nn.functional.cross_entropy(logits, windows[:, 1:].reshape(-1))
    t = teacher[:, :-1].reshape(-1, 50)
    kd = torch.nn.functional.kl_div(
        torch.log_softmax(logits / 2, -1), torch.log_softmax(t / 2, -1), log_target=True, reduction="batchmean"
    )
    want = 0.3 * 4 * kd + 0.7 * lm
    (g_want,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def masked_layer(shape: tuple[int, int], rank: int, alpha: float, seed: int) -> tuple[torch.Tensor, MaskedLoRA]:
    """A pruned nn.Linear (half its weights zero) with a masked LoRA whose B is not zero, and its keep mask."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(shape[1], shape[0])
    keep = torch.rand(shape) > 0.5
    with torch.no_grad():
        base.weight.mul_(keep)
    layer = MaskedLoRA(base, keep, rank=rank, alpha=alpha)
    with torch.no_grad():
        layer.lora_b.normal_()
    return keep, layer


def test_the_lora_merge_keeps_the_pattern() -> None:
    keep, layer = masked_layer((8, 16), rank=3, alpha=6.0, seed=0)
    base = layer.base
    x = torch.randn(5, 16)
    before = layer(x)
    dense = base.weight + 2.0 * (layer.lora_b @ layer.lora_a) * keep  # W + (alpha/r) (B A) ⊙ M, written out
    merged = layer.merged()
    torch.testing.assert_close(merged.weight, dense)
    assert torch.equal(merged.weight == 0, ~keep)
    torch.testing.assert_close(merged(x), before)


def test_the_lora_layer_keeps_only_its_input_and_has_the_written_out_gradients() -> None:
    """The masked LoRA layer's forward and gradients are those of x (W + s (B A) ⊙ M)^T + b computed plainly by
    autograd, yet what it keeps for the backward pass is its input alone, not a full-size W + s (B A) ⊙ M."""
    keep, layer = masked_layer((12, 24), rank=4, alpha=2.0, seed=1)
    base = layer.base
    x = torch.randn(3, 5, 24, requires_grad=True)
    kept: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: kept.append(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        out = layer(x)
    own = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters(), *layer.buffers()]}
    assert kept and set(kept) <= own  # the input, and tensors the layer holds anyway: no W + s (B A) ⊙ M
    a, b = layer.lora_a.detach().clone().requires_grad_(), layer.lora_b.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    plain = torch.nn.functional.linear(x2, base.weight + 0.5 * (b @ a) * keep, base.bias)
    torch.testing.assert_close(out, plain)
    g = torch.randn_like(out)
    out.backward(g)
    plain.backward(g)
    for got, want in ((x.grad, x2.grad), (layer.lora_a.grad, a.grad), (layer.lora_b.grad, b.grad)):
        torch.testing.assert_close(got, want)


def test_the_loss_falls(world: World, tmp_path: Path) -> None:
    res = invoke("finetune", world.pruned["unstructured"], "--teacher", "none", "--data", world.text, *FAST,
                 "--max-steps", "8", "--out", tmp_path / "t", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["loss"] == "lm" and summary["steps"] == 8 and summary["train_seconds"] > 0
    assert "plan (finetune): peak host RAM" in said(res)  # the plan's line, as every stage prints it
    curve = [p["heldout_loss"] for p in summary["curve"]]
    assert curve[-1] < 0.8 * curve[0], curve
    res = invoke("eval", tmp_path / "t", "--ppl", world.text, "--tasks", "none", "--seqlen", 16, "--max-windows", 3,
                 "--device", "cpu", "--out", tmp_path / "r.json")  # fmt: skip
    assert res.exit_code == 0, res.output  # eval takes it as any pruned checkpoint, and keeps how it was made
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["method"] == "wanda" and results["pruning"]["finetune"]["steps"] == 8
    assert "fine-tuned" in (tmp_path / "t" / "README.md").read_text()


def test_resume_equals_an_uninterrupted_run(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after step 3 (its state committed at step 2), then resumed: the same weights, bit for bit, as a run
    never interrupted (CPU, deterministic)."""
    import stade_cli.driver.training as training

    steps = ["--max-steps", "5", "--save-every", "2", "--eval-every", "2"]
    finetune(world, "unstructured", tmp_path / "whole", *steps)
    real = training.one_step

    def killed(loop: training.Loop, step: int) -> float:
        if step == 3:
            raise KeyboardInterrupt
        return real(loop, step)

    monkeypatch.setattr(training, "one_step", killed)
    args = ["finetune", world.pruned["unstructured"], "--teacher", world.model, "--data", world.text, *FAST, *steps]
    res = invoke(*args, "--out", tmp_path / "resumed")
    assert res.exit_code == 130 and "--resume" in said(res)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.incomplete" / "train-state.pt").is_file()
    monkeypatch.setattr(training, "one_step", real)
    res = invoke(*args, "--out", tmp_path / "resumed", "--resume")
    assert res.exit_code == 0, res.output
    whole, resumed = read_weights(tmp_path / "whole"), read_weights(tmp_path / "resumed")
    assert sorted(whole) == sorted(resumed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not (tmp_path / "resumed" / "train-state.pt").exists()
    curve = lambda p: json.loads((p / "stade.json").read_text())["finetune"]["curve"]  # noqa: E731
    assert curve(tmp_path / "whole") == curve(tmp_path / "resumed")


def test_early_stopping_keeps_the_best_weights(world: World, tmp_path: Path) -> None:
    """A learning rate too large once warmed up: the held-out loss falls, then rises, and --patience stops the run.
    What is written is the best step's weights: those of a run stopped there by --max-steps (the warmup's learning
    rates do not depend on the number of steps)."""
    steep = ["--teacher", "none", "--lr", "0.3", "--warmup", "4", "--eval-every", "1", "--max-steps", "8"]
    record = finetune(world, "unstructured", tmp_path / "early", *steep, "--patience", "3").finetune
    assert record is not None and record.stopped_early
    losses = [p.heldout_loss for p in record.curve]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert 0 < best < record.steps and losses[-1] > losses[best]  # it did rise after the best
    assert record.best_step == record.kept_step == best and record.steps == best + 3
    assert record.heldout_after == record.curve[best].heldout_ppl
    finetune(world, "unstructured", tmp_path / "stopped", *steep, "--max-steps", str(best))
    early, stopped = read_weights(tmp_path / "early"), read_weights(tmp_path / "stopped")
    assert sorted(early) == sorted(stopped)
    for k in early:
        torch.testing.assert_close(early[k], stopped[k], rtol=1e-5, atol=1e-6)


def assert_same_training(got: Path, want: Path, start: Path) -> None:
    """The same weights within float rounding. Adam divides by each gradient's own scale: where a gradient is ~0 (an
    unseen token's row of lm_head), rounding in another order of sums is a visible part of a step. Within 1% of the
    update, at almost every entry within 1e-5."""
    a, b, s0 = read_weights(got), read_weights(want), read_weights(start)
    assert sorted(a) == sorted(b)
    for k in b:
        step, diff = (b[k] - s0[k]).abs().max().item(), (a[k] - b[k]).abs()
        assert diff.max().item() < 0.01 * step, (k, diff.max().item(), step)
        assert (diff > 1e-5).float().mean().item() < 1e-3, k


def test_grad_accum_equals_the_larger_batch(world: World, tmp_path: Path) -> None:
    """2 micro-batches of 2 windows are the step of 1 batch of 4: the same windows, the mean of the same losses."""
    finetune(world, "2:4", tmp_path / "accum", "-b", "2", "--grad-accum", "2")
    finetune(world, "2:4", tmp_path / "batch", "-b", "4", "--grad-accum", "1")
    assert_same_training(tmp_path / "accum", tmp_path / "batch", world.pruned["2:4"])


def test_gradient_checkpointing_changes_nothing_but_memory(world: World, tmp_path: Path) -> None:
    finetune(world, "unstructured", tmp_path / "ckpt", "--gradient-checkpointing")
    finetune(world, "unstructured", tmp_path / "plain")
    assert_same_training(tmp_path / "ckpt", tmp_path / "plain", world.pruned["unstructured"])


def test_the_mix_loss_is_the_weighted_sum(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step's --loss mix, from the run itself, against KD and LM computed from whole logits of the two
    models loaded apart: w KL(softmax(t/T) || softmax(z/T)) T^2 + (1 - w) CE. The teacher is the dense model with
    its head scaled, so that the KD term weighs (a random model's logits are near uniform)."""
    from transformers import AutoModelForCausalLM

    import stade_cli.driver.training as training

    teacher = AutoModelForCausalLM.from_pretrained(world.model, dtype=torch.float32)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")

    seen: list[tuple[torch.Tensor, float]] = []
    real = training.one_step

    def spy(loop: training.Loop, step: int) -> float:
        windows = training.step_windows(loop, step, 0)
        value = real(loop, step)
        seen.append((windows, value))
        return value

    monkeypatch.setattr(training, "one_step", spy)
    mix = ["--loss", "mix", "--kd-weight", "0.3", "--temperature", "2", "--max-steps", "1"]
    res = invoke("finetune", world.pruned["unstructured"], "--teacher", tmp_path / "teacher", "--data", world.text,
                 *FAST, *mix, "--out", tmp_path / "mix")  # fmt: skip
    assert res.exit_code == 0, res.output
    windows, value = seen[0]
    with torch.no_grad():
        student = AutoModelForCausalLM.from_pretrained(world.pruned["unstructured"], dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32)
        z, t = (m(input_ids=windows).logits[:, :-1].reshape(-1, 260) for m in (student, teacher))
    lm = torch.nn.functional.cross_entropy(z, windows[:, 1:].reshape(-1))
    kd = torch.nn.functional.kl_div(
        torch.log_softmax(z / 2, -1), torch.log_softmax(t / 2, -1), log_target=True, reduction="batchmean"
    )
    assert value == pytest.approx(float(0.3 * 4 * kd + 0.7 * lm), rel=1e-5)
    assert float(kd) > 0.1 * float(lm)  # the KD term weighs in the sum


@pytest.mark.slow  # a fresh interpreter
def test_sigterm_leaves_nothing_complete_and_resume_continues(world: World, tmp_path: Path) -> None:
    """SIGTERM (a scheduler's, `timeout`'s) during step 3: exit 143, the committed state kept in OUT.incomplete and
    said so, nothing that looks complete; --resume then ends with an uninterrupted run's weights, bit for bit."""
    import signal
    import time

    from test_survey import CLI, hear_ctrl_c

    steps = ["--max-steps", "5", "--save-every", "1", "--eval-every", "2"]
    args = ["finetune", world.pruned["unstructured"], "--teacher", world.model, "--data", world.text, *FAST, *steps]
    out = tmp_path / "tuned"
    slow = "import time, stade_cli.driver.training as t; real = t.one_step\n"
    slow += "t.one_step = lambda loop, s: (time.sleep(60) if s == 2 else None, real(loop, s))[1]\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "STADE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-c", slow + CLI, *[str(a) for a in args], "--out", str(out)], env=env,
                            stderr=subprocess.PIPE, text=True, preexec_fn=hear_ctrl_c)  # fmt: skip
    state = out.with_name("tuned.incomplete") / "train-state.pt"
    deadline = time.monotonic() + 120
    while not (state.exists() and torch.load(state, weights_only=False)["progress"]["step"] == 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Terminated (SIGTERM)" in stderr and "--resume" in " ".join(stderr.split())
    assert not out.exists() and {p.name for p in state.parent.iterdir()} <= {"train-state.pt", ".stade-run"}
    res = invoke(*args, "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    finetune(world, "unstructured", tmp_path / "whole", *steps)
    whole, resumed = read_weights(tmp_path / "whole"), read_weights(out)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(world: World, tmp_path: Path) -> None:
    """2 gloo ranks of 2 windows each give the weights of 1 process of 4 windows, within float rounding."""
    args = ["finetune", str(world.pruned["2:4"]), "--teacher", str(world.model), "--data", str(world.text)]
    args += [str(a) for a in FAST if a != "-b" and a != "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29641"]
    two = subprocess.run([*cmd, "-m", "stade_cli", *args, "-b", "2", "--out", str(tmp_path / "two"), "--json"],
                         env=env, cwd=tmp_path, capture_output=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    assert json.loads(two.stdout)["world_size"] == 2  # one report, from rank 0
    res = invoke(*args, "-b", "4", "--out", tmp_path / "one")
    assert res.exit_code == 0, res.output
    one, got, start = (read_weights(p) for p in (tmp_path / "one", tmp_path / "two", world.pruned["2:4"]))
    for k in one:
        # Adam divides by the gradient's own scale: where a gradient is ~0 (an unseen token's row of lm_head), float
        # rounding in the ranks' sum becomes a visible part of a step. Within 1% of the update, at almost every entry.
        step, diff = (one[k] - start[k]).abs().max().item(), (got[k] - one[k]).abs()
        assert step > 1e-3 and diff.max().item() < 0.01 * step, k
        assert (diff > 1e-5).float().mean().item() < 1e-3, k
        assert torch.equal(got[k] == 0, one[k] == 0) if k in pruned_layers(world.pruned["2:4"]) else True


def other_vocabulary(root: Path) -> Path:
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.vocab_size = 300
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "wide")
    tiny_tokenizer().save_pretrained(root / "wide")
    return root / "wide"


@pytest.mark.parametrize(
    ("case", "said_"),
    [
        ("dense", "has no stade.json: it is not a checkpoint `stade prune` wrote, so it has no mask to keep"),
        ("vocabulary", "has another vocabulary than"),
        ("empty", "holds no text"),
        ("budget", "--tokens 10 is less than one optimizer step, which takes 32 tokens"),
    ],
)
def test_bad_input_is_one_clear_line(world: World, tmp_path: Path, case: str, said_: str) -> None:
    pruned, teacher, data, extra = world.pruned["unstructured"], world.model, world.text, []
    if case == "dense":
        pruned = world.model
    elif case == "vocabulary":
        teacher = other_vocabulary(tmp_path)
    elif case == "empty":
        data = tmp_path / "empty.txt"
        data.write_text("\n\n  \n")
    else:
        extra = ["--tokens", "10"]
    res = invoke("finetune", pruned, "--teacher", teacher, "--data", data, *FAST, *extra, "--out", tmp_path / "out")
    assert res.exit_code == 1, res.output
    assert said_ in said(res) and said(res).count("Error:") == 1 and "Traceback" not in res.output
    assert not list(tmp_path.glob("out*"))  # nothing left behind
