"""Perplexity as published: exp of the mean over non-overlapping windows of each window's mean token NLL.

The LM head and its log-softmax run a chunk of positions at a time where the model allows it, so that the
float32 logits [batch, seqlen, vocab] never exist whole (a 128k vocabulary makes them the largest tensor of
an eval).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stade_cli.base.console import progress
from stade_cli.base.errors import StadeError

MAX_EXP = math.log(1.7976931348623157e308)  # math.exp overflows above this (~709.78)


@dataclass
class PerplexityRun:
    ppl: float
    windows: int
    seqlen: int
    tokens: int  # tokens in the windows (windows * seqlen)
    window_nll: list[float] = field(repr=False, default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ppl": self.ppl,
            "mean_nll": sum(self.window_nll) / len(self.window_nll),
            "windows": self.windows,
            "seqlen": self.seqlen,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
        }


def cut_windows(ids: torch.Tensor, seqlen: int, source: str = "text") -> torch.Tensor:
    """ids [1, N] -> non-overlapping windows (n, seqlen); the remainder is dropped."""
    n = ids.shape[1] // seqlen
    if n < 1:
        raise StadeError(
            f"{source!r} has {ids.shape[1]} tokens, fewer than one window of {seqlen}.",
            "give a longer text, or a smaller --seqlen",
        )
    return ids[0, : n * seqlen].reshape(n, seqlen)


def window_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each window's seqlen-1 predicted tokens, in float32, one window at a time (bounded memory).

    logits (B, T, V), windows (B, T) -> (B,)
    """
    out = torch.empty(windows.shape[0], dtype=torch.float32)
    for b in range(windows.shape[0]):
        logp = torch.log_softmax(logits[b, :-1].float(), dim=-1)  # (T-1, V)
        picked = logp.gather(-1, windows[b, 1:, None].to(logp.device))  # (T-1, 1)
        out[b] = -picked.mean().cpu()
    return out


LOGITS_CHUNK = (
    256  # positions whose float32 log-probabilities exist at once: [chunk, vocab], not [batch, seqlen, vocab]
)


def _head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on some positions' final hidden states, with the output scaling some families apply."""
    head = model.get_output_embeddings()
    logits = head(hidden)
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)):
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    if isinstance(cap, (int, float)) and cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def chunked_nll(model: Any, windows: torch.Tensor, chunk: int = LOGITS_CHUNK) -> torch.Tensor:
    """Mean NLL of each window's seqlen-1 predicted tokens (B,), the head and log-softmax run `chunk` positions
    at a time, so neither the logits [B, T, V] nor their float32 log-softmax ever exist whole.
    A 128k vocabulary at 8 x 2048 tokens is 8 GB of float32 logits; a chunk of 256 is 128 MB per window.
    """
    hidden = model.get_decoder()(input_ids=windows, use_cache=False).last_hidden_state
    targets = windows[:, 1:]
    total = torch.zeros(windows.shape[0], dtype=torch.float64, device=hidden.device)
    steps = windows.shape[1] - 1
    for start in range(0, steps, chunk):
        end = min(start + chunk, steps)
        logp = torch.log_softmax(_head_logits(model, hidden[:, start:end]).float(), dim=-1)  # (B, c, V)
        picked = logp.gather(-1, targets[:, start:end, None].to(logp.device))[..., 0]
        total += picked.double().sum(1)
        del logp
    return (-total / steps).float().cpu()


def _chunks_agree(model: Any, windows: torch.Tensor) -> bool:
    """Whether the chunked route computes this model's own logits (checked once on a short prefix); a family
    that post-processes its logits in a way `_head_logits` does not know keeps the plain route."""
    try:
        if model.get_output_embeddings() is None:
            return False
        probe = windows[:1, : min(16, windows.shape[1])]
        hidden = model.get_decoder()(input_ids=probe, use_cache=False).last_hidden_state
        mine = _head_logits(model, hidden).float()
        theirs = model(input_ids=probe, use_cache=False).logits.float()
    except (AttributeError, TypeError, NotImplementedError):
        return False
    return mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3)


def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    description: str = "perplexity",
    label: str | None = None,
) -> PerplexityRun:
    """exp(mean over windows of mean token NLL); batching changes the speed, not the figure. `description` names
    the text in messages; `label` (default: it) is the progress bar's."""
    windows = cut_windows(ids, seqlen, description)  # (n, T)
    n = windows.shape[0]
    nlls: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode(), progress() as bar:
        task = bar.add_task(label or description, total=n, info="")
        chunked = _chunks_agree(model, windows.to(device))
        for start in range(0, n, batch_size):
            batch = windows[start : start + batch_size].to(device)  # (B, T)
            if chunked:
                nlls.extend(chunked_nll(model, batch).tolist())
            else:
                logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
                nlls.extend(window_nll(logits, batch).tolist())
                del logits
            rate = len(nlls) * seqlen / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=batch.shape[0], info=f"{rate:,.0f} tok/s")
    seconds = time.perf_counter() - t0
    mean_nll = sum(nlls) / n
    ppl = math.exp(mean_nll) if mean_nll < MAX_EXP else math.inf  # a broken model's NLL can pass exp's range
    return PerplexityRun(ppl=ppl, windows=n, seqlen=seqlen, tokens=n * seqlen, window_nll=nlls, seconds=seconds)
