"""Everything stade can run, as `stade methods` lists it: the presets, then every stage with its needs and options."""

from __future__ import annotations

import dataclasses
from typing import Any

from stade_cli.stages.presets import PRESETS
from stade_cli.stages.stage import SCORES, UPDATES, all_stages, option_flag


def _bias_update(u_norm_fed: str, u_other: str) -> str:
    norm_fed, other = UPDATES.get(u_norm_fed).adds_bias, UPDATES.get(u_other).adds_bias
    return "all layers" if norm_fed and other else "layers not fed by a norm" if other else "no"


def stage_rows() -> list[dict[str, Any]]:
    """Every preset and every stage: kind, name, statistics read, options with defaults, description."""
    rows: list[dict[str, Any]] = []
    for m in PRESETS:
        (s1, u1), (s2, u2) = m.layer_stages(True), m.layer_stages(False)
        stages = f"{s1 or 'its update'} + {u1}" + ("" if (s1, u1) == (s2, u2) else f" / {s2} + {u2} (not norm-fed)")
        needs = {n for s in m.scores for n in SCORES.get(s).needs} | set(UPDATES.get(m.update).needs)
        rows.append(
            {
                "kind": "method",
                "name": m.name,
                "stages": stages,
                "needs": sorted(needs),
                "bias_update": _bias_update(u1, u2),
                "description": m.description,
            }
        )
    for st in all_stages():
        options = {
            option_flag(st.settings, f): f.default
            for f in dataclasses.fields(st.settings)
            if f.metadata.get("cli", True)
        }
        row = {"kind": st.kind, "name": st.name, "needs": list(st.needs), "description": st.description}
        rows.append({**row, **({"options": options} if options else {}), "docs": f"docs/methods.md#{st.paper}"})
    return rows
