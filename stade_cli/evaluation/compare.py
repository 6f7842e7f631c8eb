"""The compare stage: results files -> one table of methods x results, best values and deltas to the dense model."""

from __future__ import annotations

import csv
import difflib
import io
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stade_cli.base.artifacts import Results
from stade_cli.base.errors import StadeError
from stade_cli.base.files import read_json
from stade_cli.base.registry import Registry
from stade_cli.evaluation.evaluate import load_results

COMPARISON_KIND = "stade-comparison"


# ----------------------------------------------------------------------------------------------- result registry


@dataclass(frozen=True)
class ResultKind:
    name: str
    label: str
    higher_is_better: bool
    extract: Callable[[Results], dict[str, float]]  # results -> {dataset or task: value}

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


RESULT_KINDS: Registry[ResultKind] = Registry("result", "--sort")


def register_result(name: str, label: str, higher_is_better: bool) -> Callable[[Callable], Callable]:
    """Register how to read a kind of result out of results.json, and which way is better (lm_eval's convention)."""
    return RESULT_KINDS.register(name, lambda fn: ResultKind(name, label, higher_is_better, fn))


def _task_result(results: Results, name: str) -> dict[str, float]:
    zs = results.zeroshot
    values = {t: e[name] for t, e in zs.tasks.items() if isinstance(e.get(name), int | float)}
    mean = zs.mean.get(name)
    if values and isinstance(mean, int | float):
        values["mean"] = mean
    return values


@register_result("ppl", "ppl", higher_is_better=False)
def _ppl(results: Results) -> dict[str, float]:
    return {d: e.ppl for d, e in results.perplexity.items()}


@register_result("acc", "acc", higher_is_better=True)
def _acc(results: Results) -> dict[str, float]:
    return _task_result(results, "acc")


@register_result("acc_norm", "acc_norm", higher_is_better=True)
def _acc_norm(results: Results) -> dict[str, float]:
    # Per task acc_norm would double the table's width; its mean rides along with acc's.
    values = _task_result(results, "acc_norm")
    return {"mean": values["mean"]} if "mean" in values else {}


# ----------------------------------------------------------------------------------------------- loading


def results_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given (each must be results), and the results files inside folders (other JSON skipped)."""
    paths = list(paths)
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # a folder may hold other JSON (a pruned model's config.json, stade.json, ...)
            files = sorted(f for f in p.rglob("*.json") if f.is_file())
            found.extend(f for f in files if read_json(f, "JSON file").get("kind") == Results.KIND)
        elif p.exists():
            found.append(p)
        else:
            raise StadeError(f"Results path {str(p)!r} does not exist.", "give results files or folders of them")
    if not found:
        where = ", ".join(map(str, paths))
        raise StadeError(f"No stade results files found in {where}.", "write them with `stade eval ... --out FILE`")
    return found


@dataclass(frozen=True)
class Source:
    """A results document and the file it came from."""

    results: Results
    path: str


def load_sources(paths: Iterable[str | Path]) -> list[Source]:
    """Every results document named by paths, with its file."""
    return [Source(load_results(f), str(f)) for f in results_files(paths)]


# ----------------------------------------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class Column:
    key: str  # "ppl:wikitext2", "acc:boolq", "acc:mean"
    result: str  # the result kind: "ppl", "acc", ...
    name: str  # dataset, task or "mean"
    higher_is_better: bool

    @property
    def label(self) -> str:
        return f"{RESULT_KINDS.get(self.result).label} {self.name}" if self.result in RESULT_KINDS else self.key


@dataclass
class Row:
    label: str
    source: str
    method: str
    pattern: str | None
    sparsity: float | None
    achieved_sparsity: float | None
    values: dict[str, float] = field(default_factory=dict)
    deltas: dict[str, float] = field(default_factory=dict)
    is_baseline: bool = False


@dataclass
class Comparison:
    columns: list[Column]
    rows: list[Row]
    baseline: str | None  # the baseline row's source file
    best: dict[str, float]  # column key -> best value over the rows
    sort: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": COMPARISON_KIND, "schema": 2, **asdict(self)}  # schema 2: columns name their "result"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        if data.get("kind") != COMPARISON_KIND:
            raise StadeError("Not a stade comparison document.")
        return cls(
            columns=[Column(**c) for c in data["columns"]],
            rows=[Row(**r) for r in data["rows"]],
            baseline=data["baseline"],
            best=data["best"],
            sort=data.get("sort"),
            notes=list(data.get("notes", [])),
        )

    def is_best(self, row: Row, key: str) -> bool:
        value = row.values.get(key)
        return value is not None and key in self.best and math.isclose(value, self.best[key], rel_tol=1e-12)

    def to_markdown(self) -> str:
        head = ["model", "method", "pattern", "target", "achieved", *(c.label for c in self.columns)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r.label + (" (baseline)" if r.is_baseline else ""), *row_facts(r)]
            for c in self.columns:
                text = format_cell(r, c)
                cells.append(f"**{text}**" if self.is_best(r, c.key) else text)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        keys = [c.key for c in self.columns]
        delta_keys = [f"delta:{k}" for k in keys] if self.baseline else []
        writer.writerow(["model", "source", "method", "pattern", "sparsity", "achieved_sparsity", *keys, *delta_keys])
        for r in self.rows:
            values = [r.values.get(k, "") for k in keys]
            deltas = [r.deltas.get(k, "") for k in keys] if self.baseline else []
            facts = [r.method, r.pattern or "", _blank(r.sparsity), _blank(r.achieved_sparsity)]
            writer.writerow([r.label, r.source, *facts, *values, *deltas])
        return buf.getvalue()


def _blank(x: float | None) -> float | str:
    return "" if x is None else x


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def row_facts(r: Row) -> list[str]:
    """The method, pattern, target and achieved sparsity cells of a row (every table format shows them)."""
    return [r.method, r.pattern or "", _pct(r.sparsity), _pct(r.achieved_sparsity)]


def format_value(column: Column, value: float | None, sign: str = "") -> str:
    """Perplexity as is, accuracies in percent; sign="+" for a delta."""
    if value is None:
        return ""
    return f"{value:{sign}.3f}" if column.result == "ppl" else f"{100 * value:{sign}.2f}"


def format_cell(row: Row, column: Column) -> str:
    text = format_value(column, row.values.get(column.key))
    if text and not row.is_baseline and column.key in row.deltas:
        text += f" ({format_value(column, row.deltas[column.key], sign='+')})"
    return text


def _row(doc: Source) -> Row:
    r = doc.results
    values = {f"{kind.name}:{key}": float(v) for kind in RESULT_KINDS for key, v in kind.extract(r).items()}
    spec = r.model.spec or doc.path
    return Row(
        label=Path(spec.rstrip("/")).name or spec,
        source=doc.path,
        method=r.method or "dense",
        pattern=r.pattern,
        sparsity=r.sparsity,
        achieved_sparsity=r.achieved_sparsity,
        values=values,
    )


def _protocol(doc: Source, kind: str, name: str) -> str | None:
    """What a result was measured under, where that changes the number: a perplexity's seqlen and window
    count, a task's item limit. Other results: None."""
    if kind == "ppl":
        entry = doc.results.perplexity.get(name)
        return f"seqlen {entry.seqlen}, {entry.windows} windows" if entry else None
    if kind in ("acc", "acc_norm"):
        limit = doc.results.zeroshot.limit
        return f"limit {limit}" if limit else "all items"
    return None


def _split_protocols(docs: list[Source], rows: list[Row]) -> list[str]:
    """Give results measured under different protocols their own columns (a delta between them would mislead)."""
    notes = []
    keys = list(dict.fromkeys(k for r in rows for k in r.values))
    for key in keys:
        kind, _, name = key.partition(":")
        tags = {id(r): _protocol(d, kind, name) for d, r in zip(docs, rows, strict=True) if key in r.values}
        distinct = list(dict.fromkeys(tags.values()))
        if len(distinct) < 2:
            continue
        for r in rows:
            if key in r.values:
                r.values[f"{key} ({tags[id(r)]})"] = r.values.pop(key)
        notes.append(
            f"{kind} {name} was measured under different protocols ({'; '.join(map(str, distinct))}): "
            "one column each, never compared across"
        )
    return notes


def _model_identity(doc: Source) -> tuple[Any, ...]:
    """The architecture and shape a result's model has: results of different models get no deltas."""
    m = doc.results.model
    return (m.model_type, m.num_hidden_layers, m.hidden_size)


def _describe(identity: tuple[Any, ...]) -> str:
    model_type, layers, hidden = identity
    return f"{model_type}, {layers} layers of width {hidden}"


def _columns(rows: list[Row]) -> list[Column]:
    """Every result any row has, grouped by kind in registry order, names in order of first appearance."""
    columns: list[Column] = []
    for kind in RESULT_KINDS:
        name = kind.name
        seen: list[str] = []
        for r in rows:
            for key in r.values:
                k, _, sub = key.partition(":")
                if k == name and sub not in seen:
                    seen.append(sub)
        seen.sort(key=lambda s: s == "mean")  # the mean goes last
        columns.extend(Column(f"{name}:{s}", name, s, kind.higher_is_better) for s in seen)
    return columns


def _sort_key(column: str, columns: list[Column]) -> Callable[[Row], Any]:
    facts = {"model": "label", "method": "method", "pattern": "pattern", "sparsity": "sparsity"}
    facts["achieved"] = facts["achieved_sparsity"] = "achieved_sparsity"
    if column in facts:
        attr = facts[column]
        return lambda r: (getattr(r, attr) is None, getattr(r, attr) if getattr(r, attr) is not None else 0)
    by_name = {c.key: c for c in columns}
    for c in columns:  # a bare dataset or task name works when it is unambiguous
        by_name.setdefault(c.name, c)
        by_name.setdefault(c.label, c)
    if column not in by_name:
        names = [*facts, *(c.key for c in columns)]
        close = difflib.get_close_matches(column, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(names)}"
        raise StadeError(f"Unknown --sort column {column!r}.", hint)
    col = by_name[column]
    sign = -1.0 if col.higher_is_better else 1.0
    return lambda r: (col.key not in r.values, sign * r.values.get(col.key, 0.0))


def _baseline(rows: list[Row], baseline: Source | None, notes: list[str]) -> Row | None:
    """The given baseline's row, else the dense model's (the first, with a note where there are several)."""
    if baseline is not None:
        return next(r for r in rows if r.source == baseline.path)
    dense = [r for r in rows if r.method == "dense"]
    if len(dense) > 1:
        notes.append(f"{len(dense)} dense results; the baseline is {dense[0].source} (choose with --baseline)")
    return dense[0] if dense else None


def build(docs: list[Source], baseline: Source | None = None, sort: str | None = None) -> Comparison:
    """The comparison of loaded results; the baseline is the given one, else the dense model when there is one."""
    notes: list[str] = []
    if baseline is not None and not any(d.path == baseline.path for d in docs):
        docs = [baseline, *docs]
    rows = [_row(d) for d in docs]
    notes += _split_protocols(docs, rows)
    base_row = _baseline(rows, baseline, notes)
    columns = _columns(rows)
    if base_row is not None:
        base_row.is_baseline = True
        base_model = _model_identity(docs[rows.index(base_row)])
        for d, r in zip(docs, rows, strict=True):
            if _model_identity(d) != base_model:
                notes.append(
                    f"{r.label} is a different model ({_describe(_model_identity(d))}) from the baseline "
                    f"({_describe(base_model)}): no deltas for it"
                )
                continue
            r.deltas = {k: v - base_row.values[k] for k, v in r.values.items() if k in base_row.values}
    best: dict[str, float] = {}
    for c in columns:
        values = [r.values[c.key] for r in rows if c.key in r.values]
        if values:
            best[c.key] = max(values) if c.higher_is_better else min(values)
    if sort is not None:
        rows.sort(key=_sort_key(sort, columns))
    return Comparison(columns, rows, base_row.source if base_row else None, best, sort, notes)


def compare(paths: Iterable[str | Path], baseline: str | Path | None = None, sort: str | None = None) -> Comparison:
    """Load results files (or folders of them) and build their comparison."""
    base = load_sources([baseline])[0] if baseline is not None else None
    return build(load_sources(paths), base, sort)
