"""Calibration progress committed block by block, so that a killed run (SIGKILL, power loss) can resume.

The `*.incomplete` folder of a calibration holds, after block k is done:
- `block-0000k.safetensors`: block k's statistics (mean and m2 per input group);
- `hessians.safetensors`: the Hessians of blocks 0..k, appended block by block to the artifact's own file, which
  is therefore written once (its header goes in at the end);
- `hidden-0000k.safetensors`: the hidden states leaving block k (what block k+1 reads), per batch;
- `progress.json`: what run this is (its key), how many blocks are done, and how far the Hessians file is
  committed, replaced atomically last.

Each file is flushed to disk before progress.json names it (the Hessians file up to its committed length): whatever
a kill leaves, the last progress.json describes a consistent state, and a resumed run cuts the Hessians file back to
it. The folder has no manifest.json, so no stage takes it for an artifact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from stade_cli.base.artifacts import LayerEntry
from stade_cli.base.console import err
from stade_cli.base.errors import StadeError
from stade_cli.base.files import read_json, write_json
from stade_cli.base.schema import Invalid
from stade_cli.base.tensorfiles import SafetensorsWriter, read_tensors, save_tensors

PROGRESS_FILE = "progress.json"
PROGRESS_KIND = "stade-calibration-progress"
PROGRESS_VERSION = 2  # 2: Hessians committed into the artifact's own file (1 kept them in the block files)
HESSIAN_PREFIX = "hessian:"  # a group's Hessian among a block's tensors
SCRATCH = (PROGRESS_FILE, "block-*.safetensors", "hidden-*.safetensors")  # the progress, not the artifact


class BlockLog:
    """The committed blocks of one calibration; `key` says which run they belong to. `hessians`: the artifact's
    Hessians file (path, header room, dtype) where the run keeps Hessians."""

    def __init__(
        self, folder: Path, key: dict[str, Any], resume: bool, hessians: tuple[Path, int, torch.dtype] | None = None
    ) -> None:
        self.folder = folder
        self.key = key
        self.done = 0
        self.layers: list[LayerEntry] = []
        self.hidden_file: str | None = None
        self.commit_s = 0.0  # time spent committing: the cost of being resumable
        progress = self._load() if resume else None
        self.hessians: SafetensorsWriter | None = None
        if hessians is not None:
            path, room, self.hessian_dtype = hessians
            state = progress.get("hessians") if progress else None
            if state is not None and (
                state["room"] != room + (-room % 8)
                or not path.exists()
                or path.stat().st_size < 8 + state["room"] + state["offset"]
            ):
                raise StadeError(
                    f"Cannot resume {str(self.folder)!r}: its committed Hessians are missing, cut short or laid out "
                    "for other layers.",
                    "run without --resume to start again",
                )
            self.hessians = SafetensorsWriter(path, room, resume=state)

    def abort(self) -> None:
        """Close the Hessians file as it is (a failed run; what was committed stays for --resume)."""
        if self.hessians is not None:
            self.hessians.abort()

    def _load(self) -> dict[str, Any] | None:
        path = self.folder / PROGRESS_FILE
        if not path.exists():
            err.print("[yellow]note:[/] nothing to resume (no committed block): calibrating from block 0.")
            return None
        progress = read_json(path, "Calibration progress")
        if progress.get("version") != PROGRESS_VERSION:
            raise StadeError(
                f"Cannot resume {str(self.folder)!r}: another version of stade started it.",
                "run without --resume to start again",
            )
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
        try:
            self.layers = [LayerEntry.parse(e) for e in progress["layers"]]
        except Invalid as exc:
            raise StadeError(
                f"Cannot resume {str(self.folder)!r}: its progress {exc}.", "run without --resume"
            ) from None
        self.hidden_file = progress["hidden"]
        err.print(f"Resuming after block {self.done - 1}: {self.done} block(s) were committed.", highlight=False)
        return progress

    def hidden(self, device: torch.device) -> list[torch.Tensor] | None:
        """The hidden states leaving the last committed block, per batch (None when starting from block 0)."""
        if self.hidden_file is None:
            return None
        saved = read_tensors(self.folder / self.hidden_file)
        return [saved[f"hidden.{b}"].to(device) for b in range(len(saved))]

    def commit(
        self, block: int, tensors: dict[str, torch.Tensor], layers: list[LayerEntry], hidden: list[torch.Tensor]
    ) -> None:
        """Block `block` is done: its statistics, Hessians and outputs are on disk before progress.json says so."""
        t0 = time.perf_counter()
        stats = {k: v for k, v in tensors.items() if not k.startswith(HESSIAN_PREFIX)}
        save_tensors(self.folder / f"block-{block:05d}.safetensors", stats)
        hessians = None
        if self.hessians is not None:
            for name in sorted(k for k in tensors if k.startswith(HESSIAN_PREFIX)):  # the order save_file sorts in
                self.hessians.add(name.removeprefix(HESSIAN_PREFIX), tensors[name].to(self.hessian_dtype))
            hessians = self.hessians.sync()
        elif any(k.startswith(HESSIAN_PREFIX) for k in tensors):
            raise AssertionError("Hessians were committed by a run without --hessian")
        hidden_name = f"hidden-{block:05d}.safetensors"
        save_tensors(self.folder / hidden_name, {f"hidden.{b}": h for b, h in enumerate(hidden)})
        self.done, self.layers = block + 1, self.layers + layers
        previous, self.hidden_file = self.hidden_file, hidden_name
        files = [f"block-{k:05d}.safetensors" for k in range(self.done)] + [hidden_name]
        record = {
            "kind": PROGRESS_KIND,
            "version": PROGRESS_VERSION,
            "key": self.key,
            "blocks_done": self.done,
            "hidden": hidden_name,
            "files": {f: (self.folder / f).stat().st_size for f in files},
            "hessians": hessians,
            "layers": [e.dump() for e in self.layers],
        }
        write_json(self.folder / PROGRESS_FILE, record, durable=True)
        if previous is not None:
            (self.folder / previous).unlink(missing_ok=True)
        self.commit_s += time.perf_counter() - t0

    def finish(self) -> dict[str, torch.Tensor]:
        """The statistics of every block, read back (not mapped: the small statistics kept from each block would
        otherwise keep its whole mapping resident to the end); the Hessians file gets its header. The progress
        files stay until the artifact is in place (SCRATCH, files.atomic_dir): a kill before that still resumes."""
        stats: dict[str, torch.Tensor] = {}
        for k in range(self.done):
            stats |= read_tensors(self.folder / f"block-{k:05d}.safetensors")
        if self.hessians is not None:
            self.hessians.close()
        return stats
