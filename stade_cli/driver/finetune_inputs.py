"""What `stade finetune` needs before its first step, each refused before any expensive work where it is wrong: its
settings, the pruned checkpoint's mask (its zeros, cross-checked with its stade.json), the teacher's vocabulary,
and the training and held-out windows apart from the calibration windows (data/splits.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stade_cli.base.artifacts import MANIFEST_FILE, REPORT_FILE, DataRecord, PruneRecord, StatsManifest
from stade_cli.base.errors import StadeError, at_least
from stade_cli.base.files import read_json
from stade_cli.data.sources import calibration_windows, documents, is_token_file, load_token_file
from stade_cli.data.splits import Split, deal, text_split
from stade_cli.models.loading import resolve_model
from stade_cli.stages.finetune.hold import pattern_break
from stade_cli.stages.finetune.losses import LOSS_KINDS
from stade_cli.stages.pattern import Pattern, parse_pattern

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run's settings (docs/finetune.md)."""

    data: str
    teacher: str | None = None  # None: the LM loss alone
    loss: str | None = None  # kd, lm or mix; default kd with a teacher, lm without
    kd_weight: float | None = None  # of the KD term in `mix` (default 0.5)
    temperature: float = 1.0
    lora: int | None = None  # the adapters' rank; None: every kept weight trains
    lora_alpha: float | None = None
    max_steps: int | None = None
    tokens: int | None = None  # a training budget in tokens (all ranks)
    lr: float = 1e-4
    warmup: int = 0  # optimizer steps
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 4  # windows per forward pass, per rank
    grad_accum: int = 1
    seqlen: int | None = None  # default: the statistics' window length
    heldout: int = 16  # held-out windows
    eval_every: int = 50  # optimizer steps between held-out measurements
    save_every: int = 50  # optimizer steps between committed training states (--resume)
    patience: int | None = None  # held-out measurements without improvement before stopping early
    gradient_checkpointing: bool = False
    seed: int = 0

    @property
    def loss_kind(self) -> str:
        return self.loss or ("kd" if self.teacher else "lm")

    @property
    def weight(self) -> float:
        """The KD term's weight: 1 for kd, 0 for lm, --kd-weight (default 0.5) for mix."""
        return {"kd": 1.0, "lm": 0.0}.get(self.loss_kind, 0.5 if self.kd_weight is None else self.kd_weight)

    def check(self) -> None:
        if self.loss_kind not in LOSS_KINDS:
            raise StadeError(f"Unknown --loss {self.loss_kind!r}.", f"use one of {', '.join(LOSS_KINDS)}")
        if self.teacher is None and self.loss_kind != "lm":
            raise StadeError(f"--loss {self.loss_kind} needs a teacher, and --teacher is none.",
                             "give --teacher MODEL (the dense model), or --loss lm")  # fmt: skip
        if self.kd_weight is not None and (self.loss_kind != "mix" or not 0 <= self.kd_weight <= 1):
            raise StadeError(
                f"--kd-weight {self.kd_weight:g} is for --loss mix, in [0, 1].", "e.g. --loss mix --kd-weight 0.5"
            )
        for name, value in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum)):
            at_least(name, value, 1)
        for name, opt in (("--lora", self.lora), ("--max-steps", self.max_steps), ("--tokens", self.tokens)):
            if opt is not None:
                at_least(name, opt, 1)
        at_least("--heldout-windows", self.heldout, 1)
        at_least("--eval-every", self.eval_every, 1)
        at_least("--save-every", self.save_every, 1)
        if not self.lr > 0 or not self.temperature > 0:
            raise StadeError(
                f"--lr {self.lr:g} and --temperature {self.temperature:g} must be positive.", "e.g. --lr 1e-4"
            )

    def steps(self, seqlen: int, world: int, train_windows: int | None) -> int:
        """Optimizer steps: --max-steps, or the --tokens budget, or one pass over the training windows."""
        per_step = self.batch_size * self.grad_accum * world
        counts = [self.max_steps] if self.max_steps is not None else []
        if self.tokens is not None:
            if self.tokens < per_step * seqlen:
                raise StadeError(
                    f"--tokens {self.tokens} is less than one optimizer step, which takes {per_step * seqlen} tokens "
                    f"({per_step} windows of {seqlen}).",
                    "raise --tokens, or lower --batch-size, --grad-accum or --seqlen",
                )
            counts.append(self.tokens // (per_step * seqlen))
        if not counts and train_windows is not None:
            counts.append(max(train_windows // per_step, 1))
        return min(counts) if counts else 0


# ----------------------------------------------------------------------------------------------- the mask


def pruned_record(pruned: str) -> tuple[Path, PruneRecord]:
    """The checkpoint's folder and its stade.json; a model stade did not prune has no mask to keep."""
    folder = Path(resolve_model(pruned))
    if not (folder / REPORT_FILE).is_file():
        raise StadeError(
            f"{pruned!r} has no {REPORT_FILE}: it is not a checkpoint `stade prune` wrote, so it has no mask to keep.",
            "fine-tune a pruned checkpoint: stade prune MODEL --stats STATS --out PRUNED, then stade finetune PRUNED",
        )
    record = PruneRecord.load(read_json(folder / REPORT_FILE, "Pruning report"), str(folder / REPORT_FILE))
    if record.finetune is not None:
        raise StadeError(f"{pruned!r} is fine-tuned already (from {record.finetune.pruned!r}).",
                         "fine-tune the pruned checkpoint it came from, with a larger budget")  # fmt: skip
    return folder, record


def checkpoint_tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, read from the folder's safetensors files alone (not through transformers)."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            found.update({k: fh.get_tensor(k) for k in fh.keys() if k in names})  # noqa: SIM118
    return found


def read_mask(folder: Path, record: PruneRecord) -> tuple[dict[str, torch.Tensor], Pattern]:
    """Per pruned layer, True where a weight is kept: the checkpoint's nonzeros, checked against its stade.json
    (each layer's sparsity, and every N:M group)."""
    pattern = parse_pattern(record.pattern)
    names = [f"{r.name}.weight" for r in record.layers]
    tensors = checkpoint_tensors(folder, names)
    keeps: dict[str, torch.Tensor] = {}
    for r in record.layers:
        w = tensors.get(f"{r.name}.weight")
        if w is None or list(w.shape) != r.shape:
            raise StadeError(
                f"Layer {r.name} of {str(folder)!r} is not stored as a {r.shape} weight '{r.name}.weight'.",
                "stade finetune holds masks of plain linear layers (not fused experts); fine-tune another checkpoint",
            )
        zeros = w == 0
        measured = float(zeros.float().mean())
        broken = pattern_break(zeros, pattern)
        if abs(measured - r.sparsity) > 1e-4 or broken:
            raise StadeError(
                f"The zeros of {r.name} in {str(folder)!r} disagree with its {REPORT_FILE}: "
                + (broken or f"{measured:.4f} of the weights are zero, not {r.sparsity:.4f}")
                + ".",
                "the checkpoint was changed after pruning: prune again",
            )
        keeps[r.name] = ~zeros
    if not any(bool((~k).any()) for k in keeps.values()):
        raise StadeError(f"{str(folder)!r} has no pruned weight: there is no mask to keep.", "prune it first")
    return keeps, pattern


# ----------------------------------------------------------------------------------------------- teacher, data


def check_teacher(teacher: str, pruned: str) -> None:
    """A teacher must predict over the student's vocabulary (the same size, the same tokens)."""
    from transformers import AutoConfig, AutoTokenizer

    paths = {name: resolve_model(name) for name in (teacher, pruned)}
    sizes = {name: getattr(AutoConfig.from_pretrained(p), "vocab_size", None) for name, p in paths.items()}
    same = sizes[teacher] == sizes[pruned]
    if same:
        vocabs = [AutoTokenizer.from_pretrained(p).get_vocab() for p in paths.values()]
        same = vocabs[0] == vocabs[1]
    if not same:
        raise StadeError(
            f"Teacher {teacher!r} has another vocabulary than {pruned!r} ({sizes[teacher]} tokens, not "
            f"{sizes[pruned]}, or other tokens): its logits cannot teach it.",
            "give the dense model the checkpoint was pruned from, or --teacher none for the LM loss",
        )


def calibration_record(record: PruneRecord) -> tuple[DataRecord, str | None]:
    """The statistics' data (source, count, length, seed) and the hash of their windows, where the manifest is
    still there; otherwise what stade.json says, with seed 0."""
    ref = record.statistics
    manifest = Path(ref.path) / MANIFEST_FILE
    if manifest.is_file():
        m = StatsManifest.load(read_json(manifest, "Statistics manifest"), str(manifest))
        return m.data, m.whole_windows.drawn_sha256 or m.data.token_ids_sha256
    return DataRecord(source=ref.data, nsamples=ref.nsamples, seqlen=ref.seqlen, seed=0), None


def same_source(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def finetune_windows(
    config: FinetuneConfig, record: PruneRecord, tokenizer: PreTrainedTokenizerBase, cache_dir: str | None
) -> tuple[Split, int]:
    """The training and held-out windows, and their length."""
    cal, cal_sha = calibration_record(record)
    ours = same_source(config.data, cal.source)
    if is_token_file(config.data):
        if ours:
            raise StadeError(f"{config.data!r} is the statistics' own token-id file: every window of it is a "
                             "calibration window.", "give other text to fine-tune on")  # fmt: skip
        rows = load_token_file(Path(config.data).expanduser(), "[n, seqlen]")
        return deal(rows, config.heldout, config.seed, config.data), rows.shape[1]
    seqlen = config.seqlen or cal.seqlen
    at_least("--seqlen", seqlen, 2)
    docs = documents(config.data, "train", cache_dir)
    drawn = None
    notes = []
    if ours:
        drawn = calibration_windows(cal.source, tokenizer, cal.nsamples, cal.seqlen, cal.seed or 0, cache_dir, docs)
        if cal_sha is not None and drawn.sha256 != cal_sha:
            notes.append("the calibration windows could not be drawn again as they were (another tokenizer or text?):"
                         " some training windows may overlap them")  # fmt: skip
    split = text_split(docs, tokenizer, seqlen, config.heldout, config.seed, drawn)
    split.notes += notes
    return split, seqlen
