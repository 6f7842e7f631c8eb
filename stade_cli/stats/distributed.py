"""Running under torchrun: the ranks split the calibration windows and merge their statistics exactly.

Each rank accumulates its own contiguous range of windows (the same split as `--shard`). After each
block, the ranks exchange their accumulators with collectives: count, mean and m2 are all-gathered and
Chan-merged in rank order in float64 (Chan, Golub & LeVeque 1979), so every rank gets the same bytes; the
Hessians' raw sums are all-reduced in float64, in which the sum of a few float32 values is exact, hence
independent of the reduction order. `gloo` serves CPUs, `nccl` GPUs. Only rank 0 draws progress and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from stade_cli.base.errors import StadeError
from stade_cli.base.shards import Part
from stade_cli.stats.accumulators import Moments

TIMEOUT_ENV = "STADE_DIST_TIMEOUT"  # seconds a collective waits for the other ranks
DEFAULT_TIMEOUT_S = 1800


@dataclass
class Group:
    """This process's place among the ranks of a torchrun job, and the time spent in its collectives."""

    rank: int
    world: int
    backend: str
    collective_s: float = field(default=0.0, compare=False)  # exchanging statistics
    wait_s: float = field(default=0.0, compare=False)  # waiting at each block for the slowest rank

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> Part:
        """This rank's part of the windows: the same split as --shard."""
        return Part(self.rank, self.world)

    def gather_moments(self, m: Moments) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Every rank's (count, mean, m2), in rank order."""
        import torch.distributed as dist

        dev = self.device(m.mean.device)
        packed = torch.cat([torch.tensor([float(m.count)], dtype=torch.float64), m.mean.cpu(), m.m2.cpu()]).to(dev)
        parts = [torch.empty_like(packed) for _ in range(self.world)]
        dist.all_gather(parts, packed)
        dim = m.mean.numel()
        return [(int(p[0].item()), p[1 : 1 + dim].cpu(), p[1 + dim :].cpu()) for p in parts]

    def merge_moments(self, m: Moments) -> None:
        """Replace `m` by the Chan merge of every rank's accumulator, in rank order (the same on every rank)."""
        total = Moments(m.mean.numel(), m.mean.device)
        for count, mean, m2 in self.gather_moments(m):
            if count:
                total.merge(count, mean.to(m.mean.device), m2.to(m.mean.device))
        m.count, m.mean, m.m2 = total.count, total.mean, total.m2

    def sum_hessian(self, total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
        """The ranks' raw sums x^T x added in float64, and their token counts."""
        import torch.distributed as dist

        dev = self.device(total.device)
        s = total.to(dev, torch.float64)
        n = torch.tensor([count], dtype=torch.float64, device=dev)
        dist.all_reduce(s)
        dist.all_reduce(n)
        return s.to(total.device), int(n.item())

    def merge_collector(self, collector: Any) -> None:
        """Every group's statistics in `collector` (a BlockCollector, or a LayerCollector's linear layers)
        become those of all ranks' windows."""
        experts = getattr(collector, "experts", None)
        if experts is not None and experts.layers:
            raise StadeError(
                "Mixture-of-experts blocks are not supported under torchrun yet: the ranks' experts see different "
                "tokens.",
                "calibrate or prune this model as a single process, or with --shard I/N and `stade stats merge`",
            )
        collector = getattr(collector, "linear", collector)
        t0 = time.perf_counter()
        self.barrier()  # the wait for the slowest rank is not the collectives' own cost
        wait = time.perf_counter() - t0
        self.wait_s += wait
        for name in sorted(collector.moments):
            self.merge_moments(collector.moments[name])
            if name in collector.hessians:
                h = collector.hessians[name]
                s, n = self.sum_hessian(h.sum, h.count)
                h.sum, h.count = s.float(), n  # a float64 sum of float32 partial sums, rounded once
        self.collective_s += time.perf_counter() - t0 - wait

    def device(self, fallback: torch.device) -> torch.device:
        """Where collectives' tensors must live: the rank's GPU for nccl, the CPU for gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def same_everywhere(self, digest: str, what: str) -> None:
        """Refuse when the ranks disagree on `digest` (e.g. a pruned block's weights)."""
        import torch.distributed as dist

        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise StadeError(
                f"The ranks disagree on {what}: {', '.join(f'rank {r} {d[:12]}' for r, d in enumerate(digests) if d)}.",
                "this is a bug in stade: please report it",
            )

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def rank_windows(ids: torch.Tensor, group: Group | None) -> torch.Tensor:
    """This rank's contiguous range of the windows (all of them for a single process)."""
    if group is None:
        return ids
    start, stop = group.part.take(ids.shape[0], "rank")
    return ids[start:stop]


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> int:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    if not raw.isdigit() or int(raw) < 1:
        raise StadeError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds.", f"e.g. {TIMEOUT_ENV}=600")
    return int(raw)


@contextlib.contextmanager
def group_for(device: torch.device) -> Iterator[Group | None]:
    """The process group of this torchrun job (None for a single process), torn down at the end.

    An error on one rank is re-raised naming that rank; a collective that waits longer than
    STADE_DIST_TIMEOUT seconds for a rank that failed or hangs raises instead of hanging forever.
    """
    if not launched():
        yield None
        return
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
    seconds = timeout_s()
    dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    try:
        yield Group(rank, world, backend)
    except StadeError as exc:
        raise StadeError(f"rank {rank} of {world}: {exc.message}", exc.hint) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise StadeError(
                f"rank {rank} of {world}: a collective waited more than {seconds} s for the other ranks.",
                f"another rank failed or hangs: see its error; raise {TIMEOUT_ENV} for very slow blocks",
            ) from None
        from stade_cli.base.console import err

        err.print(f"[bold red]rank {rank} of {world} failed:[/] {type(exc).__name__}", highlight=False)
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def cuda_device_for(device: torch.device) -> torch.device:
    """Under torchrun, each rank on its own GPU (LOCAL_RANK), whatever `--device cuda` said."""
    if launched() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
