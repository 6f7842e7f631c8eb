"""The eval stage: perplexity as published, zero-shot accuracy through lm_eval, one results artifact."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stade_cli.base.artifacts import (
    REPORT_FILE,
    EvalSettings,
    ModelRecord,
    PerplexityResult,
    PruneRecord,
    Results,
    ZeroShot,
)
from stade_cli.base.dtypes import dtype_name
from stade_cli.base.errors import StadeError, at_least, named_once
from stade_cli.base.files import check_writable, read_json, write_json
from stade_cli.base.versions import library_versions
from stade_cli.evaluation.perplexity import perplexity
from stade_cli.evaluation.zeroshot import LIMIT_HINT, LoadedTasks, load_tasks, parse_tasks, resolve_tasks, zero_shot
from stade_cli.models.dispatch import placement
from stade_cli.models.experts import ExpertLayer, prunable_layers
from stade_cli.models.fingerprint import fingerprint
from stade_cli.models.layers import find_blocks, get_weight
from stade_cli.models.loading import LoadedModel, check_seqlen, config_summary, default_seqlen, vocab_size
from stade_cli.models.weights import WeightFiles, file_samples

C4_MAX_WINDOWS = 256  # the published code keeps the first 256 * seqlen validation tokens of C4
DEFAULT_PPL = ("wikitext2",)
SPECIAL_TOKENS = 8  # BOS, EOS, a leading-space piece: more than any tokenizer adds to a text


@dataclass(frozen=True)
class EvalConfig:
    ppl: tuple[str, ...] = DEFAULT_PPL
    tasks: tuple[str, ...] = ()  # zero-shot is asked for (`--tasks paper` for the published seven)
    seqlen: int | None = None  # None: min(model context, 2048), as published
    batch_size: int = 8
    limit: int | None = None
    max_windows: int | None = None  # None: every window, as published

    def __post_init__(self) -> None:
        at_least("--seqlen", self.seqlen, 2)
        at_least("--batch-size", self.batch_size, 1)
        at_least("--limit", self.limit, 1, LIMIT_HINT)
        at_least("--max-windows", self.max_windows, 1)
        if not self.ppl and not self.tasks:
            raise StadeError("Nothing to evaluate: no --ppl datasets and no --tasks.", "give at least one of them")

    @classmethod
    def from_strings(cls, ppl: str | None, tasks: str | None, **kwargs: Any) -> EvalConfig:
        """The CLI form: comma-separated lists; 'none' or empty turns a part off."""
        ppl_list = DEFAULT_PPL if ppl is None else tuple(p.strip() for p in ppl.split(",") if p.strip())
        if ppl_list == ("none",):
            ppl_list = ()
        named_once("--ppl", ppl_list)
        return cls(ppl=ppl_list, tasks=parse_tasks(tasks), **kwargs)


# ----------------------------------------------------------------------------------------------- perplexity


def dataset_perplexity(
    loaded: LoadedModel,
    source: str,
    seqlen: int,
    batch_size: int,
    device: torch.device,
    cache_dir: str | None = None,
    max_windows: int | None = None,
) -> PerplexityResult:
    """Perplexity of one --ppl source, with where its ids came from."""
    from stade_cli.data.sources import check_token_ids, eval_ids, ids_sha256

    ids, sha = eval_ids(source, loaded.tokenizer, cache_dir)
    check_token_ids(ids, vocab_size(loaded.model), source)
    notes = []
    if source == "c4":
        ids = ids[:, : C4_MAX_WINDOWS * seqlen]
        notes.append(f"first {C4_MAX_WINDOWS} x seqlen validation tokens, as published")
    if max_windows is not None and ids.shape[1] > max_windows * seqlen:
        ids = ids[:, : max_windows * seqlen]
        notes.append(f"first {max_windows} windows only (--max-windows): not the published protocol")
    result = perplexity(loaded.model, ids, seqlen, batch_size, device, source, f"{loaded.short_name} · {source}")
    return PerplexityResult(
        **result.to_dict(), source_sha256=sha, ids_sha256=ids_sha256(ids), batch_size=batch_size, notes=notes or None
    )


def prepare(config: EvalConfig, cache_dir: str | None = None) -> tuple[LoadedTasks | None, int | None]:
    """Load every zero-shot task and every perplexity source before any model runs: a task or dataset that
    cannot be had (offline, a typo) fails in seconds, not after the first model's perplexity.

    Also returns, for the plan, a bound on the tokens of the longest --ppl text (None with zero-shot tasks, whose
    rows lm_eval batches): a batch holds no more windows than that text makes. A token covers at least one byte of
    its text, so a text of B bytes makes at most B + SPECIAL_TOKENS tokens."""
    from stade_cli.data.sources import documents, is_token_file, load_token_file

    ready = load_tasks(resolve_tasks(config.tasks, check_names=False)) if config.tasks else None
    most = 0
    for source in config.ppl:
        if is_token_file(source):
            most = max(most, load_token_file(Path(source).expanduser(), "[1, N]").shape[1])
        else:
            docs = documents(source, "validation" if source == "c4" else "test", cache_dir)
            most = max(most, len(docs.joiner.join(docs.texts).encode("utf8")) + SPECIAL_TOKENS)
    return ready, (None if config.tasks else most)


# ----------------------------------------------------------------------------------------------- model facts


def prune_report(path: str) -> PruneRecord | None:
    """The `stade.json` a pruned folder carries, checked; None for a model `stade prune` did not write."""
    report_path = Path(path) / REPORT_FILE
    if not report_path.is_file():
        return None
    data = read_json(report_path, "Pruning report")
    if data.get("kind") != PruneRecord.KIND:
        raise StadeError(
            f"{str(report_path)!r} is not a stade pruning report (kind {data.get('kind')!r}).",
            "remove or rename it, or re-run `stade prune`",
        )
    return PruneRecord.load(data, str(report_path))


def measured_sparsity(model: nn.Module, files: WeightFiles | None = None) -> float:
    """Fraction of exact zeros over the weights of every linear layer and expert in the decoder blocks.

    `files`: where weights that accelerate left on disk (meta here) are read from, one at a time.
    """
    zeros = total = 0
    name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for local, layer in prunable_layers(block).items():
            w = get_weight(layer)
            if w.is_meta and files is not None:
                if isinstance(layer, ExpertLayer):  # an expert's slice of its fused tensor, stored by that name
                    key = f"{name}.{i}.{local.rsplit('.', 2)[0]}.{layer.param}"
                    if key not in files.file_of:
                        continue
                    w = files.read([key], w.dtype)[key][layer.index]
                else:
                    key = f"{name}.{i}.{local}.weight"
                    w = files.read([key], w.dtype)[key]
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


def _offloaded_files(loaded: LoadedModel) -> WeightFiles | None:
    """The checkpoint's files where accelerate left some weights on disk (meta here); None where none are."""
    model = loaded.model
    offloaded = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if not offloaded:
        return None
    files = WeightFiles.find(loaded.path, loaded.cache_dir)
    tied = {n for n, _p in model.named_parameters(remove_duplicate=False)} - {n for n, _p in model.named_parameters()}
    if files is None or any(n not in files.file_of and n not in tied for n in offloaded):
        raise StadeError(
            f"Part of {loaded.spec!r} was left on disk by --max-memory, and its checkpoint is not safetensors "
            "under the model's own names, so its fingerprint cannot be taken.",
            "raise --max-memory so that the model fits in memory",
        )
    return files


def _fingerprint(loaded: LoadedModel, files: WeightFiles | None) -> str:
    """fingerprint(model); weights left on disk are sampled from the files (a tied copy from its source)."""
    if files is None:
        return fingerprint(loaded.model)
    meta = [n for n, p in loaded.model.named_parameters(remove_duplicate=False) if p.is_meta]
    return fingerprint(loaded.model, file_samples(loaded.model, files, meta))


def model_record(loaded: LoadedModel) -> ModelRecord:
    """The evaluated model: where it is, its dtype and identity, its measured sparsity and architecture."""
    files = _offloaded_files(loaded)
    return ModelRecord(
        spec=loaded.spec,
        path=loaded.path,
        dtype=dtype_name(loaded.dtype),
        fingerprint=_fingerprint(loaded, files),
        measured_sparsity=measured_sparsity(loaded.model, files),
        **config_summary(loaded.model),
    )


# ----------------------------------------------------------------------------------------------- the stage


def evaluate_model(
    loaded: LoadedModel,
    config: EvalConfig,
    device: torch.device,
    cache_dir: str | None = None,
    tasks: LoadedTasks | None = None,
) -> Results:
    """Perplexity on every config.ppl source, then zero-shot on config.tasks; the results document.

    `tasks`: the config's tasks from `prepare` (loaded once for many models); None loads them here, first.
    """
    t_start = time.perf_counter()
    model = loaded.model
    seqlen = config.seqlen or default_seqlen(model)
    check_seqlen(model, seqlen)
    if config.tasks and tasks is None:
        tasks = load_tasks(resolve_tasks(config.tasks, check_names=False))  # a task that cannot load fails first
    report = prune_report(loaded.path)
    settings = EvalSettings(
        ppl=list(config.ppl),
        tasks=list(config.tasks),
        seqlen=seqlen,
        batch_size=config.batch_size,
        limit=config.limit,
        max_windows=config.max_windows,
    )
    results = Results(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=model_record(loaded),
        pruning=report,
        method=report.method if report else "dense",
        pattern=report.pattern if report else None,
        sparsity=report.sparsity if report else 0.0,
        achieved_sparsity=report.achieved_sparsity if report else 0.0,
        device=str(device),
        config=settings,
        versions=library_versions(),
    )
    spread = placement(model)
    if spread is None:
        module: nn.Module = model  # PreTrainedModel.to is wrapped by functools.wraps, whose stub leaves self unbound
        module.to(device)
    else:  # accelerate placed the layers and moves activations (and offloaded weights) between devices
        results.device = f"device_map: {spread}"
    for source in config.ppl:
        entry = dataset_perplexity(loaded, source, seqlen, config.batch_size, device, cache_dir, config.max_windows)
        results.perplexity[source] = entry
        results.timings[f"ppl:{source}"] = entry.seconds
    if config.tasks and tasks is not None:
        t0 = time.perf_counter()
        results.zeroshot = ZeroShot(**zero_shot(loaded, tasks, config.batch_size, config.limit))
        results.timings["zeroshot"] = round(time.perf_counter() - t0, 3)
    else:
        results.zeroshot = ZeroShot(limit=config.limit)
    results.timings["total"] = round(time.perf_counter() - t_start, 3)
    return results


def evaluate_spec(
    spec: str,
    config: EvalConfig,
    device: torch.device,
    cache_dir: str | None,
    tasks: LoadedTasks | None,
    dtype: str | None = None,
    max_memory: str | None = None,
    spread: bool = False,
) -> Results:
    """Load MODEL (spread over the devices within `max_memory` where `spread`, the rest read from disk as it
    runs), evaluate it, and free it before the next one loads."""
    import tempfile

    from stade_cli.models.dispatch import dispatch_kwargs
    from stade_cli.models.loading import load_model

    with tempfile.TemporaryDirectory(prefix="stade-offload-") as offload:
        dispatch = dispatch_kwargs(max_memory, offload) if spread else None
        loaded = load_model(spec, dtype, device, cache_dir, dispatch=dispatch)
        return evaluate_model(loaded, config, device, cache_dir, tasks)


def results_paths(models: list[str], out: Path) -> list[Path]:
    """`out` itself for one model; for several, out/NAME.json with NAME each model's folder name or hub id."""
    if len(models) == 1:
        if out.is_dir():  # found before the evaluation, not after it (--force cannot make a folder a file)
            raise StadeError(
                f"--out {str(out)!r} is a folder; for one model it names the results file.",
                f"give a file name, e.g. --out {str(out / 'results.json')!r}",
            )
        return [out]
    if out.exists() and not out.is_dir():
        raise StadeError(
            f"--out {str(out)!r} is a file, but {len(models)} models need a folder (one results file each).",
            "give a folder, e.g. --out results/",
        )
    names = [Path(m.rstrip("/")).name or m for m in models]
    seen: dict[str, str] = {}
    for model, name in zip(models, names, strict=True):
        if name in seen:
            raise StadeError(
                f"{seen[name]!r} and {model!r} would both write {name}.json.", "evaluate them with separate --out"
            )
        seen[name] = model
    return [out / f"{name}.json" for name in names]


def write_results(path: str | Path, results: Results, force: bool = False) -> Path:
    """Write results.json atomically; an existing file stays unless force."""
    path = Path(path)
    check_writable(path, force)
    if path.is_dir():
        raise StadeError(f"Output {str(path)!r} is a folder.", "give a file name such as results.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, results.dump())
    return path


def load_results(path: str | Path) -> Results:
    """One results file, checked (compare's reader too)."""
    path = Path(path)
    return Results.load(read_json(path, "Results file"), str(path))
