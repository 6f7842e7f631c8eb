"""The statistics artifact: manifest, per-group moments and Hessians on disk, read lazily and checked."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from stade_cli.base.artifacts import MANIFEST_FILE, FileEntry, LayerEntry, StatsManifest
from stade_cli.base.errors import StadeError
from stade_cli.base.files import read_json, sha256_file, write_json
from stade_cli.base.schema import Invalid
from stade_cli.stats.accumulators import LayerStats

STATS_FILE = "stats.safetensors"
HESSIAN_FILE = "hessians.safetensors"
TOKENS_FILE = "tokens.safetensors"


# ----------------------------------------------------------------------------------------------- artifact


@dataclass
class Statistics:
    """A calibration artifact folder: manifest.json, statistics, optional Hessians, and the token ids."""

    path: Path
    manifest: StatsManifest
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)
    _recent: tuple[tuple, tuple] | None = field(default=None, repr=False)
    _hash_on_read: bool = field(default=False, repr=False)
    _hashed: set[str] = field(default_factory=set, repr=False)

    # -- reading
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Statistics:
        path = Path(path)
        unfinished = path.with_name(path.name + ".incomplete")
        if path.name.endswith(".incomplete") or (not path.exists() and unfinished.is_dir()):
            raise StadeError(
                f"Statistics {str(path)!r} are unfinished: a calibration is writing them, or was killed.",
                "finish it with the same `stade calibrate ... --resume` command",
            )
        if path.exists() and not path.is_dir():
            raise StadeError(
                f"{str(path)!r} is a file, not a statistics folder.",
                "give the folder `stade calibrate --out` wrote (it holds manifest.json)",
            )
        if not path.is_dir():
            raise StadeError(f"Statistics folder {str(path)!r} does not exist.", "run `stade calibrate` first")
        manifest = read_manifest(path)
        stats = cls(path, manifest, _hash_on_read=verify)
        if verify:
            stats.verify()
        return stats

    def verify(self) -> None:
        """Every data file must exist with the size the manifest recorded (catches truncation at once).

        Hashes are checked as files are read (`_check_hash`): a 70B model's Hessians are hundreds of GB,
        and a run that does not read them (wanda) must not hash them.
        """
        for fname, meta in self.manifest.files.items():
            f = self.path / fname
            if not f.exists():
                raise StadeError(f"Statistics file {str(f)!r} is missing.", "re-run `stade calibrate`")
            if f.stat().st_size != meta.bytes:
                raise StadeError(
                    f"Statistics file {str(f)!r} is corrupted or truncated: {f.stat().st_size} bytes, the manifest "
                    f"says {meta.bytes}.",
                    "re-run `stade calibrate --force`",
                )
        self._check_groups()

    def _check_groups(self) -> None:
        """Every layer's group is in the data files (from their headers alone): an edited manifest is named here,
        not as a missing tensor deep in a run."""
        from stade_cli.base.tensorfiles import header

        held = set(header(self.path / STATS_FILE))
        hessians = set(header(self.path / HESSIAN_FILE)) if self.has_hessian else set()
        for entry in self.manifest.layers:
            missing = [f for f in (f"{entry.group}.mean", f"{entry.group}.m2") if f not in held]
            missing += [entry.group] if self.has_hessian and entry.group not in hessians else []
            if missing:
                raise StadeError(
                    f"Statistics {str(self.path)!r}: layer {entry.name}'s group {entry.group!r} is not in the data "
                    f"files (no {missing[0]!r}).",
                    "the manifest was edited or belongs to other files: calibrate again (`stade calibrate --force`)",
                )

    def _corrupted(self, what: str) -> StadeError:
        return StadeError(
            f"Statistics file {what} is corrupted (its hash differs from the manifest's).",
            "re-run `stade calibrate --force`",
        )

    def _check_hash(self, fname: str) -> None:
        """The file's hash, checked once, the first time this run reads from it."""
        if not self._hash_on_read or fname in self._hashed:
            return
        f = self.path / fname
        if sha256_file(f) != self.manifest.files[fname].sha256:
            raise self._corrupted(repr(str(f)))
        self._hashed.add(fname)

    def _open(self, fname: str) -> Any:
        if fname not in self._handles:
            from safetensors import safe_open

            self._check_hash(fname)

            try:
                self._handles[fname] = safe_open(str(self.path / fname), framework="pt")
            except Exception as exc:
                raise StadeError(
                    f"Cannot read {self.path / fname}: {exc}", "re-run `stade calibrate --force`"
                ) from None
        return self._handles[fname]

    def _read_hessian(self, group: str) -> torch.Tensor:
        """One group's Hessian, read rather than mapped (tensorfiles.read_tensors): a model's Hessians can be far
        larger than the model, and mapped pages would stay resident next to the copy."""
        from stade_cli.base.tensorfiles import read_tensors

        per_tensor = self.manifest.hessian_sha256
        if per_tensor is None:
            self._check_hash(HESSIAN_FILE)  # an artifact from before per-tensor hashes: the whole file, once
        try:
            h = read_tensors(self.path / HESSIAN_FILE, [group])[group]
        except Exception as exc:
            hint = "re-run `stade calibrate --force`"
            raise StadeError(f"Cannot read {self.path / HESSIAN_FILE}: {exc}", hint) from None
        if self._hash_on_read and per_tensor is not None:
            raw = h.contiguous().reshape(-1).view(torch.uint8).numpy().data
            if hashlib.sha256(raw).hexdigest() != per_tensor.get(group):
                raise self._corrupted(f"{str(self.path / HESSIAN_FILE)!r} (Hessian {group})")
        return h.float()  # stored in float32 or bfloat16; SparseGPT solves in float32 either way

    @property
    def has_hessian(self) -> bool:
        return "hessian" in self.manifest.statistics

    @cached_property
    def layers(self) -> dict[str, LayerEntry]:
        """Manifest entries by layer name, built once (every per-layer lookup reads it)."""
        return {entry.name: entry for entry in self.manifest.layers}

    def layer(self, name: str, hessian: bool = False, device: torch.device | str = "cpu") -> LayerStats:
        entry = self.layers[name]
        group = entry.group
        key = (group, hessian, str(device))
        if self._recent is None or self._recent[0] != key:  # q/k/v (gate/up) come in a row: read their group once
            self._recent = None  # the last group's Hessian goes before the next one is read
            f = self._open(STATS_FILE)
            h = None
            if hessian:
                if not self.has_hessian:
                    raise StadeError("These statistics have no Hessians.", "re-run `stade calibrate --hessian`")
                h = self._read_hessian(group).to(device)
            mean, m2 = f.get_tensor(f"{group}.mean").to(device), f.get_tensor(f"{group}.m2").to(device)
            problem = LayerStats(0, mean, m2, False, h).problem(entry.shape[1])  # checked once per group read
            if problem is not None:
                raise StadeError(
                    f"Statistics {str(self.path)!r}, layer {name}: {problem}.",
                    "they were edited or made from a damaged model: calibrate again (`stade calibrate --force`)",
                )
            self._recent = (key, (mean, m2, h))
        mean, m2, h = self._recent[1]
        count = entry.count if entry.count is not None else self.manifest.count  # an expert's own tokens, else all
        return LayerStats(count, mean, m2, entry.fed_by_norm, h, group)

    def summary(self) -> dict[str, Any]:
        return summary(self)

    def token_ids(self) -> torch.Tensor:
        return self._open(TOKENS_FILE).get_tensor("input_ids")

    @property
    def fingerprint(self) -> str:
        """Identity of this artifact: what every prune report records."""
        return hashlib.sha256(
            "".join(f"{k}:{v.sha256}" for k, v in sorted(self.manifest.files.items())).encode()
        ).hexdigest()

    # -- writing
    @staticmethod
    def write_files(
        folder: Path, manifest: StatsManifest, tensors: dict[str, torch.Tensor], input_ids: torch.Tensor
    ) -> StatsManifest:
        """Write the statistics, the token ids and, last, the manifest with every data file's size and hash.

        `folder` is the artifact's temporary folder; Hessians, when asked for, are already in it.
        """
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / STATS_FILE))
        save_file({"input_ids": input_ids.contiguous()}, str(folder / TOKENS_FILE))
        files = [f for f in (STATS_FILE, TOKENS_FILE, HESSIAN_FILE) if (folder / f).exists()]
        manifest.files = {
            f: FileEntry(bytes=(folder / f).stat().st_size, sha256=sha256_file(folder / f)) for f in files
        }
        write_json(folder / MANIFEST_FILE, manifest.dump())
        return manifest


def read_manifest(path: Path) -> StatsManifest:
    """The manifest of the artifact in `path`, checked: every field stade reads, of the right type, and every data
    file accounted for (a hand-edited manifest would otherwise fail deep inside pruning, and a data file left out
    of `files` would silently escape the hash check)."""
    where = str(path / MANIFEST_FILE)
    data = read_json(path / MANIFEST_FILE, "Statistics manifest")
    if data.get("kind") != StatsManifest.KIND:
        raise StadeError(f"{str(path)!r} is not a stade statistics folder.", "run `stade calibrate` to make one")
    hint = "the manifest was edited or damaged: re-run `stade calibrate --force`"
    try:
        schema = data.get("schema", 1)
        manifest = StatsManifest.parse(data) if isinstance(schema, int) and schema <= StatsManifest.SCHEMA else None
    except Invalid as exc:
        raise StadeError(f"Statistics manifest {where!r} {exc}.", hint) from None
    if manifest is None:
        manifest = StatsManifest.load(data, where)  # refuses the newer schema, naming it
    if manifest.model.fingerprint is None:
        raise StadeError(f"Statistics manifest {where!r} has no model fingerprint.", hint)
    needed = {STATS_FILE, TOKENS_FILE} | ({HESSIAN_FILE} if "hessian" in manifest.statistics else set())
    present = {f.name for f in path.iterdir() if f.is_file() and f.suffix == ".safetensors"}
    for fname in sorted(needed | present):
        if fname not in manifest.files:
            raise StadeError(
                f"Statistics manifest {where!r} does not account for the data file {fname!r} (no size and hash "
                "for it).",
                hint,
            )
    return manifest


def block_summary(stats: Statistics) -> list[dict[str, Any]]:
    """Per block: range of channel means and stds over its layer inputs, and how many channels are off-centre.

    A channel counts as off-centre when |mean| > std: there Wanda's E[x^2] and STADE's var rank
    weights differently, and the bias update matters.
    """
    groups: dict[int, list[str]] = {}
    for entry in stats.manifest.layers:
        groups.setdefault(entry.block, [])
        if entry.group not in groups[entry.block]:
            groups[entry.block].append(entry.group)
    by_group = {e.group: e.name for e in stats.manifest.layers}
    rows = []
    for block, gs in sorted(groups.items()):
        means, stds = [], []
        for g in gs:
            st = stats.layer(by_group[g])
            means.append(st.mean)
            stds.append(st.std)
        mean, std = torch.cat(means), torch.cat(stds)
        rows.append(
            {
                "block": block,
                "inputs": len(gs),
                "channels": int(mean.numel()),
                "mean_min": float(mean.min()),
                "mean_max": float(mean.max()),
                "std_min": float(std.min()),
                "std_max": float(std.max()),
                "off_centre": int((mean.abs() > std).sum()),
            }
        )
    return rows


def summary(stats: Statistics) -> dict[str, Any]:
    """What `stats show` reports: the artifact's identity, model, data and per-block ranges."""
    m = stats.manifest
    return {
        "path": str(stats.path),
        "fingerprint": stats.fingerprint,
        "model": m.model.dump(),
        "dtype": m.dtype,
        "data": m.data.dump(),
        "statistics": m.statistics,
        "count": m.count,
        "layers": len(m.layers),
        "warnings": m.warnings,
        "blocks": block_summary(stats),
    }
