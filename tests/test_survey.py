"""The hostile survey's defects that are not one refused command (those are rows of test_bad_input.CASES):
each test names its item and failed before the fix."""

from __future__ import annotations

import json
import os
import shlex
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from test_bad_input import CALIBRATE, World, stade, world  # noqa: F401 (world: the shared fixture)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_artifacts_honour_the_umask(world: World, tmp_path: Path) -> None:  # noqa: F811
    """15: safetensors writes its files 0600, so a colleague could not read shared statistics or checkpoints."""
    fill = {"model": world.model, "text": world.text, "stats": world.stats}
    with umask(0o002):  # group-writable: neither safetensors' 0600 nor the usual 0644
        res = stade([*shlex.split(CALIBRATE.format(**fill)), "--hessian", "--out", str(tmp_path / "s")])
        assert res.exit_code == 0, res.output
        prune = f"prune {world.model} --stats {tmp_path / 's'} --method wanda,sparsegpt --sparsity 0.5 --device cpu"
        res = stade([*shlex.split(prune), "--out", str(tmp_path / "p")])
        assert res.exit_code == 0, res.output
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"stats.safetensors", "tokens.safetensors", "model.safetensors"}
    modes = {str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert set(modes.values()) == {"0o664"}, modes


def test_streaming_keeps_the_generation_config(world: World, tmp_path: Path) -> None:  # noqa: F811
    """16: the streaming prune wrote a generation config derived from config.json, dropping pad_token_id."""
    from transformers import GenerationConfig

    model = tmp_path / "m"
    model.mkdir()
    for f in world.model.iterdir():
        (model / f.name).symlink_to(f)
    (model / "generation_config.json").unlink()
    own = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=True, temperature=0.6, top_p=0.9)
    own.save_pretrained(model)
    prune = f"prune {model} --stats {world.stats} --method wanda --sparsity 0.5 --device cpu --out {tmp_path / 'p'}"
    res = stade(shlex.split(prune))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "stade.json").read_text())["route"] == "streaming"
    written = json.loads((tmp_path / "p" / "generation_config.json").read_text())
    saved = json.loads((model / "generation_config.json").read_text())
    assert written == saved


def test_results_files_are_strict_json(world: World, tmp_path: Path) -> None:  # noqa: F811
    """3: a diverged model's perplexity was written as a bare `Infinity`, which strict JSON readers refuse."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # mean NLL past 709: exp overflows (test_bad_input's overflow case)
    model.save_pretrained(tmp_path / "m")
    for f in world.model.glob("tokenizer*"):
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "r.json"
    args = f"--ppl {world.text} --tasks none --seqlen 64 --max-windows 2 --device cpu --out {out}"
    res = stade(["eval", str(tmp_path / "m"), *shlex.split(args)])
    assert res.exit_code == 0, res.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    doc = json.loads(out.read_text(), parse_constant=refuse)
    assert doc["perplexity"][str(world.text)]["ppl"] == "inf"
    res = stade(["compare", str(out), "--json"])  # and it reads back as the number
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["rows"]
    assert list(row["values"].values()) == ["inf"]
