"""Zero-shot accuracy through stock lm-evaluation-harness, plus a built-in offline cloze task.

The cloze task (`stade_cloze`) is built deterministically from the real held-out news text: a sentence's
beginning is the context, its true last words the right ending, and three endings of other sentences
(drawn with a fixed seed) the wrong ones. It is written once as JSON lines plus an lm_eval task YAML
under $STADE_HOME/tasks, and runs through lm_eval like any other local task.
"""

from __future__ import annotations

import difflib
import json
import logging
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stade_cli.base.console import progress
from stade_cli.base.errors import StadeError, at_least, library_errors, named_once
from stade_cli.base.files import made_once

if TYPE_CHECKING:
    from collections.abc import Iterator

    from stade_cli.models.loading import LoadedModel

BUILTIN_TASK = "stade_cloze"
CLOZE_VERSION = 1
CLOZE_SEED = 0
CLOZE_ITEMS = 400
CLOZE_CHOICES = 4
LIMIT_HINT = "it is the number of items per task"
PUBLISHED_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASK_PRESETS = {"paper": PUBLISHED_TASKS}  # --tasks paper: the seven zero-shot tasks the papers report
REPORTED_RESULTS = ("acc", "acc_norm")  # of lm_eval's metrics, the results stade keeps
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: endings
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


# ----------------------------------------------------------------------------------------------- the cloze task


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _usable(sentence: str) -> bool:
    words = sentence.split()
    return 10 <= len(words) <= 40 and sentence[-1] in ".!?" and sentence.isascii()


def _cut(sentence: str) -> tuple[str, str]:
    """Context and true ending: the last third of the words (3 to 8 of them) is the ending."""
    words = sentence.split()
    k = min(8, max(3, len(words) // 3))
    return " ".join(words[:-k]), " ".join(words[-k:])


def cloze_items(stories: list[str], n: int = CLOZE_ITEMS, seed: int = CLOZE_SEED) -> list[dict[str, Any]]:
    """Up to n multiple-choice items {context, endings, label}; the same stories and seed give the same items."""
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for story in stories:
        for sentence in split_sentences(story):
            if _usable(sentence) and sentence not in seen:
                seen.add(sentence)
                pairs.append(_cut(sentence))
    if len(pairs) < CLOZE_CHOICES:
        raise StadeError(f"Only {len(pairs)} usable sentences for the cloze task; {CLOZE_CHOICES} are needed.")
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(len(pairs)), min(n, len(pairs))))
    items = []
    for i in picks:
        context, ending = pairs[i]
        others = [j for j in rng.sample(range(len(pairs)), CLOZE_CHOICES + 2) if pairs[j][1] != ending]
        endings = [ending] + [pairs[j][1] for j in others[: CLOZE_CHOICES - 1]]
        rng.shuffle(endings)
        items.append({"context": context, "endings": endings, "label": endings.index(ending)})
    return items


def builtin_task_dir() -> Path:
    """The folder holding the cloze task's YAML and data, written on first use."""
    from stade_cli.base.home import stade_home
    from stade_cli.data.sources import builtin_documents

    folder = stade_home() / "tasks" / f"{BUILTIN_TASK}-v{CLOZE_VERSION}"
    if (folder / f"{BUILTIN_TASK}.yaml").exists():
        return folder
    items = cloze_items([t.strip() for t in builtin_documents("sample-news").texts])
    with made_once(folder, f"{BUILTIN_TASK}.yaml") as tmp:
        if tmp is None:
            return folder
        with open(tmp / "items.jsonl", "w", encoding="utf8") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
        # Paths in the YAML point at the final folder, which exists once the block ends (JSON quoting is YAML).
        yaml = TASK_YAML.format(
            task=BUILTIN_TASK,
            data=json.dumps(str(folder / "items.jsonl")),
            cache=json.dumps(str(folder / "hf-cache")),
            version=CLOZE_VERSION,
        )
        (tmp / f"{BUILTIN_TASK}.yaml").write_text(yaml)
    return folder


# ----------------------------------------------------------------------------------------------- resolving tasks


@dataclass(frozen=True)
class TaskSpec:
    """A task as lm_eval knows it: its name, and a folder to index for local YAMLs (None: lm_eval's own)."""

    name: str
    include_path: str | None = None


def parse_tasks(value: str | None) -> tuple[str, ...]:
    """`--tasks`: comma-separated names, YAML paths or presets ('paper'); None, empty or 'none': no zero-shot."""
    if value is None:
        return ()
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    if names in ((), ("none",)):
        return ()
    named_once("--tasks", names)
    expanded = [task for name in names for task in TASK_PRESETS.get(name, (name,))]
    return tuple(dict.fromkeys(expanded))  # in order, each once (a preset may hold a task also named)


def _yaml_task(path: Path) -> TaskSpec:
    import yaml

    if not path.is_file():
        raise StadeError(f"Task file {str(path)!r} does not exist.", "check the path")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise StadeError(f"Task file {str(path)!r} is not readable YAML: {exc}") from None
    name = config.get("task") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise StadeError(f"Task file {str(path)!r} has no 'task:' name.", "an lm_eval task YAML names its task")
    return TaskSpec(name, str(path.resolve().parent))


def resolve_tasks(names: tuple[str, ...], check_names: bool = True) -> list[TaskSpec]:
    """Map names and YAML paths to tasks, checking that lm_eval knows every name (close matches listed).

    `check_names=False` leaves that check to `load_tasks`, which indexes lm_eval's tasks anyway (a minute).
    """
    specs: list[TaskSpec] = []
    hub: list[str] = []
    for name in names:
        if name.lower().endswith((".yaml", ".yml")):
            specs.append(_yaml_task(Path(name).expanduser()))
        elif name == BUILTIN_TASK:
            specs.append(TaskSpec(name, str(builtin_task_dir())))
        else:
            specs.append(TaskSpec(name))
            hub.append(name)
    if hub and check_names:
        with quiet_lm_eval():
            from lm_eval.tasks import TaskManager

            _check_names(hub, set(TaskManager().all_tasks))
    return specs


def _check_names(names: list[str], known: set[str]) -> None:
    known = known | {BUILTIN_TASK}
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "run `lm_eval ls tasks` for the names"
            raise StadeError(f"Unknown lm_eval task {name!r}.", hint)


@dataclass
class LoadedTasks:
    """Tasks built by lm_eval, datasets downloaded: what a run needs, loaded once before any model is evaluated."""

    specs: list[TaskSpec]
    objects: list[Any]  # lm_eval Task / Group objects, in the order asked
    manager: Any


def load_tasks(specs: list[TaskSpec]) -> LoadedTasks:
    """Build every task and fetch its data now, so that a task that cannot load fails before hours of work."""
    with quiet_lm_eval(), silent_harness():  # building a task reads its data: no tqdm bars on stderr
        from lm_eval.tasks import TaskManager

        paths = sorted({t.include_path for t in specs if t.include_path})
        only_local = all(t.include_path for t in specs)
        manager = TaskManager(include_path=paths or None, include_defaults=not only_local)
        _check_names([t.name for t in specs if t.include_path is None], set(manager.all_tasks))
        objects: list[Any] = []
        for spec in specs:
            try:
                built = manager.load(spec.name)
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                hub = spec.include_path is None
                raise StadeError(
                    f"Could not load zero-shot task {spec.name!r}: {first}",
                    f"hub tasks need the internet; offline, use --tasks {BUILTIN_TASK} or a local task YAML"
                    if hub
                    else "check the task YAML and the data files it names",
                ) from None
            groups, tasks = built.get("groups", {}), built.get("tasks", {})
            top = groups.get(spec.name) or tasks.get(spec.name)
            objects.extend([top] if top is not None else list(tasks.values()))  # a tag: its tasks
    return LoadedTasks(specs, objects, manager)


# ----------------------------------------------------------------------------------------------- running


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm_eval and datasets log a page per task; keep only their warnings and errors."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextmanager
def silent_harness() -> Iterator[None]:
    """No stray lines on stderr while lm_eval runs: it asks `git describe` for the current folder (which prints
    `fatal: not a git repository` outside one) and draws tqdm bars, as does datasets when it reads a task's
    JSON; stade's own progress bar counts the requests instead. Restored afterwards."""
    import functools
    import importlib

    evaluator: Any = importlib.import_module("lm_eval.evaluator")
    task: Any = importlib.import_module("lm_eval.api.task")
    ds_logging: Any = importlib.import_module("datasets.utils.logging")
    tqdm = importlib.import_module("tqdm").tqdm
    saved = (evaluator.get_git_commit_hash, task.tqdm, ds_logging.is_progress_bar_enabled())
    evaluator.get_git_commit_hash = lambda: None
    task.tqdm = functools.partial(tqdm, disable=True)
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, task.tqdm = saved[0], saved[1]
        if saved[2]:
            ds_logging.enable_progress_bar()


def _result(row: dict[str, Any], name: str) -> tuple[float | None, float | None]:
    value = row.get(f"{name},none", row.get(name))
    stderr = row.get(f"{name}_stderr,none", row.get(f"{name}_stderr"))
    as_float = lambda x: float(x) if isinstance(x, int | float) else None  # noqa: E731 ("N/A" stderr)
    return as_float(value), as_float(stderr)


def _with_progress(hflm: type, label: str) -> type:
    """lm_eval's HF wrapper with its loglikelihood requests counted on a Rich bar instead of tqdm's,
    which would print a line per update through stade's own progress display."""

    class ProgressLM(hflm):
        _bar: tuple[Any, Any] | None = None

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            with progress() as bar:
                task = bar.add_task(label, total=len(requests), info="requests")
                self._bar = (bar, task)
                try:
                    return super().loglikelihood(requests, disable_tqdm=True)
                finally:
                    bar.update(task, completed=len(requests))
                    self._bar = None

        def _model_call(self, inps: Any, *args: Any, **kwargs: Any) -> Any:
            logits = super()._model_call(inps, *args, **kwargs)
            if self._bar is not None:  # rows of a batch; requests sharing a context may share a row
                self._bar[0].advance(self._bar[1], inps.shape[0])
            return logits

    return ProgressLM


def zero_shot(
    loaded: LoadedModel, tasks: list[TaskSpec] | LoadedTasks, batch_size: int = 8, limit: int | None = None
) -> dict[str, Any]:
    """Run the tasks 0-shot on the in-memory model through lm_eval's HF wrapper; acc, acc_norm and means."""
    at_least("--limit", limit, 1, LIMIT_HINT)
    ready = tasks if isinstance(tasks, LoadedTasks) else load_tasks(tasks)
    tasks = ready.specs
    with quiet_lm_eval():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        progress_lm = _with_progress(HFLM, f"{loaded.short_name} · zero-shot")
        lm = progress_lm(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        with (
            library_errors(
                f"lm_eval could not run {', '.join(t.name for t in tasks)}",
                f"hub tasks need the internet; offline, use --tasks {BUILTIN_TASK} or a local task YAML",
            ),
            silent_harness(),
        ):
            raw = simple_evaluate(
                model=lm,
                tasks=list(ready.objects),
                num_fewshot=0,
                limit=limit,
                task_manager=ready.manager,
                log_samples=False,
                bootstrap_iters=1000,
            )
    return summarize(raw, [t.name for t in tasks], limit)


def summarize(raw: dict[str, Any], names: list[str], limit: int | None) -> dict[str, Any]:
    """lm_eval's results reduced to what stade reports: per task acc/acc_norm (+ stderr), version, items."""
    out: dict[str, Any] = {}
    for name in names:
        row = raw["results"].get(name, {})
        entry: dict[str, Any] = {}
        for result in REPORTED_RESULTS:
            value, stderr = _result(row, result)
            if value is not None:
                entry[result] = value
                entry[f"{result}_stderr"] = stderr
        samples = raw.get("n-samples", {}).get(name, {})
        entry["items"] = samples.get("effective")
        entry["version"] = raw.get("versions", {}).get(name)
        out[name] = entry
    means = {}
    for result in REPORTED_RESULTS:
        values = [e[result] for e in out.values() if result in e]
        if values:
            means[result] = sum(values) / len(values)
    return {"tasks": out, "mean": means, "num_fewshot": 0, "limit": limit}
