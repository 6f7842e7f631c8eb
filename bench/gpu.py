"""Helpers of bench/gpu.sh (for a CUDA machine): a stade command's peak device memory, the perplexity check
against the CPU float32 run, and 2:4 pruned linear layers timed dense against semi-structured sparse.

    python bench/gpu.py peak OUT.json -- calibrate smollm2-135m ...   # runs the command in this process
    python bench/gpu.py speed CHECKPOINT OUT.json                     # 1, 16 and 2048 tokens
    python bench/gpu.py report RESULTS_DIR                            # summary.json, exit 1 if a check fails

Every part runs on the CPU too (peak memory is then None and the sparse kernels are reported unavailable),
so that the script's Python is tested without a GPU.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

PPL_TOLERANCE = 0.05  # bfloat16 on CUDA against float32 on the CPU: "within a few percent"
TOKENS = (1, 16, 2048)


def peak(out: str, args: list[str]) -> int:
    """Run one stade command here and record its wall time and torch.cuda.max_memory_allocated."""
    from stade_cli.cli import app

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        rc = app(args, standalone_mode=False)
        code = rc if isinstance(rc, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    doc = {
        "args": args,
        "rc": code,
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    return code


def _bench(fn: object, reps: int = 20) -> float:
    """Median seconds of fn() (CUDA events on a GPU)."""
    times = []
    for i in range(reps + 3):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def speed(checkpoint: str, out: str, reps: int = 20) -> dict:
    """Block 0's 2:4-pruned linear layers: F.linear dense against to_sparse_semi_structured, per token count."""
    from safetensors import safe_open

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    weights = {}
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                if ".layers.0." in k and k.endswith("proj.weight"):
                    weights[k] = st.get_tensor(k).to(device, dtype)
    rows = []
    for tokens in TOKENS:
        dense_s = sparse_s = 0.0
        error: str | None = None
        max_err = 0.0
        for name, w in weights.items():
            groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            if int(groups.max()) > 2:
                raise SystemExit(f"{name} is not 2:4 sparse: is {checkpoint} a 2:4 checkpoint?")
            x = torch.randn(tokens, w.shape[1], device=device, dtype=dtype)
            dense_s += _bench(lambda x=x, w=w: torch.nn.functional.linear(x, w), reps)
            if error is None:
                try:
                    if not cuda:
                        raise RuntimeError("semi-structured sparse kernels need CUDA")
                    from torch.sparse import to_sparse_semi_structured

                    ws = to_sparse_semi_structured(w)
                    y = torch.nn.functional.linear(x, ws)
                    ref = torch.nn.functional.linear(x, w)
                    max_err = max(max_err, float((y - ref).abs().max() / ref.abs().max()))
                    sparse_s += _bench(lambda x=x, ws=ws: torch.nn.functional.linear(x, ws), reps)
                except Exception as exc:  # the kernel's own limits (shapes, dtypes, GPU generation)
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(
            {
                "tokens": tokens,
                "layers": len(weights),
                "dense_ms": round(dense_s * 1e3, 4),
                "sparse_ms": None if error else round(sparse_s * 1e3, 4),
                "speedup": None if error or not sparse_s else round(dense_s / sparse_s, 3),
                "max_rel_error": None if error else max_err,
                "error": error,
            }
        )
    doc = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__, "rows": rows}
    Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _ppl(path: Path) -> float:
    doc = json.loads(path.read_text())
    return float(next(iter(doc["perplexity"].values()))["ppl"])


def report(results: str) -> int:
    """Perplexities (CUDA bfloat16 against CPU float32) and peak memory against `stade plan`; summary.json."""
    d = Path(results)
    checks = []
    for name in ("dense", "wanda", "sparsegpt"):
        gpu, cpu = d / f"eval-{name}-cuda.json", d / f"eval-{name}-cpu.json"
        if gpu.exists() and cpu.exists():
            g, c = _ppl(gpu), _ppl(cpu)
            checks.append({"model": name, "ppl_cuda_bf16": g, "ppl_cpu_f32": c, "rel_diff": round(g / c - 1, 4)})
    plan = json.loads((d / "plan.json").read_text()) if (d / "plan.json").exists() else None
    memory = []
    for stage in ("calibrate", "prune-wanda", "prune-sparsegpt", "eval-wanda"):
        f = d / f"peak-{stage}.json"
        if not f.exists():
            continue
        got = json.loads(f.read_text())["peak_device_bytes"]
        key = stage.split("-")[0]
        est = plan["stages"][key]["device_bytes"] if plan else None
        ratio = None if not got or est is None else round(est / got, 3)
        memory.append({"stage": stage, "peak_device_bytes": got, "plan_device_bytes": est, "plan_over_measured": ratio})
    speed_doc = json.loads((d / "speed.json").read_text()) if (d / "speed.json").exists() else None
    ok = all(abs(c["rel_diff"]) <= PPL_TOLERANCE for c in checks)
    summary = {"ppl_tolerance": PPL_TOLERANCE, "ppl_ok": ok, "ppl": checks, "memory": memory, "speed": speed_doc}
    (d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("peak", "speed", "report"):
        print(__doc__)
        return 2
    if argv[0] == "peak":
        sep = argv.index("--")
        return peak(argv[1], argv[sep + 1 :])
    if argv[0] == "speed":
        speed(argv[1], argv[2])
        return 0
    return report(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
