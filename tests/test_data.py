"""Text sources, window sampling and token-id files; the built-in samples reproduce the reference ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

from stade_cli.base.errors import StadeError
from stade_cli.data.sources import (
    Documents,
    calibration_windows,
    documents,
    eval_ids,
    ids_sha256,
    load_token_file,
    local_documents,
    sample_windows,
)

LONG = "A long enough document about pruning language models, with some words in it. " * 8


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from stade_cli.models.loading import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def test_sampling_is_seeded(tok) -> None:
    docs = Documents("d", [f"{i} {LONG}" for i in range(5)])
    a = sample_windows(docs, tok, 4, 32, seed=0)
    b = sample_windows(docs, tok, 4, 32, seed=0)
    c = sample_windows(docs, tok, 4, 32, seed=1)
    assert a.input_ids.shape == (4, 32) and a.input_ids.dtype == torch.int64
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.sha256 == ids_sha256(a.input_ids) and not a.notes


def test_short_documents_are_joined(tok) -> None:
    docs = Documents("d", ["short one, " * 3] * 40)
    w = sample_windows(docs, tok, 3, 64, seed=0)  # every document is 33 tokens
    assert w.input_ids.shape == (3, 64)
    assert w.notes and "joined" in w.notes[0]


@pytest.mark.parametrize(("nsamples", "seqlen", "match"), [(0, 16, "--nsamples"), (2, 1, "--seqlen"), (50, 64, "50")])
def test_sampling_errors(tok, nsamples: int, seqlen: int, match: str) -> None:
    with pytest.raises(StadeError, match=match):
        sample_windows(Documents("d", [LONG]), tok, nsamples, seqlen, 0)


def test_local_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first para\n\nsecond para\n\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert local_documents(tmp_path / "a.txt").texts == ["first para", "second para"]
    docs = documents(str(tmp_path / "b.jsonl"))
    assert docs.texts == ["one", "two"] and len(docs.sha256) == 64


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "", "holds no text"),
        ("bad.jsonl", '{"title": "x"}\n', "no string field 'text'"),
        ("broken.jsonl", "{not json\n", "Could not read"),
        ("data.csv", "a,b\n", "Unknown data source"),
    ],
)
def test_local_errors(tmp_path: Path, name: str, content: str | None, match: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(StadeError, match=match):
        documents(str(tmp_path / name))


def test_token_files(tmp_path: Path, tok) -> None:
    from safetensors.torch import save_file

    ids = torch.arange(40).reshape(2, 20)
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    w = calibration_windows(str(tmp_path / "ids.safetensors"), tok, None, None, 0)
    assert torch.equal(w.input_ids, ids) and len(w.source_sha256) == 64
    with pytest.raises(StadeError, match="--nsamples 3 disagrees"):
        calibration_windows(str(tmp_path / "ids.safetensors"), tok, 3, None, 0)
    with pytest.raises(StadeError, match="--seqlen 8 disagrees"):
        calibration_windows(str(tmp_path / "ids.safetensors"), tok, None, 8, 0)
    with pytest.raises(StadeError, match=r"expected .*\[1, N\]"):
        load_token_file(tmp_path / "ids.safetensors", "[1, N]")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(StadeError, match="not a readable safetensors"):
        load_token_file(tmp_path / "junk.safetensors", "[n, seqlen]")
    save_file({"input_ids": torch.zeros(2, 0, dtype=torch.int64)}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(StadeError, match="empty"):
        load_token_file(tmp_path / "empty.safetensors", "[n, seqlen]")


def test_builtin_news_is_one_text(tok) -> None:
    docs = documents("sample-news")
    assert len(docs.texts) > 100 and docs.joiner == ""
    ids, sha = eval_ids("sample-news", tok)
    assert ids.shape[0] == 1 and sha == ids_sha256(ids)


@pytest.mark.slow
def test_sample_wiki_reproduces_reference_calibration_ids(smollm2_tokenizer, reference_dir: Path) -> None:
    from safetensors.torch import load_file

    expected = load_file(str(reference_dir / "calibration_ids.safetensors"))["input_ids"]
    got = calibration_windows("sample-wiki", smollm2_tokenizer, 32, 512, 0)
    assert got.input_ids.shape == expected.shape == (32, 512)
    assert torch.equal(got.input_ids, expected)
    assert got.sha256.startswith("32ff3f88") and got.sha256.endswith("31c91c1d")


@pytest.mark.slow
def test_sample_news_reproduces_reference_heldout_ids(smollm2_tokenizer, reference_dir: Path) -> None:
    from safetensors.torch import load_file

    expected = load_file(str(reference_dir / "heldout_ids.safetensors"))["input_ids"]
    got, sha = eval_ids("sample-news", smollm2_tokenizer)
    assert got.shape == expected.shape == (1, 75382)
    assert torch.equal(got, expected)
    assert sha.startswith("4ccbe86e") and sha.endswith("d45ef2")


def test_eval_token_file_must_be_one_row(tmp_path: Path) -> None:
    """`eval --ppl FILE.safetensors` takes one pre-tokenized text [1, N]; windows [n, seqlen] are refused."""
    from safetensors.torch import save_file

    from stade_cli.base.errors import StadeError
    from stade_cli.data.sources import eval_ids

    good, bad = tmp_path / "text.safetensors", tmp_path / "windows.safetensors"
    save_file({"input_ids": torch.arange(100, dtype=torch.int64)[None]}, str(good))
    save_file({"input_ids": torch.zeros(4, 25, dtype=torch.int64)}, str(bad))
    ids, sha = eval_ids(str(good), tokenizer=None)
    assert ids.shape == (1, 100) and len(sha) == 64
    with pytest.raises(StadeError, match=r"shape \[1, N\]"):
        eval_ids(str(bad), tokenizer=None)
