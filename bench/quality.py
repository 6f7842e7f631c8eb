"""Beyond SparseGPT (issue 13): every preset and the new stage combinations on SmolLM2-135M, as one table.

One process: the built-in SmolLM2, the reference calibration ids (32 x 512) and one `calibrate` with Hessians,
then in-memory prunes from one loaded model. Each row: held-out news perplexity (147 x 512), stade_cloze accuracy
(150 items), the prune's wall time (a ratio to SparseGPT's, same mode and pattern), and for the rows marked
`wiki`, perplexity on held-out Wikipedia windows (sample-wiki articles that no calibration window came from).
Each row's result is cached in bench/work/quality/rows/ (git-ignored), so that a run resumes where it stopped.

    python bench/quality.py                          # every row, then bench/results/quality.{json,md}
    python bench/quality.py --rows 'admm*,sparsegpt*' # a subset (fnmatch patterns on the row keys), in that order
    python bench/quality.py --list                   # the row keys
    python bench/quality.py --table                  # only render what the cache holds

A preset row whose configuration bench/reproduce.py also ran takes its news perplexity from
bench/results/reproduce.json instead of measuring it again (`--remeasure-presets` to measure): the weights are
identical (bench/results/presets-exact.json), so is the perplexity, and it saves about 3 minutes a row here.
Its cloze accuracy and prune time are measured in this run like every other row's.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import reproduce  # bench/reproduce.py: the configurations behind reproduce.json
import torch

from stade_cli.base.console import err
from stade_cli.data.sources import builtin_documents, load_token_file
from stade_cli.driver.calibrate import CalibrationConfig, calibrate
from stade_cli.driver.dense import Snapshot
from stade_cli.driver.sweep import prune_model
from stade_cli.evaluation.perplexity import perplexity
from stade_cli.models.loading import LoadedModel, load_model
from stade_cli.stages.config import PruneConfig
from stade_cli.stages.reconstructions.block import BlockSettings
from stade_cli.stats.artifact import Statistics

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "data" / "reference-smollm2"
WORK = ROOT / "bench" / "work" / "quality"
RESULTS = ROOT / "bench" / "results"
CLOZE_LIMIT = 150
WIKI_WINDOWS = 60
PATTERNS = {"50": ("unstructured", 0.5), "24": ("2:4", None), "70": ("unstructured", 0.7)}


@dataclass(frozen=True)
class Row:
    key: str  # label|pattern|mode, e.g. wanda+admm|50|seq
    config: PruneConfig
    wiki: bool = False


def _row(label: str, pat: str, mode: str, wiki: bool = False, **kw: Any) -> Row:
    method = label.split("+")[0]
    pattern, ratio = PATTERNS[pat]
    cfg = PruneConfig(method, ratio, pattern, sequential=mode == "seq", **kw)
    return Row(f"{label}|{pat}|{mode}", cfg, wiki)


def rows() -> list[Row]:
    """In priority order: the targets and SparseGPT first, then STADE's question, then the other presets."""
    out: list[Row] = []
    for pat in ("50", "24"):
        out += [
            _row("sparsegpt", pat, "seq", wiki=True),
            _row("admm", pat, "seq", wiki=True),
            _row("wanda+admm", pat, "one", update="admm"),
            _row("wanda+admm", pat, "seq", update="admm"),
            _row("admm+block", pat, "seq", wiki=True, reconstruct="block"),
            _row("sparsegpt+block", pat, "seq", wiki=True, reconstruct="block"),
            _row("admm+block10", pat, "seq", reconstruct="block", settings=(BlockSettings(steps=10),)),
            _row("wanda+admm+block", pat, "seq", update="admm", reconstruct="block"),
            _row("wanda+block", pat, "seq", reconstruct="block"),
        ]
    for pat in ("50", "24"):
        out += [
            _row("admm", pat, "one"),
            _row("sparsegpt", pat, "one"),
            _row("stade+admm", pat, "one", update="admm"),
            _row("wanda+bias", pat, "one", update="bias"),
            _row("stade", pat, "one"),
            _row("stade+none", pat, "one", update="none"),
            _row("wanda", pat, "one"),
        ]
    out += [_row("admm+owl", "50", "seq", allocation="owl"), _row("wanda+admm+owl", "50", "one", update="admm",
            allocation="owl"), _row("wanda+owl", "50", "one", allocation="owl")]  # fmt: skip
    out += [_row("sparsegpt", "70", "one"), _row("wanda", "70", "one")]  # 70%: where OWL is meant to help
    out += [_row("wanda+owl", "70", "one", allocation="owl")]
    for pat in ("50", "24"):
        for mode in ("one", "seq"):
            for label in ("magnitude", "wanda", "stade", "stadew", "stade_plus", "random", "sparsegpt"):
                out.append(_row(label, pat, mode))
            out += [_row("stade+admm", pat, "seq", update="admm")] if mode == "seq" else []
    seen: dict[str, Row] = {}
    for r in out:
        seen.setdefault(r.key, r)
    return list(seen.values())


def heldout_wiki(loaded: LoadedModel, calibration: torch.Tensor) -> torch.Tensor:
    """sample-wiki articles that none of the calibration windows came from, joined and tokenized once: [1, N]."""
    docs = builtin_documents("sample-wiki")
    keys = {tuple(row[:16].tolist()) for row in calibration}
    kept = []
    for text in docs.texts:
        ids = loaded.tokenizer(text, add_special_tokens=True)["input_ids"]  # type: ignore[operator]
        grams = {tuple(ids[i : i + 16]) for i in range(max(len(ids) - 15, 0))}
        if not keys & grams:
            kept.append(text)
    ids = loaded.tokenizer(docs.joiner.join(kept), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return torch.tensor([ids[: WIKI_WINDOWS * 512]], dtype=torch.int64)


def cloze(loaded: LoadedModel) -> float:
    from stade_cli.evaluation.zeroshot import resolve_tasks, zero_shot

    res = zero_shot(loaded, resolve_tasks(("stade_cloze",)), batch_size=8, limit=CLOZE_LIMIT)
    return float(res["tasks"]["stade_cloze"]["acc"])


@cache
def _reproduced() -> dict[str, float]:
    """reproduce.json's news perplexities, keyed as `_config_key` keys the configurations reproduce.py ran."""
    doc = RESULTS / "reproduce.json"
    if not doc.exists():
        return {}
    figures = {(r["method"], r["pattern"], r["mode"]): r["ours"] for r in json.loads(doc.read_text())["rows"]}
    runs = reproduce.runs(quick=False)
    return {_config_key(c): figures[(c.method, c.pattern, m)] for m, c in runs if (c.method, c.pattern, m) in figures}


def _config_key(config: PruneConfig) -> str:
    return json.dumps([config.name, config.sequential, config.record()], sort_keys=True)


def reproduced(row: Row) -> float | None:
    """The news perplexity bench/reproduce.py measured for this row's exact configuration, if it ran it."""
    return _reproduced().get(_config_key(row.config))


def measure(
    loaded: LoadedModel,
    stats: Statistics,
    row: Row,
    texts: dict[str, torch.Tensor],
    path: Path,
    reuse: bool = True,
) -> dict[str, Any]:
    """Prune, then evaluate; the row is written after each result (marked partial until the last one)."""
    device = torch.device("cpu")
    t0, c0 = time.perf_counter(), time.process_time()
    report = prune_model(loaded, stats, row.config, device)
    prune_s, prune_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    result: dict[str, Any] = {
        "key": row.key,
        "name": row.config.name,
        "sequential": row.config.sequential,
        "stages": row.config.record(),
        "achieved_sparsity": round(report.achieved_sparsity, 6),
        "prune_s": round(prune_s, 2),
        "prune_cpu_s": round(prune_cpu_s, 2),  # CPU time: stable on a shared, loaded machine, unlike wall time
        "block_sparsity": report.block_sparsity or None,
    }
    t1 = time.perf_counter()
    result["partial"] = True
    known = reproduced(row) if reuse and not row.wiki else None
    if known is not None:
        result["ppl_news"], result["ppl_news_from"] = known, "bench/results/reproduce.json"
    else:
        result["ppl_news"] = perplexity(loaded.model, texts["news"], 512, 8, device, description=row.key).ppl
    _write(path, result)
    if row.wiki:
        result["ppl_wiki"] = perplexity(loaded.model, texts["wiki"], 512, 8, device, description="wiki").ppl
        _write(path, result)
    result["cloze_acc"] = cloze(loaded)
    result["eval_s"] = round(time.perf_counter() - t1, 2)
    del result["partial"]
    _write(path, result)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="*", help="comma-separated fnmatch patterns on row keys (see --list)")
    ap.add_argument("--list", action="store_true", help="print the row keys and exit")
    ap.add_argument("--table", action="store_true", help="only write the table from the cached rows")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (one per parallel worker)")
    ap.add_argument(
        "--remeasure-presets", action="store_true", help="measure perplexities that reproduce.json already holds"
    )
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (another worker measures it)")
    args = ap.parse_args()
    all_rows = rows()
    if args.list:
        print("\n".join(r.key for r in all_rows))
        return 0
    cache = WORK / "rows"
    cache.mkdir(parents=True, exist_ok=True)
    patterns = [p.strip() for p in args.rows.split(",")]
    rank = {r.key: min((i for i, p in enumerate(patterns) if fnmatch.fnmatch(r.key, p)), default=-1) for r in all_rows}
    wanted = sorted((r for r in all_rows if rank[r.key] >= 0), key=lambda r: rank[r.key])  # in --rows order
    todo = [r for r in wanted if not _complete(cache / f"{_slug(r.key)}.json")]
    if todo and not args.table:
        torch.set_num_threads(args.threads)
        loaded = load_model("smollm2-135m", "float32", torch.device("cpu"))
        calib = load_token_file(REF / "calibration_ids.safetensors", "[n, seqlen]")
        stats_dir = WORK / "stats"
        if (stats_dir / "manifest.json").exists():
            stats = Statistics.load(stats_dir)
        else:
            cfg = CalibrationConfig(data=str(REF / "calibration_ids.safetensors"), nsamples=None, hessian=True)
            stats = calibrate(loaded, cfg, stats_dir, torch.device("cpu"))
        texts = {
            "news": load_token_file(REF / "heldout_ids.safetensors", "[1, N]"),
            "wiki": heldout_wiki(loaded, calib),
        }
        dense_path = cache / "dense.json"
        if not dense_path.exists() and not args.no_dense:
            t0 = time.perf_counter()
            dense = {
                "key": "dense", "ppl_news": perplexity(loaded.model, texts["news"], 512, 8, "cpu").ppl,
                "ppl_wiki": perplexity(loaded.model, texts["wiki"], 512, 8, "cpu").ppl, "cloze_acc": cloze(loaded),
                "wiki_windows": texts["wiki"].shape[1] // 512,
            }  # fmt: skip
            dense["eval_s"] = round(time.perf_counter() - t0, 2)
            _write(dense_path, dense)
        snap = Snapshot(loaded.model)
        for row in todo:
            snap.restore()
            err.print(f"[bold]{row.key}[/] ({row.config.name}{', sequential' if row.config.sequential else ''})")
            res = measure(loaded, stats, row, texts, cache / f"{_slug(row.key)}.json", not args.remeasure_presets)
            err.print(
                f"  ppl {res['ppl_news']:.2f} wiki {res.get('ppl_wiki', float('nan')):.2f} "
                f"cloze {res['cloze_acc']:.3f} prune {res['prune_s']:.1f}s eval {res['eval_s']:.1f}s"
            )
        snap.restore()
    write_table(all_rows, cache)
    return 0


def _complete(path: Path) -> bool:
    return path.exists() and not json.loads(path.read_text()).get("partial")


def _slug(key: str) -> str:
    return key.replace("|", "_").replace(":", "of")


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".incomplete")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def write_table(all_rows: list[Row], cache: Path) -> None:
    """bench/results/quality.{json,md} from every cached row, in row order; time as a ratio to SparseGPT's."""
    done = {r.key: json.loads((cache / f"{_slug(r.key)}.json").read_text()) for r in all_rows
            if (cache / f"{_slug(r.key)}.json").exists()}  # fmt: skip
    dense = json.loads((cache / "dense.json").read_text()) if (cache / "dense.json").exists() else None
    lines = [
        "| pipeline | stages (score + update, allocation) | pattern | mode | held-out ppl | wiki ppl | cloze acc "
        "| prune CPU time / SparseGPT's | prune s (wall) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    if dense:
        lines.append(
            f"| dense | — | — | — | {dense['ppl_news']:.2f} | {dense['ppl_wiki']:.2f} "
            f"| {dense['cloze_acc']:.3f} | — | — |"
        )
    marks: dict[str, str] = {}
    for key, r in done.items():
        label, pat, mode = key.split("|")
        ref, versus = done.get(f"sparsegpt|{pat}|{mode}"), ""
        if ref is None and f"sparsegpt|{pat}|seq" in done:  # one-shot SparseGPT not measured: its sequential run
            ref, versus = done[f"sparsegpt|{pat}|seq"], " (vs seq.)"
        if "reference_cpu_s" in r:  # measured in another run: against SparseGPT's CPU time in that run
            ref = {"prune_cpu_s": r["reference_cpu_s"], "prune_s": None}
        key_s = "prune_cpu_s" if ref and "prune_cpu_s" in r and "prune_cpu_s" in ref else "prune_s"
        ratio = f"{r[key_s] / ref[key_s]:.2f}{'' if key_s == 'prune_cpu_s' else ' (wall)'}{versus}" if ref else ""
        if r.get("note"):  # one footnote per distinct note
            marks.setdefault(r["note"], "†" * (len(marks) + 1))
            label += marks[r["note"]]
        st = r["stages"]
        stages = f"{'+'.join(st['score']) if st['score'] else '(by update)'} + {st['update']['name']}"
        if st["allocation"]["name"] != "uniform":
            stages += f", {st['allocation']['name']}"
        if st.get("reconstruct", {}).get("name", "none") != "none":
            stages += f", reconstruct {st['reconstruct']['name']}"
        wiki = f"{r['ppl_wiki']:.2f}" if "ppl_wiki" in r else ""
        acc = f"{r['cloze_acc']:.3f}" if "cloze_acc" in r else "(pending)"
        ppl = f"{r['ppl_news']:.2f}" if r["ppl_news"] < 1e4 else f"{r['ppl_news']:.3g}"
        ppl += "*" if "ppl_news_from" in r else ""
        lines.append(
            f"| {label} | {stages} | {'2:4' if pat == '24' else pat + '%'} "
            f"| {'sequential' if mode == 'seq' else 'one-shot'} | {ppl} | {wiki} | {acc} "
            f"| {ratio} | {r['prune_s']:.1f} |"
        )
    notes = [f"{mark} {note}" for note, mark in marks.items()]
    if any("ppl_news_from" in r for r in done.values()):
        notes.append(
            "\\* perplexity from bench/results/reproduce.json, which ran the same configuration: the stages prune "
            "these presets to identical weights (bench/results/presets-exact.json); cloze and time measured here"
        )
    lines += ["", *notes] if notes else []
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "quality.json").write_text(json.dumps({"dense": dense, "rows": list(done.values())}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
