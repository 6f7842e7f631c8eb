"""Calibration progress committed block by block, so that a killed run (SIGKILL, power loss) can resume.

The `*.incomplete` folder of a calibration holds, after block k is done:
- `block-0000k.safetensors`: block k's statistics (mean and m2 per input group, and its Hessians);
- `hidden-0000k.safetensors`: the hidden states leaving block k (what block k+1 reads), per batch;
- `progress.json`: what run this is (its key) and how many blocks are done, replaced atomically last.

Each file is written under a temporary name, flushed to disk and renamed, and progress.json names
only files that were complete before it was replaced: whatever a kill leaves, the last progress.json
describes a consistent state. The folder has no manifest.json, so no stage takes it for an artifact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from stade_cli.base.console import err
from stade_cli.base.errors import StadeError
from stade_cli.base.files import read_json, write_json
from stade_cli.base.tensorfiles import read_tensors, save_tensors

PROGRESS_FILE = "progress.json"
PROGRESS_KIND = "stade-calibration-progress"


class BlockLog:
    """The committed blocks of one calibration; `key` says which run they belong to."""

    def __init__(self, folder: Path, key: dict[str, Any], resume: bool) -> None:
        self.folder = folder
        self.key = key
        self.done = 0
        self.layers: list[dict[str, Any]] = []
        self.hidden_file: str | None = None
        self.commit_s = 0.0  # time spent committing: the cost of being resumable
        if resume:
            self._load()

    def _load(self) -> None:
        path = self.folder / PROGRESS_FILE
        if not path.exists():
            err.print("[yellow]note:[/] nothing to resume (no committed block): calibrating from block 0.")
            return
        progress = read_json(path, "Calibration progress")
        old = progress.get("key", {})
        for name, value in self.key.items():
            if old.get(name) != value:
                raise StadeError(
                    f"Cannot resume {str(self.folder)!r}: it was started with {name} {old.get(name)!r}, "
                    f"this run has {value!r}.",
                    "resume with the same arguments, or run without --resume to start again",
                )
        for fname, size in progress["files"].items():
            f = self.folder / fname
            if not f.exists() or f.stat().st_size != size:
                raise StadeError(
                    f"Cannot resume {str(self.folder)!r}: its committed file {fname!r} is missing or damaged.",
                    "run without --resume to start again",
                )
        self.done = int(progress["blocks_done"])
        self.layers = list(progress["layers"])
        self.hidden_file = progress["hidden"]
        err.print(f"Resuming after block {self.done - 1}: {self.done} block(s) were committed.", highlight=False)

    def hidden(self, device: torch.device) -> list[torch.Tensor] | None:
        """The hidden states leaving the last committed block, per batch (None when starting from block 0)."""
        if self.hidden_file is None:
            return None
        saved = read_tensors(self.folder / self.hidden_file)
        return [saved[f"hidden.{b}"].to(device) for b in range(len(saved))]

    def commit(
        self,
        block: int,
        tensors: dict[str, torch.Tensor],
        layers: list[dict[str, Any]],
        hidden: list[torch.Tensor],
    ) -> None:
        """Block `block` is done: its statistics and outputs are on disk before progress.json says so."""
        t0 = time.perf_counter()
        name = f"block-{block:05d}.safetensors"
        save_tensors(self.folder / name, tensors)
        hidden_name = f"hidden-{block:05d}.safetensors"
        save_tensors(self.folder / hidden_name, {f"hidden.{b}": h for b, h in enumerate(hidden)})
        self.done, self.layers = block + 1, self.layers + layers
        previous, self.hidden_file = self.hidden_file, hidden_name
        files = {f"block-{k:05d}.safetensors": 0 for k in range(self.done)} | {hidden_name: 0}
        files = {f: (self.folder / f).stat().st_size for f in files}
        write_json(
            self.folder / PROGRESS_FILE,
            {
                "kind": PROGRESS_KIND,
                "key": self.key,
                "blocks_done": self.done,
                "hidden": hidden_name,
                "files": files,
                "layers": self.layers,
            },
            durable=True,
        )
        if previous is not None:
            (self.folder / previous).unlink(missing_ok=True)
        self.commit_s += time.perf_counter() - t0

    def _read(self, block: int) -> dict[str, torch.Tensor]:
        """Read, not mapped: the small statistics kept from each block would otherwise keep its whole mapping,
        Hessian pages included, resident to the end (measured: every block's Hessians at once)."""
        return read_tensors(self.folder / f"block-{block:05d}.safetensors")

    def finish(self, add_hessian: Any) -> dict[str, torch.Tensor]:
        """The statistics of every block, Hessians handed to `add_hessian(group, tensor)` in block order;
        the progress files are removed (the caller then writes the artifact's own files)."""
        stats: dict[str, torch.Tensor] = {}
        for k in range(self.done):
            block = self._read(k)
            for name, t in block.items():
                if name.startswith("hessian:"):
                    add_hessian(name.removeprefix("hessian:"), t)
                else:
                    stats[name] = t
            del block
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        for f in self.folder.iterdir():
            if f.name.startswith(("block-", "hidden-")) and f.suffix == ".safetensors":
                f.unlink()
        return stats
