"""`stade stats merge`: shards of one calibration (`calibrate --shard I/N`) combined into the whole run's artifact.

Exact by construction: count, mean and m2 merge with Chan's parallel update in float64 (Chan, Golub &
LeVeque, "Updating formulae and a pairwise algorithm for computing sample variances", 1979), Hessians
are count-weighted sums in float64 rounded once to float32, and the token ids are concatenated in window
order. Shards that do not belong together (another model, seqlen, data or seed), overlap or leave a
gap are refused before anything is written, each with its own message.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from stade_cli.base.errors import StadeError
from stade_cli.base.files import atomic_dir, check_apart, check_writable
from stade_cli.base.shards import windows_of
from stade_cli.base.tensorfiles import SafetensorsWriter
from stade_cli.data.sources import ids_sha256
from stade_cli.stats.accumulators import Moments
from stade_cli.stats.artifact import HESSIAN_FILE, Statistics

HINT = "merge only the shards of one `stade calibrate --shard I/N` run (same model, data, seed and seqlen)"


def _differs(a: Statistics, b: Statistics, what: str, x: Any, y: Any) -> StadeError:
    return StadeError(f"{str(a.path)!r} and {str(b.path)!r} differ in {what}: {x!r} vs {y!r}.", HINT)


def check_mergeable(arts: list[Statistics]) -> list[Statistics]:
    """The artifacts in window order, once they are shown to be disjoint parts, with no gap, of one run."""
    if not arts:
        raise StadeError("Nothing to merge.", "give the shard folders, e.g. stade stats merge s0/ s1/ --out stats/")
    first = arts[0]
    m0 = first.manifest
    for art in arts[1:]:
        m = art.manifest
        fa, fb = m0["model"]["fingerprint"], m["model"]["fingerprint"]
        if fa != fb:
            raise _differs(first, art, "model (weights fingerprint)", fa[:12], fb[:12])
        checks = [
            ("seqlen", m0["data"]["seqlen"], m["data"]["seqlen"]),
            ("data source", m0["data"]["source"], m["data"]["source"]),
            ("data source content (sha256)", m0["data"].get("source_sha256"), m["data"].get("source_sha256")),
            ("seed", m0["data"].get("seed"), m["data"].get("seed")),
            ("number of windows drawn (--nsamples)", windows_of(m0)["drawn"], windows_of(m)["drawn"]),
            ("windows drawn (token ids)", windows_of(m0)["drawn_sha256"], windows_of(m)["drawn_sha256"]),
            ("statistics kept (--hessian)", m0["statistics"], m["statistics"]),
            ("model dtype", m0["dtype"], m["dtype"]),
            ("Hessian dtype", m0.get("hessian_dtype"), m.get("hessian_dtype")),
            ("layers", [e["name"] for e in m0["layers"]], [e["name"] for e in m["layers"]]),
        ]
        for what, x, y in checks:
            if x != y:
                raise _differs(first, art, what, x, y) if what != "layers" else _differs(first, art, what, "…", "…")
    ordered = sorted(arts, key=lambda a: (windows_of(a.manifest)["start"], windows_of(a.manifest)["stop"]))
    drawn = windows_of(m0)["drawn"]
    covered = 0
    prev: Statistics | None = None
    for art in ordered:
        w = windows_of(art.manifest)
        if w["start"] < covered:
            assert prev is not None
            pw = windows_of(prev.manifest)
            raise StadeError(
                f"{str(prev.path)!r} (windows {pw['start']}-{pw['stop'] - 1}) and {str(art.path)!r} (windows "
                f"{w['start']}-{w['stop'] - 1}) overlap on windows {w['start']}-{min(covered, w['stop']) - 1}.",
                "give each shard once, from one split (the same N in every --shard I/N)",
            )
        if w["start"] > covered:
            raise StadeError(
                f"Windows {covered}-{w['start'] - 1} of the {drawn} drawn are in none of the artifacts (a gap "
                f"before {str(art.path)!r}).",
                "give every shard of the run; calibrate the missing one with its --shard I/N",
            )
        covered, prev = w["stop"], art
    if covered < drawn:
        raise StadeError(
            f"Windows {covered}-{drawn - 1} of the {drawn} drawn are in none of the artifacts (a gap at the end).",
            "give every shard of the run; calibrate the missing one with its --shard I/N",
        )
    return ordered


def merge_moments(parts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan's merge of (count, mean, m2) parts in the order given, in float64."""
    if not any(count for count, _, _ in parts):
        return 0, parts[0][1].double(), parts[0][2].double()
    total = Moments(parts[0][1].numel(), torch.device("cpu"))
    for count, mean, m2 in parts:
        total.merge(count, mean.double(), m2.double())
    return total.count, total.mean, total.m2


def merge_hessians(parts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """H = 2/n sum x x^T of the union: the count-weighted mean of the parts' H, in float64, rounded once."""
    n = sum(c for c, _ in parts)
    if n == 0:
        return parts[0][1]
    total = torch.zeros_like(parts[0][1], dtype=torch.float64)
    for count, h in parts:
        total.add_(h.double(), alpha=float(count))
    return (total / n).to(parts[0][1].dtype)


def merge_statistics(paths: list[Path], out: Path, force: bool = False) -> Statistics:
    """Merge shard artifacts into `out`, which equals the artifact of one whole run of the same windows."""
    out = Path(out)
    check_writable(out, force)
    check_apart(out, [("the shard", p) for p in paths])
    t0 = time.perf_counter()
    arts = check_mergeable([Statistics.load(p) for p in paths])
    first = arts[0]
    counts = [int(a.manifest["count"]) for a in arts]
    by_group: dict[str, str] = {}
    for entry in first.manifest["layers"]:
        by_group.setdefault(entry["group"], entry["name"])
    ids = torch.cat([a.token_ids() for a in arts])
    w0 = windows_of(first.manifest)
    if ids_sha256(ids) != w0["drawn_sha256"]:
        raise StadeError(
            "The shards' token ids, put together, are not the windows the run drew (their hash differs).",
            "re-run the shards with the same stade version and arguments",
        )
    hdtype = torch.bfloat16 if first.manifest.get("hessian_dtype") == "bfloat16" else torch.float32
    room = SafetensorsWriter.room_for({e["group"]: (hdtype, [e["shape"][1]] * 2) for e in first.manifest["layers"]})
    with atomic_dir(out, force) as tmp:
        hessians = SafetensorsWriter(tmp / HESSIAN_FILE, room) if first.has_hessian else None
        tensors: dict[str, torch.Tensor] = {}
        for group, name in by_group.items():
            layer = [a.layer(name, hessian=hessians is not None) for a in arts]  # counts: an expert's own tokens
            fed = [st for st in layer if st.count] or layer[:1]  # an expert no shard routed a token to: as it is
            _n, mean, m2 = merge_moments([(st.count, st.mean, st.m2) for st in fed])
            tensors[f"{group}.mean"], tensors[f"{group}.m2"] = mean, m2
            if hessians is not None:
                hs = [(st.count, st.hessian) for st in fed if st.hessian is not None]
                hessians.add(group, merge_hessians(hs).to(hdtype))
            del layer
        if hessians is not None:
            hessians.close()
        manifest = {k: copy.deepcopy(v) for k, v in first.manifest.items() if k != "files"}
        manifest["data"].update(nsamples=int(ids.shape[0]), token_ids_sha256=ids_sha256(ids))
        manifest["count"] = sum(counts)
        for k, entry in enumerate(manifest["layers"]):
            if "count" in entry:  # an expert's tokens: summed over the shards
                entry["count"] = sum(int(a.manifest["layers"][k]["count"]) for a in arts)
        manifest["windows"] = {**w0, "start": 0, "stop": w0["drawn"], "shard": None}
        manifest["merged_from"] = [
            {
                "path": str(a.path),
                "fingerprint": a.fingerprint,
                **{k: windows_of(a.manifest)[k] for k in ("start", "stop")},
            }
            for a in arts
        ]
        manifest["timings"] = {"merge_s": round(time.perf_counter() - t0, 3)}
        if hessians is not None:
            manifest["hessian_sha256"] = hessians.hashes
        manifest = Statistics.write_files(tmp, manifest, tensors, ids)
    return Statistics(out, manifest)
