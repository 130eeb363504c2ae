"""Write a model's qualification: the evidence JSON first, then every view rendered from it.

The Markdown, HTML and JUnit outputs are rendered from qualification.json as read back from
disk (and checked), never from the in-memory inputs, so they cannot show anything the evidence
does not hold.
"""

from __future__ import annotations

import os
from pathlib import Path

from convqa.files import atomic_file
from convqa.report.evidence import build_evidence, dumps, load_evidence
from convqa.report.html import render_html
from convqa.report.junit import render_junit
from convqa.report.markdown import render_markdown

EVIDENCE_NAME = "qualification.json"
MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
JUNIT_NAME = "junit.xml"


def write_report(model: str, gate_tsvs: list, manifests: dict, sidecars: dict, comparisons: dict,
                 out_dir: str | os.PathLike, extra: dict | None = None) -> dict[str, Path]:
    """Write qualification.json, report.md, report.html and junit.xml into `out_dir`.

    `gate_tsvs`: gate tables (TSV). `manifests`, `sidecars`: artifact label -> JSON path.
    `comparisons`: check label -> ModelComparison JSON path. `extra` (optional):
    `throughput` (list of {format, engine, backend, prefill_tps, decode_tps}),
    `inference_details` (label -> per-prompt JSON path or list), anything else is kept as is
    under the evidence's `extra`. Returns output name -> path.
    """
    out_dir = Path(out_dir)
    evidence_path = out_dir / EVIDENCE_NAME
    with atomic_file(evidence_path) as tmp:
        tmp.write_text(dumps(build_evidence(model, gate_tsvs, manifests, sidecars, comparisons, extra)), encoding="utf-8")
    return {"evidence": evidence_path, **render_reports(evidence_path, out_dir)}


def render_reports(evidence_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Render report.md, report.html and junit.xml from a qualification.json."""
    evidence = load_evidence(evidence_path)
    out_dir = Path(out_dir)
    outputs = {"markdown": out_dir / MARKDOWN_NAME, "html": out_dir / HTML_NAME, "junit": out_dir / JUNIT_NAME}
    with atomic_file(outputs["markdown"]) as tmp:
        tmp.write_text(render_markdown(evidence), encoding="utf-8")
    with atomic_file(outputs["html"]) as tmp:
        tmp.write_text(render_html(evidence), encoding="utf-8")
    with atomic_file(outputs["junit"]) as tmp:
        tmp.write_bytes(render_junit(evidence))
    return outputs
