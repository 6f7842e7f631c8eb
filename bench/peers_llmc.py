"""llm-compressor's side of bench/peers.py: one `oneshot` prune, run inside llm-compressor's own venv.

    bench/work/peers/venv/bin/python bench/peers_llmc.py --model DIR --ids IDS --method sparsegpt --pattern 2:4 \
        --out DIR --threads 2 --timings FILE
    bench/work/peers/venv/bin/python bench/peers_llmc.py --versions

Only llm-compressor's public API is called: `oneshot` with a SparseGPTModifier or WandaPruningModifier recipe, the
sequential pipeline over the decoder layers, and the calibration windows passed as an already-tokenized
`datasets.Dataset`. The pruned model is saved dense (save_compressed=False), so plain transformers loads it.
Phase times (load, oneshot, save) go to --timings as JSON. bench/peers.py, in stade's venv, imports from here
`ensure_venv` (which makes this venv) and DIFFERENCES: this module imports only the standard library at load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LLMC, TORCH = "llmcompressor==0.14.0.1", "torch==2.13.0"  # this torch spec takes the CPU wheel on this machine's disk
# Where llm-compressor 0.14.0.1's SparseGPT and Wanda differ from stade's by design (paths under its package, and
# under stade_cli/), read from the installed source; they explain where the two tools' masks part.
DIFFERENCES = [
    "Unstructured mask: LLMC prunes `tmp <= sort(tmp)[int(numel * s)]`, i.e. int(numel * s) + 1 weights (more on "
    "ties) of each 128-column block (modifiers/pruning/sparsegpt/sgpt_sparsify.py:164-165); stade exactly "
    "int(numel * s) (stages/solvers/sparsegpt.py:105). Each layer's sparsity is a hair above 50% in LLMC.",
    "Damping: both 0.01 x mean(diag H) (LLMC sparsegpt/base.py:76 and sgpt_sparsify.py:104; stade "
    "stages/solvers/sparsegpt.py:50). If the Cholesky fails LLMC falls back to Hinv = I, i.e. magnitude pruning "
    "(sgpt_sparsify.py:111-117); stade retries with 10x the damping.",
    "Column blocks of 128 in both (LLMC sparsegpt/base.py:75); for 2:4 both choose, at the first column of each "
    "group of 4, the 2 lowest w^2/d^2 from the weights as updated so far (sgpt_sparsify.py:176-186).",
    "Hessian scale: LLMC divides by the number of sequences, not tokens (sgpt_sparsify.py:29, 48-53), stade by the "
    "token count: a constant factor, which cancels in the relative damping, the scores and the update.",
    "Sequential inputs: LLMC's sequential pipeline propagates the compressed block's outputs by default "
    "(args/dataset_arguments.py:267-268, pipelines/sequential/pipeline.py:160-178), as stade --sequential does; "
    "in both, every layer of a block is calibrated on the dense block before any of them is pruned (LLMC compresses "
    "at sequential_epoch_end, pipeline.py:160). LLMC runs 1 window per batch, stade 8: float order differs, "
    "borderline weights flip, and the differences compound from block to block.",
    "Wanda: LLMC's runs go through the same sequential pipeline (pruned inputs), stade's sweep is one-shot (dense "
    "inputs): only block 0 sees the same inputs in both, so only its agreement is like for like.",
]


def ensure_venv(venv: Path) -> Path:
    """llm-compressor's own venv: torch 2.13.0 first, then llmcompressor, constrained not to replace it; checked
    (`pip show torch`), stamped, and reused as long as it imports."""
    py, stamp = venv / "bin" / "python", venv / ".peers-installed"
    check = "import torch, llmcompressor; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
    if (
        stamp.exists()
        and stamp.read_text() == f"{LLMC} {TORCH}\n"
        and subprocess.run([py, "-c", check], capture_output=True).returncode == 0
    ):
        return py
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)
    (venv / "constraints.txt").write_text(TORCH + "\n")
    subprocess.run([*pip, "-c", str(venv / "constraints.txt"), LLMC], check=True)
    shown = subprocess.run([py, "-m", "pip", "show", "torch"], capture_output=True, text=True, check=True).stdout
    version = re.search(r"^Version: (\S+)", shown, re.M)
    if not version or version.group(1).split("+")[0] != "2.13.0":
        raise SystemExit(f"llmcompressor's resolution replaced torch: {version and version.group(1)}")
    subprocess.run([py, "-c", check], check=True)
    stamp.write_text(f"{LLMC} {TORCH}\n")
    return py


def modifier(method: str, pattern: str, damp: float, block: int) -> Any:
    """The recipe: 50% unstructured ("0:0" in llm-compressor's spelling) or N:M, every Linear but lm_head."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    n, m = (int(x) for x in pattern.split(":")) if pattern != "unstructured" else (1, 2)
    common: dict[str, Any] = {
        "sparsity": n / m,
        "mask_structure": "0:0" if pattern == "unstructured" else pattern,
        "targets": ["Linear"],
        "ignore": ["re:.*lm_head"],
    }
    if method == "sparsegpt":
        return SparseGPTModifier(**common, dampening_frac=damp, block_size=block)
    return WandaPruningModifier(**common)


def calibration_dataset(ids_path: Path) -> Any:
    """The windows as a tokenized Dataset (input_ids, attention_mask): llm-compressor uses it as it is."""
    from datasets import Dataset
    from safetensors.torch import load_file

    rows = load_file(str(ids_path))["input_ids"].tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def run(args: argparse.Namespace) -> dict[str, float]:
    """Load, prune with oneshot (sequential pipeline over the decoder layers), save dense; each phase's seconds."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    dataset = calibration_dataset(args.ids)
    t1 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=str(args.model),
        recipe=modifier(args.method, args.pattern, args.damp, args.block_size),
        dataset=dataset,
        num_calibration_samples=len(dataset),
        max_seq_length=len(dataset[0]["input_ids"]),
        shuffle_calibration_samples=False,
        pipeline="sequential",
        sequential_targets=[type(model.model.layers[0]).__name__],
    )
    t2 = time.perf_counter()
    model.save_pretrained(str(args.out), save_compressed=False)
    AutoTokenizer.from_pretrained(str(args.model)).save_pretrained(str(args.out))  # stade eval loads one
    return {"load_s": t1 - t0, "prune_s": t2 - t1, "save_s": time.perf_counter() - t2}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", action="store_true", help="print the venv's package versions as JSON and exit")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--ids", type=Path, help="safetensors file with input_ids [n, seqlen]")
    ap.add_argument("--method", choices=["sparsegpt", "wanda"])
    ap.add_argument("--pattern", default="unstructured", help="unstructured (50%%) or N:M")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening_frac (stade's is 0.01)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--timings", type=Path)
    args = ap.parse_args()
    if args.versions:
        print(json.dumps(versions()))
        return 0
    if None in (args.model, args.ids, args.method, args.out, args.timings):
        ap.error("--model, --ids, --method, --out and --timings are required")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.timings.write_text(json.dumps(run(args)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
