"""Detection power: does the qualification catch each known converter bug, and only those?

The workflow config's `detection:` section (config/detection.yaml) plugs each mutant of
`convqa.convert.mutants` into one edge of its own synthetic model, as that edge's converter: a mutant is
just another converter (`convqa convert ... --mutant NAME`). `expand_config` turns the section
into workflow models (`det-<mutant>`, plus `det-correct-<preset>` converted correctly in every
variant a mutant of that preset uses) and converter entries (`mutant-<name>`), before the
workflow reads its model list. Each model is qualified at the `detection` tier; `build_matrix`
reads their qualification.json files and writes which gate catches which mutant, how loudly (the
value against its threshold), and how many gate rows fail on the correct conversions (false
alarms, which must be zero).

A mutant that breaks the output-path contract (`check: output-path`) fails its conversion job by
design, so it cannot be a workflow model: `output_path_check` runs it, and the correct converter,
alone in a scratch directory and records the contract violation as a gate row
(convqa.gates.output_contract). Which failing gate names a mutant first, and which gates are
inference gates, is the gate registry's (convqa.gates.registry).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from convqa.workflow import plan
from convqa.convert.mutants import MUTANTS
from convqa.gates.output_contract import output_path_rows
from convqa.gates.registry import is_inference_gate, specificity

MODEL_PREFIX = "det-"
CONVERTER_PREFIX = "mutant-"
CORRECT_CONVERTER = "convqa"
CONVERTER_COMMAND = "convqa convert {input} {output} --to {format} {quant_arg} --json"
WORKFLOW, OUTPUT_PATH = "workflow", "output-path"
# A first-hop mutant's broken output is refused by the correct converter of the next hop, so it
# is qualified without later hops; the correct converter and downstream mutants get them all.
FIRST_HOP_TIER, DOWNSTREAM_TIER = "detection", "detection-downstream"
CAUGHT, MISSED = "caught", "MISSED"
# A non-deterministic converter's file digests change every run; the matrix keeps only that they
# differ (the model's own report keeps the digests), so it too is reproducible run to run.
DIGEST = re.compile(r"\b[0-9a-f]{12,64}\b")
DIGEST_PLACEHOLDER = "<digest>"
STATUS_RANK = {"fail": 0, "not_evaluated": 1, "pass": 2, "skipped": 3}


class DetectionConfigError(ValueError):
    """The `detection:` section names something that cannot run."""


@dataclass(frozen=True)
class Entry:
    mutant: str
    edge: str
    preset: str
    variant: str = "native"
    check: str = WORKFLOW

    @property
    def chain(self) -> str:
        """The chain whose last conversion is the mutant's edge: `gguf-apr` -> `st-gguf-apr`."""
        return self.edge if self.edge.startswith("st-") else f"st-{self.edge}"

    @property
    def model(self) -> str:
        return mutant_model(self.mutant)

    @property
    def tier(self) -> str:
        return FIRST_HOP_TIER if plan.is_first_hop(self.chain) else DOWNSTREAM_TIER


def mutant_model(mutant: str) -> str:
    return f"{MODEL_PREFIX}{mutant}"


def correct_model(preset: str) -> str:
    return f"{MODEL_PREFIX}correct-{preset}"


def converter_name(mutant: str) -> str:
    return f"{CONVERTER_PREFIX}{mutant}"


def mutant_command(mutant: str) -> str:
    return CONVERTER_COMMAND.replace(" --json", f" --mutant {mutant} --json")


def entries(section: dict) -> list[Entry]:
    """The section's mutants, checked against the registry (name known, edge's target format one
    the mutant applies to, workflow edges built by the detection tier)."""
    out, problems = [], []
    tier_edges = {"-".join(plan.edge(c)) for c in plan.artifact_chains(DOWNSTREAM_TIER, "native")}
    for name, spec in section["mutants"].items():
        entry = Entry(name, spec["edge"], spec["preset"], spec.get("variant", "native"), spec.get("check", WORKFLOW))
        mutant = MUTANTS.get(name)
        target = plan.HOP_FORMAT[entry.edge.split("-")[1]]
        if mutant is None:
            problems.append(f"unknown mutant {name!r} (known: {', '.join(MUTANTS)})")
        elif target not in mutant.targets:
            problems.append(f"mutant {name} writes {', '.join(mutant.targets)}, not {target} (edge {entry.edge})")
        if entry.check == WORKFLOW and entry.edge not in tier_edges:
            problems.append(f"mutant {name}: edge {entry.edge} is not built by the detection tier "
                            f"({', '.join(sorted(tier_edges))})")
        out.append(entry)
    if problems:
        raise DetectionConfigError("config detection: " + "; ".join(problems))
    return out


def synthetic_source(preset: str, seed: int) -> dict:
    return {"kind": "synthetic", "preset": preset, "seed": seed}


def correct_variants(section: dict) -> dict[str, list[str]]:
    """Per preset, the variants its correct conversion runs in: native plus every mutant's (and
    native for each preset of `correct`, which no mutant uses: an architecture's false-alarm check)."""
    variants: dict[str, list[str]] = {}
    for preset in section.get("correct") or ():
        variants.setdefault(preset, ["native"])
    for entry in entries(section):
        found = variants.setdefault(entry.preset, ["native"])
        if entry.variant not in found:
            found.append(entry.variant)
    return variants


def model_tiers(section: dict) -> dict[str, str]:
    """The tier each detection model is qualified at, by model."""
    tiers = {e.model: e.tier for e in entries(section) if e.check == WORKFLOW}
    tiers.update({correct_model(p): DOWNSTREAM_TIER for p in correct_variants(section)})
    return tiers


def expand_config(config: dict) -> None:
    """Add the detection models and the mutant converters to a workflow config, in place."""
    section = config.get("detection")
    if not section:
        return
    seed = int(section.get("seed", 0))
    models = config.setdefault("models", {})
    converters = config.setdefault("converters", {})
    for entry in entries(section):
        if entry.check != WORKFLOW:
            continue
        converters[converter_name(entry.mutant)] = {
            "command": mutant_command(entry.mutant),
            "json_record": True,
            "version": converter_name(entry.mutant),  # the built-in code hash alone is the same for every mutant
            "edges": [entry.edge],
        }
        models[entry.model] = {
            "source": synthetic_source(entry.preset, seed),
            "variants": [entry.variant],
            "route": {entry.edge: converter_name(entry.mutant)},
        }
    for preset, variants in correct_variants(section).items():
        models[correct_model(preset)] = {"source": synthetic_source(preset, seed), "variants": variants}


# ---------------------------------------------------------------- the output-path contract


def output_path_check(entry: Entry, input_artifact: str | os.PathLike, quant: str | None) -> list[dict]:
    """Gate rows of the output-path contract for the correct converter and for the mutant, each
    run on a scratch copy of `input_artifact` (a misdirected output must not land in results/)."""
    converters = ((CORRECT_CONVERTER, CONVERTER_COMMAND), (converter_name(entry.mutant), mutant_command(entry.mutant)))
    return output_path_rows(converters, input_artifact, entry.chain, entry.variant, quant)


# ---------------------------------------------------------------- the matrix


def loudness(row: dict) -> str:
    """`value vs threshold` of a row, with the ratio where both are numbers."""
    value, threshold = _text(row.get("value")), _text(row.get("threshold"))
    text = f"{row.get('metric') or 'value'} {value or '?'} vs {threshold or '?'}"
    try:
        v, t = float(value), float(threshold)
    except ValueError:
        return text
    if t > 0 and math.isfinite(v):
        return f"{text} ({v / t:.3g}x)"
    if v <= t and row.get("reason"):  # failed on something other than the value (a config field)
        return f"{text}; {row['reason'][:120]}"
    return text


def gate_cells(rows: list[dict]) -> dict[str, dict]:
    """One cell per gate: the worst status over its rows, with that row's measured value."""
    cells: dict[str, dict] = {}
    for gate in sorted({r["gate"] for r in rows}, key=specificity):
        own = sorted((r for r in rows if r["gate"] == gate),
                     key=lambda r: (STATUS_RANK.get(r["status"], 9), r["subject"], r.get("reference") or ""))
        worst = own[0]
        cells[gate] = {
            "status": worst["status"],
            "rows": len(own),
            "failed_rows": sum(1 for r in own if r["status"] == "fail"),
            "subject": worst["subject"],
            "reference": worst.get("reference") or "",
            "metric": worst.get("metric") or "",
            "value": _text(worst.get("value")),
            "threshold": _text(worst.get("threshold")),
            "reason": (worst.get("reason") or "")[:300],
        }
    return cells


def _text(value) -> str:
    """A gate row's value or threshold as text (the evidence stores numbers as numbers)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def load_rows(qualification_json: str | os.PathLike) -> list[dict]:
    with open(qualification_json) as fh:
        evidence = json.load(fh)
    keys = ("gate", "subject", "reference", "metric", "value", "threshold", "status", "reason")
    rows = [{k: row.get(k) for k in keys} for row in evidence["gates"]]
    for row in rows:
        row["reason"] = DIGEST.sub(DIGEST_PLACEHOLDER, row["reason"] or "")
    return rows


def function_change(mutant_npz: str | os.PathLike | None, correct_npz: str | os.PathLike | None) -> dict:
    """Does the mutant's artifact compute another function than the correct converter's?

    Both artifacts come from byte-identical sources through deterministic converters and run under
    the same engine (transformers, cpu), so a correct conversion gives bit-identical logits and any
    difference is the mutant's doing. This measures the registry's `changes_function` claim
    instead of trusting it.
    """
    if not mutant_npz or not correct_npz:
        return {"measured": False, "reason": "the mutated artifact runs no inference at this tier"}
    import numpy as np

    from convqa.infer.run import HIDDEN_PREFIX

    with np.load(mutant_npz, allow_pickle=False) as m, np.load(correct_npz, allow_pickle=False) as c:
        if not m.files or not c.files:
            return {"measured": False, "reason": "no logits (an artifact could not be loaded)"}
        worst = 0.0
        # The logits only: a run's .npz also holds its hidden-state capture (HIDDEN_PREFIX keys),
        # whose differences are activations, not "logits vs correct converter".
        for key in (k for k in c.files if not k.startswith(HIDDEN_PREFIX)):
            if key not in m.files or m[key].shape != c[key].shape:
                return {"measured": True, "max_abs_dlogit": None, "changed": True, "reason": f"prompt {key}: no comparable logits"}
            if not np.isfinite(m[key]).all():  # max() would pass over a NaN and call the logits identical
                return {"measured": True, "max_abs_dlogit": None, "changed": True,
                        "reason": f"prompt {key}: the mutant's logits hold NaN or Inf"}
            worst = max(worst, float(np.max(np.abs(m[key].astype(np.float64) - c[key]))))
    return {"measured": True, "max_abs_dlogit": worst, "changed": worst > 0, "reason": ""}


def mutant_record(entry: Entry, rows: list[dict], change: dict | None = None) -> dict:
    mutant = MUTANTS[entry.mutant]
    change = change or {"measured": False, "reason": "not measured"}
    cells = gate_cells(rows)
    failed = [g for g, c in cells.items() if c["status"] == "fail"]
    structural = [g for g in failed if not is_inference_gate(g)]
    inference = [g for g in failed if is_inference_gate(g)]
    changes_function = mutant.changes_function or bool(change.get("changed"))
    missing = []
    if not structural:
        missing.append("no tensor-level or contract gate failed")
    if changes_function and not inference:
        missing.append("it changes the computed function but no inference gate failed")
    if change.get("measured") and change.get("changed") is False and mutant.changes_function:
        missing.append("the registry says it changes the computed function, but its logits equal the correct converter's")
    first = cells[failed[0]] if failed else None
    return {
        **asdict(entry),
        "model": entry.model if entry.check == WORKFLOW else None,
        "bug": mutant.bug,
        "origin": mutant.origin,
        "changes_function": changes_function,
        "function_change": change,
        "caught_by": failed,
        "first": {"gate": failed[0], **first, "loudness": loudness(first)} if first else None,
        "inference_failed": inference,
        "verdict": MISSED if missing else CAUGHT,
        "missing": missing,
        "cells": cells,
    }


def correct_record(preset: str, variants: list[str], rows: list[dict]) -> dict:
    cells = gate_cells(rows)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in STATUS_RANK}
    return {
        "preset": preset,
        "model": correct_model(preset),
        "variants": variants,
        "rows": len(rows),
        **counts,
        "false_alarms": [f"{r['gate']} {r['subject']}: {r['reason']}"[:300] for r in rows if r["status"] == "fail"],
        "cells": cells,
    }


def build_matrix(
    section: dict, reports: dict[str, str], output_path_rows: dict[str, str], logits: dict[str, list] | None = None
) -> dict:
    """The detection matrix from each detection model's qualification.json (`reports`, by model),
    each output-path mutant's rows (`output_path_rows`, by mutant: JSON path) and, by mutant,
    [mutant logits .npz, correct converter's logits .npz] of the mutated chain (`logits`)."""
    logits = logits or {}
    all_entries = entries(section)
    mutants, extra_correct = [], []
    for entry in all_entries:
        if entry.check == WORKFLOW:
            rows = load_rows(reports[entry.model])
        else:
            with open(output_path_rows[entry.mutant]) as fh:
                both = json.load(fh)["rows"]
            rows = [r for r in both if r["converter"] != CORRECT_CONVERTER]
            extra_correct += [(entry.preset, r) for r in both if r["converter"] == CORRECT_CONVERTER]
        pair = logits.get(entry.mutant) or [None, None]
        mutants.append(mutant_record(entry, rows, function_change(*pair) if entry.check == WORKFLOW else None))
    correct = []
    for preset, variants in correct_variants(section).items():
        rows = load_rows(reports[correct_model(preset)]) + [r for p, r in extra_correct if p == preset]
        correct.append(correct_record(preset, variants, rows))
    gates = sorted({g for rec in mutants + correct for g in rec["cells"]}, key=specificity)
    return {
        "tiers": model_tiers(section),
        "gates": gates,
        "correct": correct,
        "mutants": mutants,
        "summary": {
            "mutants": len(mutants),
            "caught": sum(1 for m in mutants if m["verdict"] == CAUGHT),
            "missed": [m["mutant"] for m in mutants if m["verdict"] == MISSED],
            "false_alarms": sum(len(c["false_alarms"]) for c in correct),
        },
    }


# ---------------------------------------------------------------- rendering

CELL_MARK = {"pass": "pass", "fail": "FAIL", "not_evaluated": "n/e", "skipped": "skip"}


def _change_text(change: dict) -> str:
    if not change.get("measured"):
        return "not measured"
    value = change.get("max_abs_dlogit")
    if value is None:
        return "differ (" + change.get("reason", "") + ")"
    return "identical" if value == 0 else f"max |dlogit| {value:.3g}"


def summary_table(matrix: dict) -> str:
    """The Markdown summary: per mutant the first (most specific) catching gate and how loudly."""
    lines = ["| mutant | edge (preset, variant) | caught first by | how loudly | also failed | inference gate failed "
             "| logits vs correct converter | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for m in matrix["mutants"]:
        first = m["first"]
        also = ", ".join(g for g in m["caught_by"][1:] if not is_inference_gate(g)) or "-"
        inference = ", ".join(m["inference_failed"]) or ("-" if m["changes_function"] else "- (function unchanged)")
        lines.append(f"| {m['mutant']} | {m['edge']} ({m['preset']}, {m['variant']}) | "
                     f"{first['gate'] if first else '-'} | {_md(first['loudness']) if first else '-'} | {also} | "
                     f"{inference} | {_md(_change_text(m.get('function_change') or {}))} | **{m['verdict']}** |")
    for c in matrix["correct"]:
        lines.append(f"| correct converter | all ({c['preset']}, {', '.join(c['variants'])}) | - | "
                     f"{c['pass']} pass, {c['fail']} fail, {c['not_evaluated']} not evaluated, {c['skipped']} skipped | - | - | - | "
                     f"**{'no false alarm' if not c['false_alarms'] else str(len(c['false_alarms'])) + ' FALSE ALARMS'}** |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(matrix: dict) -> str:
    s = matrix["summary"]
    out = [
        "# Detection matrix\n",
        f"{s['caught']} of {s['mutants']} mutants caught; missed: {', '.join(s['missed']) or 'none'}; "
        f"false alarms on the correct converter: {s['false_alarms']}.\n",
        "A mutant is caught when at least one tensor-level or contract gate fails and, if it changes the "
        "computed function, at least one inference gate fails too. \"How loudly\" is the first gate's "
        "measured value against its threshold.\n",
        summary_table(matrix),
        "\n## Every gate\n",
        "Cells: the worst status over the gate's rows (FAIL value/threshold, pass, n/e = not evaluated).\n",
    ]
    header = "| row | " + " | ".join(matrix["gates"]) + " |"
    out += [header, "|" + "---|" * (len(matrix["gates"]) + 1)]
    for name, cells in _matrix_rows(matrix):
        out.append(f"| {name} | " + " | ".join(_md(_cell_text(cells.get(g))) for g in matrix["gates"]) + " |")
    out.append("\n## Mutants\n")
    for m in matrix["mutants"]:
        out.append(f"- **{m['mutant']}** ({m['origin']}): {m['bug']}."
                   + (f" First: {m['first']['gate']} on {m['first']['subject']}: {_md(m['first']['reason'])}" if m["first"] else "")
                   + (f" Missing: {'; '.join(m['missing'])}." if m["missing"] else ""))
    return "\n".join(out) + "\n"


def _matrix_rows(matrix: dict):
    for c in matrix["correct"]:
        yield f"correct ({c['preset']})", c["cells"]
    for m in matrix["mutants"]:
        yield m["mutant"], m["cells"]


def _cell_text(cell: dict | None) -> str:
    if cell is None:
        return ""
    mark = CELL_MARK.get(cell["status"], cell["status"])
    if cell["status"] == "fail":
        return f"{mark} {cell['value']}/{cell['threshold']}"
    return mark


def to_html(matrix: dict) -> str:
    e = html.escape
    s = matrix["summary"]
    head = "".join(f"<th>{e(g)}</th>" for g in matrix["gates"])
    body = []
    for name, cells in _matrix_rows(matrix):
        tds = []
        for g in matrix["gates"]:
            cell = cells.get(g)
            status = cell["status"] if cell else "none"
            title = e(f"{cell['subject']}: {cell['metric']} {cell['value']} vs {cell['threshold']}; {cell['reason']}") if cell else ""
            tds.append(f'<td class="{e(status)}" title="{title}">{e(_cell_text(cell))}</td>')
        body.append(f"<tr><th>{e(name)}</th>{''.join(tds)}</tr>")
    verdicts = "".join(
        f"<tr><td>{e(m['mutant'])}</td><td>{e(m['bug'])}</td><td>{e(m['first']['gate'] if m['first'] else '-')}</td>"
        f"<td>{e(m['first']['loudness'] if m['first'] else '-')}</td><td class=\"{'pass' if m['verdict'] == CAUGHT else 'fail'}\">"
        f"{e(m['verdict'])}</td></tr>" for m in matrix["mutants"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>convqa detection matrix</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse;font-size:12px}} td,th{{border:1px solid #ccc;padding:2px 4px}}
.fail{{background:#f8c8c8}} .pass{{background:#d0f0d0}} .not_evaluated{{background:#eee}} .skipped{{background:#f4f4f4}}</style></head>
<body><h1>Detection matrix</h1>
<p>{s['caught']} of {s['mutants']} mutants caught; missed: {e(', '.join(s['missed']) or 'none')};
false alarms on the correct converter: {s['false_alarms']}.</p>
<table><tr><th>mutant</th><th>bug</th><th>caught first by</th><th>how loudly</th><th>verdict</th></tr>{verdicts}</table>
<h2>Every gate</h2>
<table><tr><th></th>{head}</tr>{''.join(body)}</table>
</body></html>
"""


def write_matrix(matrix: dict, json_path, md_path, html_path) -> None:
    from convqa.files import atomic_file

    for path, text in ((json_path, json.dumps(matrix, indent=1, sort_keys=False) + "\n"),
                       (md_path, to_markdown(matrix)), (html_path, to_html(matrix))):
        with atomic_file(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
