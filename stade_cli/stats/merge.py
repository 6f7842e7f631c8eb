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

from stade_cli.base.artifacts import MergedFrom, StatsManifest, Windows
from stade_cli.base.errors import StadeError
from stade_cli.base.files import atomic_dir, check_apart, check_writable
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
        fa, fb = m0.model.fingerprint or "", m.model.fingerprint or ""
        if fa != fb:
            raise _differs(first, art, "model (weights fingerprint)", fa[:12], fb[:12])
        checks = [
            ("seqlen", m0.data.seqlen, m.data.seqlen),
            ("data source", m0.data.source, m.data.source),
            ("data source content (sha256)", m0.data.source_sha256, m.data.source_sha256),
            ("seed", m0.data.seed, m.data.seed),
            ("number of windows drawn (--nsamples)", m0.whole_windows.drawn, m.whole_windows.drawn),
            ("windows drawn (token ids)", m0.whole_windows.drawn_sha256, m.whole_windows.drawn_sha256),
            ("statistics kept (--hessian)", m0.statistics, m.statistics),
            ("model dtype", m0.dtype, m.dtype),
            ("Hessian dtype", m0.hessian_dtype, m.hessian_dtype),
            ("layers", [e.name for e in m0.layers], [e.name for e in m.layers]),
        ]
        for what, x, y in checks:
            if x != y:
                raise _differs(first, art, what, x, y) if what != "layers" else _differs(first, art, what, "…", "…")
    ordered = sorted(arts, key=lambda a: (a.manifest.whole_windows.start, a.manifest.whole_windows.stop))
    _check_coverage(ordered, m0.whole_windows.drawn)
    return ordered


def _check_coverage(ordered: list[Statistics], drawn: int) -> None:
    """The artifacts' windows, in order, cover the windows drawn exactly once."""
    covered = 0
    prev: Statistics | None = None
    for art in ordered:
        w = art.manifest.whole_windows
        if w.start < covered:
            assert prev is not None
            pw = prev.manifest.whole_windows
            raise StadeError(
                f"{str(prev.path)!r} (windows {pw.start}-{pw.stop - 1}) and {str(art.path)!r} (windows "
                f"{w.start}-{w.stop - 1}) overlap on windows {w.start}-{min(covered, w.stop) - 1}.",
                "give each shard once, from one split (the same N in every --shard I/N)",
            )
        if w.start > covered:
            raise StadeError(
                f"Windows {covered}-{w.start - 1} of the {drawn} drawn are in none of the artifacts (a gap "
                f"before {str(art.path)!r}).",
                "give every shard of the run; calibrate the missing one with its --shard I/N",
            )
        covered, prev = w.stop, art
    if covered < drawn:
        raise StadeError(
            f"Windows {covered}-{drawn - 1} of the {drawn} drawn are in none of the artifacts (a gap at the end).",
            "give every shard of the run; calibrate the missing one with its --shard I/N",
        )


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
    ids = torch.cat([a.token_ids() for a in arts])
    if ids_sha256(ids) != first.manifest.whole_windows.drawn_sha256:
        raise StadeError(
            "The shards' token ids, put together, are not the windows the run drew (their hash differs).",
            "re-run the shards with the same stade version and arguments",
        )
    hdtype = torch.bfloat16 if first.manifest.hessian_dtype == "bfloat16" else torch.float32
    room = SafetensorsWriter.room_for({e.group: (hdtype, [e.shape[1]] * 2) for e in first.manifest.layers})
    with atomic_dir(out, force) as tmp:
        hessians = SafetensorsWriter(tmp / HESSIAN_FILE, room) if first.has_hessian else None
        try:
            tensors = _merge_groups(arts, hessians, hdtype)
        except BaseException:
            if hessians is not None:
                hessians.abort()
            raise
        manifest = _merged_manifest(arts, ids)
        manifest.timings = {"merge_s": round(time.perf_counter() - t0, 3)}
        if hessians is not None:
            hessians.close()
            manifest.hessian_sha256 = hessians.hashes
        manifest = Statistics.write_files(tmp, manifest, tensors, ids)
    return Statistics(out, manifest)


def _merge_groups(
    arts: list[Statistics], hessians: SafetensorsWriter | None, hdtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every group's merged mean and m2 (returned) and Hessian (written to `hessians`, one at a time)."""
    by_group: dict[str, str] = {}
    for entry in arts[0].manifest.layers:
        by_group.setdefault(entry.group, entry.name)
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
    return tensors


def _merged_manifest(arts: list[Statistics], ids: torch.Tensor) -> StatsManifest:
    """The first shard's manifest, made the whole run's: all windows, token counts summed, where it came from."""
    manifest = copy.deepcopy(arts[0].manifest)
    manifest.files = {}
    manifest.data.nsamples, manifest.data.token_ids_sha256 = int(ids.shape[0]), ids_sha256(ids)
    manifest.count = sum(a.manifest.count for a in arts)
    for k, entry in enumerate(manifest.layers):
        if entry.count is not None:  # an expert's tokens: summed over the shards
            entry.count = sum(a.manifest.layers[k].count or 0 for a in arts)
    w0 = arts[0].manifest.whole_windows
    manifest.windows = Windows(drawn=w0.drawn, drawn_sha256=w0.drawn_sha256, start=0, stop=w0.drawn, shard=None)
    manifest.merged_from = [
        MergedFrom(
            path=str(a.path),
            fingerprint=a.fingerprint,
            start=a.manifest.whole_windows.start,
            stop=a.manifest.whole_windows.stop,
        )
        for a in arts
    ]
    return manifest
