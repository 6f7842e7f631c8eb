"""The README.md model card of a pruned checkpoint: what hub users read, where `stade.json` is for tools.

`stade prune` writes it (base model, method, pattern, sparsity, calibration data, the command); `stade eval`
fills in its results section, keeping the rest. The YAML front matter follows the Hugging Face model card
metadata (`base_model`, `library_name`, `tags`), as mlx-lm and llm-compressor write it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stade_cli.base.artifacts import PruneRecord, Results
from stade_cli.base.files import atomic_write

CARD_FILE = "README.md"
RESULTS_START = "<!-- stade:results -->"
RESULTS_END = "<!-- /stade:results -->"
NOT_EVALUATED = "Not evaluated yet: `stade eval` on this folder adds its results here."
BUILTIN_BASE = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_base(spec: str) -> str | None:
    """The hub id of the base model, where there is one (a local folder or file has none)."""
    if spec in BUILTIN_BASE:
        return BUILTIN_BASE[spec]
    if _HUB_ID.match(spec) and not Path(spec).expanduser().exists():
        return spec
    cached = re.search(r"models--([\w.-]+?)--([\w.-]+)", spec)  # a snapshot folder of the hub cache
    return f"{cached.group(1)}/{cached.group(2)}" if cached else None


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "—"


def _front_matter(base: str | None, method: str, pattern: str) -> list[str]:
    """The Hugging Face model card metadata: base model, library, tags."""
    tag = "unstructured" if pattern == "unstructured" else pattern.replace(":", "of") + "-sparsity"
    return [
        "---",
        *([f"base_model: {base}"] if base else []),
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- stade",
        "- pruned",
        "- sparse",
        f"- {method}",
        f"- {tag}",
        "---",
    ]


def _facts(report: PruneRecord, base_text: str) -> list[tuple[str, str]]:
    cal = report.statistics
    return [
        ("base model", base_text),
        ("method", f"`{report.method}`"),
        ("pattern", report.pattern),
        ("target sparsity", _percent(report.sparsity)),
        ("achieved sparsity", f"{_percent(report.achieved_sparsity)} of the decoder blocks' linear weights"),
        *_selection(report),
        ("bias update", "yes" if report.bias_update else "no"),
        ("sequential", "yes" if report.sequential else "no (one-shot, from the dense statistics)"),
        ("calibration data", f"`{cal.data}`, {cal.nsamples} windows x {cal.seqlen} tokens"),
        *_finetune_facts(report),
        ("saved dtype", str(report.dtype or "—")),
        ("stade", str(report.versions.get("stade", "—"))),
    ]


def _selection(report: PruneRecord) -> list[tuple[str, str]]:
    """The layers --only / --ignore kept dense, where some were."""
    if not report.selection:
        return []
    dense = sum(1 for layer in report.layers if layer.dense)
    given = ", ".join(f"--{k} {' '.join(f'`{p}`' for p in v)}" for k, v in report.selection.items() if v)
    return [("layers kept dense", f"{dense} of {len(report.layers)} ({given})")]


def _finetune_facts(report: PruneRecord) -> list[tuple[str, str]]:
    """`stade finetune`'s recovery, where it ran: how, on what, and the held-out perplexity before and after."""
    ft = report.finetune
    if ft is None:
        return []
    how = f"LoRA rank {ft.lora_rank}, merged into the sparse pattern" if ft.mode == "lora" else "every kept weight"
    loss = {"kd": "distillation (KL) from", "lm": "LM loss", "mix": f"LM loss + {ft.kd_weight:g} x distillation from"}
    teacher = f" `{ft.teacher}`" if ft.teacher and ft.loss != "lm" else ""
    return [
        ("fine-tuned", f"yes, mask held exactly: {how}; {loss[ft.loss]}{teacher}"),
        ("fine-tuning data", f"`{ft.data}`, {ft.tokens} tokens in {ft.steps} steps"),
        ("held-out perplexity", f"{ft.heldout_before:.3f} before, {ft.heldout_after:.3f} after fine-tuning"),
    ]


USE = [
    "## Use",
    "",
    "```python",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "",
    'model = AutoModelForCausalLM.from_pretrained("PATH_OR_HUB_ID")',
    'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_HUB_ID")',
    "```",
    "",
]


def render(report: PruneRecord, command: str | None = None) -> str:
    """The card for a checkpoint described by its stade.json `report` (results section empty)."""
    spec = report.model.spec
    base = hub_base(spec)
    method, pattern = report.method, report.pattern
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{spec}`"
    if base and base != spec:
        base_text += f" (given as `{spec}`)"
    lines = [
        *_front_matter(base, method, pattern),
        "",
        f"# {Path(spec.rstrip('/')).name or spec}, pruned with {method} ({pattern}, {_percent(report.sparsity)})",
        "",
        f"{base_text} pruned after training by [stade](https://pypi.org/project/stade/)"
        + (", then fine-tuned with its mask held (`stade finetune`). " if report.finetune else ", with no retraining. ")
        + "Pruned weights are stored as zeros in an ordinary checkpoint: plain `transformers` loads it.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _facts(report, base_text)),
        "",
        "## How it was made",
        "",
        "```bash",
        command or "(made through the Python API: no command line)",
        "```",
        "",
        "`stade.json` beside this card holds the full report (every layer's sparsity and error).",
        "",
        "## Evaluation",
        "",
        RESULTS_START,
        NOT_EVALUATED,
        RESULTS_END,
        "",
        *USE,
    ]
    return "\n".join(lines)


def write_card(folder: Path, report: PruneRecord, command: str | None = None) -> Path:
    path = folder / CARD_FILE
    atomic_write(path, render(report, command))
    return path


def result_rows(results: Results) -> dict[str, str]:
    """One table row per result of a results document, keyed by the result's name."""
    rows: dict[str, str] = {}
    for source, r in results.perplexity.items():
        settings = f"{r.windows} windows x {r.seqlen} tokens"
        if r.notes:
            settings += "; " + "; ".join(r.notes)
        rows[f"perplexity {source}"] = f"{r.ppl:.3f} | {settings}"
    zs = results.zeroshot
    for task, entry in zs.tasks.items():
        items = f"{entry.get('items')} items" + (f" (--limit {zs.limit})" if zs.limit else "")
        for kind in ("acc", "acc_norm"):
            if kind in entry:
                rows[f"{kind} {task}"] = f"{100 * entry[kind]:.2f} | 0-shot, {items}"
    return rows


def add_results(folder: Path, results: Results) -> bool:
    """Put `results` into the card's results section (a result measured again replaces its row; the rest stays).

    Returns False, changing nothing, where the folder has no card written by stade.
    """
    path = folder / CARD_FILE
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf8")
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if start < 0 or end < start:
        return False
    body = text[start + len(RESULTS_START) : end]
    rows: dict[str, str] = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("result", "---"):
            rows[cells[0]] = f"{cells[1]} | {cells[2]}"
    rows.update(result_rows(results))
    table = ["| result | value | settings |", "|---|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())]
    section = "\n".join([RESULTS_START, *table, RESULTS_END])
    atomic_write(path, text[:start] + section + text[end + len(RESULTS_END) :])
    return True
