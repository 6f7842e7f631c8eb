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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from stade_cli.base.errors import StadeError, first_line
from stade_cli.base.shards import Part
from stade_cli.stats.accumulators import Moments

TIMEOUT_ENV = "STADE_DIST_TIMEOUT"  # seconds a collective waits for the other ranks
PEER_GONE = ("connection closed", "connection reset", "broken pipe", "peer")  # gloo's words for a rank that died
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

    def same_everywhere(self, digest: str, what: str, hint: str = "this is a bug in stade: please report it") -> None:
        """Refuse when the ranks disagree on `digest` (e.g. a pruned block's weights)."""
        import torch.distributed as dist

        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise StadeError(
                f"The ranks disagree on {what}: {', '.join(f'rank {r} {d[:12]}' for r, d in enumerate(digests) if d)}.",
                hint,
            )

    def same_command(self, args: list[str]) -> None:
        """Refuse, before any work, ranks started with different arguments (a --seed, --data or --hessian of their
        own): their statistics would be mixed silently, or their collectives would wait on each other forever."""
        import torch.distributed as dist

        every: list[list[str] | None] = [None] * self.world
        dist.all_gather_object(every, args)
        other = next(((r, a) for r, a in enumerate(every) if a is not None and a != every[0]), None)
        if other is not None:
            first = every[0] or []
            i = next((i for i, (a, b) in enumerate(zip(first, other[1], strict=False)) if a != b), len(first))
            ours, theirs = (repr(" ".join(a[i : i + 2])) if a[i:] else "nothing more" for a in (first, other[1]))
            raise StadeError(
                f"The ranks were started with different arguments: where rank 0 has {ours}, rank {other[0]} has "
                f"{theirs}.",
                "start every rank with the same command line",
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
        with exit_when_stuck():
            group = Group(rank, world, backend)
            group.same_command(sys.argv[1:])
            yield group
    except StadeError as exc:
        raise StadeError(f"rank {rank} of {world}: {exc.message}", exc.hint) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        text = str(exc).lower()
        if "timed out" in text or "timeout" in text:
            raise StadeError(
                f"rank {rank} of {world}: a collective waited more than {seconds} s for the other ranks.",
                f"another rank failed or hangs: see its error; raise {TIMEOUT_ENV} for very slow blocks",
            ) from None
        if any(word in text for word in PEER_GONE):
            raise StadeError(
                f"rank {rank} of {world}: another rank stopped mid-run ({first_line(exc)}).",
                "see that rank's own error above; this rank has stopped too",
            ) from None
        from stade_cli.base.console import err

        err.print(f"[bold red]rank {rank} of {world} failed:[/] {type(exc).__name__}", highlight=False)
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def exit_when_stuck(grace_s: float = 3.0) -> Iterator[None]:
    """SIGTERM or Ctrl-C must end a rank even while it waits in a collective, where Python runs no signal handler
    (the wait is in the backend's C++). A watcher thread learns of the signal from the wakeup descriptor, and if
    the main thread has not ended `grace_s` later, it says so and exits the process (143, or 130)."""
    import signal
    import threading

    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            got = os.read(read, 1)
            if done.is_set() or got[:1] not in (bytes([signal.SIGTERM]), bytes([signal.SIGINT])):
                continue
            if done.wait(grace_s):
                return
            code = 143 if got[0] == signal.SIGTERM else 130
            sys.stderr.write(f"Stopped ({'SIGTERM' if code == 143 else 'Ctrl-C'}) while waiting for the other ranks.\n")
            os._exit(code)

    thread = threading.Thread(target=watch, name="stade-signal-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous)
        os.write(write, b"\0")  # wakes the watcher, which sees `done`
        thread.join(timeout=1)
        os.close(read)
        os.close(write)


def cuda_device_for(device: torch.device) -> torch.device:
    """Under torchrun, each rank on its own GPU (LOCAL_RANK), whatever `--device cuda` said."""
    if launched() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
