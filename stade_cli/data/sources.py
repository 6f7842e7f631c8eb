"""Text sources (hub, local files, built-in offline samples, token-id files) and window sampling."""

from __future__ import annotations

import bz2
import difflib
import hashlib
import importlib.metadata
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stade_cli.base.errors import StadeError, at_least, library_errors
from stade_cli.base.files import made_once, sha256_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HUB_SOURCES = ("c4", "wikitext2")
BUILTIN_SOURCES = ("sample-wiki", "sample-news")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet", ".safetensors")
GENSIM_DATA = "gensim/test/test_data"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
ALL_SOURCES_HINT = "use c4, wikitext2, sample-wiki, sample-news, or a .txt/.jsonl/.parquet/.safetensors file"
DEMO_EXTRA = "pip install 'stade[demo]'"


def offline_hint(split: str) -> str:
    """The offline way, for calibration text (train) or held-out text (test/validation)."""
    sample = "sample-wiki" if split == "train" else "sample-news"
    return f"offline? use a local .txt/.jsonl/.parquet/.safetensors file, or {sample} ({DEMO_EXTRA})"


@dataclass
class Documents:
    """A source's documents, plus how to join them into one evaluation text."""

    name: str
    texts: list[str]
    joiner: str = "\n\n"
    sha256: str = ""


@dataclass
class TokenWindows:
    """Calibration windows: input_ids (n, seqlen) int64, with where they came from."""

    input_ids: torch.Tensor
    source: str
    notes: list[str] = field(default_factory=list)
    source_sha256: str = ""
    drawn: list[int] | None = None  # per window, the document it was cut from (or, `joined`, its slot)
    joined: bool = False  # cut from the documents joined into one text, slot i its tokens [i*seqlen, (i+1)*seqlen)

    @property
    def sha256(self) -> str:
        return ids_sha256(self.input_ids)


def ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- sources


def _gensim_file(name: str, source: str = "sample-wiki") -> Path:
    try:
        dist = importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError:
        raise StadeError(
            f"{source} is built from the gensim wheel's test data, and gensim is not installed.",
            f"{DEMO_EXTRA}, or give a local .txt/.jsonl/.parquet file",
        ) from None
    return Path(str(dist.locate_file(f"{GENSIM_DATA}/{name}")))


def _clean_article(markup: str) -> str:
    """Plain prose of one article: markup, bold/italic quotes, bullets, galleries and short lines removed."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = re.sub(r"'{2,}", "", filter_wiki(markup))
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if len(line.split()) >= 4 and not line.startswith(("*", "File:", "Image:")))


def _wiki_articles() -> list[str]:
    """Articles of gensim's Wikipedia extract, cleaned; stubs and redirects (< 500 characters) dropped.

    This is the document list the reference token ids were drawn from (tests check it, id for id).
    """
    path = _gensim_file(WIKI_FILE, "sample-wiki")  # before gensim is imported: a missing wheel is one clear line
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(path, "rb") as f:
        texts = [_clean_article(markup) for _title, markup, _pageid in extract_pages(f)]
    return [t for t in texts if len(t) >= 500]


def _news_lines() -> list[str]:
    with open(_gensim_file(NEWS_FILE, "sample-news"), encoding="utf8") as f:
        return [line.strip() for line in f]


def builtin_documents(name: str) -> Documents:
    """The offline samples, prepared once into $STADE_HOME/data as JSON lines."""
    from stade_cli.base.home import stade_home

    cache = stade_home() / "data" / name
    if not (cache / "docs.jsonl").exists():
        with made_once(cache, "docs.jsonl") as tmp:
            if tmp is not None:
                texts = _wiki_articles() if name == "sample-wiki" else _news_lines()
                with open(tmp / "docs.jsonl", "w", encoding="utf8") as f:
                    for t in texts:
                        f.write(json.dumps({"text": t}) + "\n")
    with open(cache / "docs.jsonl", encoding="utf8") as f:
        texts = [json.loads(line)["text"] for line in f]
    # The news sample is one text, a line per story: each story ends with a newline.
    if name == "sample-news":
        return Documents(name, [t + "\n" for t in texts], joiner="")
    return Documents(name, texts)


def hub_documents(name: str, split: str, cache_dir: str | None = None) -> Documents:
    """C4 and WikiText-2 exactly as the published code loads them."""
    with library_errors(
        f"Could not load {name!r} ({split}) from the Hugging Face hub",
        offline_hint(split),
    ):
        from datasets import load_dataset

        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split, cache_dir=cache_dir)
            return Documents(name, list(ds["text"]), joiner="\n\n")
        files = {"train": C4_TRAIN, "validation": C4_VALIDATION}
        ds = load_dataset("allenai/c4", data_files={split: files[split]}, split=split, cache_dir=cache_dir)
        texts = list(ds["text"])
        if split == "validation":
            texts = texts[:1100]  # as published: the first 1100 validation documents, joined by spaces
            return Documents(name, texts, joiner=" ")
        return Documents(name, texts)


def local_documents(path: Path) -> Documents:
    """A local .txt (paragraphs split on blank lines), .jsonl (a `text` field) or .parquet (a `text` column)."""
    if not path.exists():
        raise StadeError(f"Data file {str(path)!r} does not exist.", ALL_SOURCES_HINT)
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            raw = path.read_text(encoding="utf8")
            texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
            docs = Documents(str(path), texts, joiner="\n\n")
        elif suffix == ".jsonl":
            texts = []
            for i, line in enumerate(path.read_text(encoding="utf8").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise StadeError(f"{path}:{i} has no string field 'text'.", 'each line must be {"text": ...}')
                texts.append(row["text"])
            docs = Documents(str(path), texts)
        elif suffix == ".parquet":
            docs = Documents(str(path), _parquet_texts(path))
        else:
            raise StadeError(f"Unsupported data file type {suffix!r} for {str(path)!r}.", ALL_SOURCES_HINT)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StadeError(f"Could not read {str(path)!r}: {exc}", "is it UTF-8 text of the right format?") from None
    if not any(t.strip() for t in docs.texts):
        raise StadeError(f"Data file {str(path)!r} holds no text.", "give a file with documents in it")
    docs.sha256 = sha256_file(path)
    return docs


def _parquet_texts(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise StadeError(
            f"Parquet file {str(path)!r} is not readable: {' '.join(str(exc).split())}",
            "is it a complete .parquet file?",
        ) from None
    if "text" not in table.column_names:
        raise StadeError(
            f"Parquet file {str(path)!r} has no 'text' column (it has: {', '.join(table.column_names)}).",
            "rename the column holding the documents to 'text'",
        )
    kind = table.schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise StadeError(
            f"Parquet file {str(path)!r}: the 'text' column holds {kind}, not strings.",
            "the 'text' column must hold the documents as strings",
        )
    return [t for t in table.column("text").to_pylist() if t]


def check_token_ids(ids: torch.Tensor, vocab_size: int, source: str) -> None:
    """Every id must index the model's embedding: an id outside [0, vocab) would crash the forward pass."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise StadeError(
            f"{source!r} holds token id {bad}, outside this model's vocabulary "
            f"of {vocab_size} (ids 0..{vocab_size - 1}).",
            "were the ids made with this model's tokenizer?",
        )


def is_token_file(source: str) -> bool:
    return source.lower().endswith(".safetensors")


def load_token_file(path: Path, rank_form: str) -> torch.Tensor:
    """Pre-tokenized ids: `input_ids`, int64, of the given form ('[n, seqlen]' or '[1, N]')."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise StadeError(f"Token-id file {str(path)!r} does not exist.")
    expected = f"a safetensors file with one tensor 'input_ids', int64, shape {rank_form}"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StadeError(f"{str(path)!r} is not a readable safetensors file: {exc}", f"expected {expected}") from None
    ids = tensors.get("input_ids")
    if ids is None:
        raise StadeError(f"{str(path)!r} has no tensor 'input_ids' (it has {sorted(tensors)}).", f"expected {expected}")
    if ids.dtype != torch.int64 or ids.dim() != 2 or (rank_form == "[1, N]" and ids.shape[0] != 1):
        raise StadeError(
            f"{str(path)!r}: input_ids is {str(ids.dtype).removeprefix('torch.')} {list(ids.shape)}.",
            f"expected {expected}",
        )
    if ids.numel() == 0:
        raise StadeError(f"{str(path)!r}: input_ids is empty.", f"expected {expected}")
    return ids


def documents(source: str, split: str = "train", cache_dir: str | None = None) -> Documents:
    """Resolve a --data / --ppl source name to its documents."""
    if source in HUB_SOURCES:
        return hub_documents(source, split, cache_dir)
    if source in BUILTIN_SOURCES:
        return builtin_documents(source)
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES[:3]:
        return local_documents(path)
    close = difflib.get_close_matches(source, [*HUB_SOURCES, *BUILTIN_SOURCES], n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? Or {ALL_SOURCES_HINT}" if close else ALL_SOURCES_HINT
    raise StadeError(f"Unknown data source {source!r}.", hint)


# ----------------------------------------------------------------------------------------------- sampling


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def sample_windows(
    docs: Documents, tokenizer: PreTrainedTokenizerBase, nsamples: int, seqlen: int, seed: int
) -> TokenWindows:
    """The published sampler: draw a random document longer than seqlen, take a random window of it.

    Where no document is long enough, the documents are joined and cut into windows instead
    (said in the notes). Python's `random` drives the draws so that hub data gives the published ids.
    """
    at_least("--nsamples", nsamples, 1)
    at_least("--seqlen", seqlen, 2)
    texts = [t for t in docs.texts if t.strip()]
    if not texts:
        raise StadeError(f"Data source {docs.name!r} holds no text.")
    rng = random.Random(seed)
    lengths: dict[int, int] = {}
    if len(texts) <= 50_000:  # small sources: know up front whether any document is long enough
        enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
        lengths = {i: len(e) for i, e in enumerate(enc)}
        total = sum(lengths.values())
        if total < nsamples * seqlen:
            raise StadeError(
                f"Data source {docs.name!r} has {total} tokens; "
                f"{nsamples} x {seqlen} = {nsamples * seqlen} are needed.",
                "give more text, or lower --nsamples / --seqlen",
            )
        if max(lengths.values()) <= seqlen:
            return _concatenated_windows(docs, texts, tokenizer, nsamples, seqlen, rng)
    rows, drawn = [], []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(texts) - 1)
            if lengths and lengths[i] <= seqlen:
                continue
            ids = _tokenize(tokenizer, texts[i])
            if len(ids) > seqlen:
                break
        start = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[start : start + seqlen])
        drawn.append(i)
    return TokenWindows(torch.tensor(rows, dtype=torch.int64), docs.name, source_sha256=docs.sha256, drawn=drawn)


def _concatenated_windows(
    docs: Documents,
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    nsamples: int,
    seqlen: int,
    rng: random.Random,
) -> TokenWindows:
    ids = _tokenize(tokenizer, docs.joiner.join(texts) if docs.joiner else "".join(texts))
    slots = len(ids) // seqlen
    if slots < nsamples:
        raise StadeError(
            f"Data source {docs.name!r} gives {slots} windows of {seqlen} tokens; {nsamples} are needed.",
            "give more text, or lower --nsamples / --seqlen",
        )
    picks = rng.sample(range(slots), nsamples)
    rows = [ids[p * seqlen : (p + 1) * seqlen] for p in picks]
    note = (
        f"no document is longer than {seqlen} tokens: documents were joined and {nsamples} of the "
        f"{slots} non-overlapping windows drawn"
    )
    return TokenWindows(torch.tensor(rows, dtype=torch.int64), docs.name, [note], docs.sha256, picks, joined=True)


def calibration_windows(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    nsamples: int | None,
    seqlen: int | None,
    seed: int,
    cache_dir: str | None = None,
    docs: Documents | None = None,
) -> TokenWindows:
    """Calibration windows from any source; a token-id file is taken as it is (and checked).

    `docs`: the source's documents, where they were loaded already (see calibrate.load_data).
    """
    if is_token_file(source):
        path = Path(source).expanduser()
        ids = load_token_file(path, "[n, seqlen]")
        n, length = ids.shape
        if length < 2:
            raise StadeError(
                f"{source!r} holds windows of {length} token; a window needs at least 2 (--seqlen must be at least 2).",
                "give windows of 2 tokens or more",
            )
        if nsamples is not None and nsamples != n:
            raise StadeError(
                f"--nsamples {nsamples} disagrees with {source!r}, which holds {n} windows.",
                "omit --nsamples or make it match",
            )
        if seqlen is not None and seqlen != length:
            raise StadeError(
                f"--seqlen {seqlen} disagrees with {source!r}, whose windows are {length} tokens.",
                "omit --seqlen or make it match",
            )
        return TokenWindows(ids, str(path), ["pre-tokenized windows, taken as they are"], sha256_file(path))
    if nsamples is None or seqlen is None:
        raise StadeError("--nsamples and --seqlen are needed for a text source.")
    docs = docs if docs is not None else documents(source, "train", cache_dir)
    return sample_windows(docs, tokenizer, nsamples, seqlen, seed)


def eval_ids(source: str, tokenizer: PreTrainedTokenizerBase, cache_dir: str | None = None) -> tuple[torch.Tensor, str]:
    """One evaluation text as ids [1, N], tokenized once as published, with a hash of its origin."""
    if is_token_file(source):
        path = Path(source).expanduser()
        return load_token_file(path, "[1, N]"), sha256_file(path)
    docs = documents(source, "validation" if source == "c4" else "test", cache_dir)
    text = docs.joiner.join(docs.texts)
    add_special = source not in BUILTIN_SOURCES  # the built-in held-out text is the reference's: no BOS
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    tensor = torch.tensor([ids], dtype=torch.int64)
    return tensor, ids_sha256(tensor)
