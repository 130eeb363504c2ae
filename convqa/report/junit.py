"""junit.xml: the gate rows as JUnit test results for CI, rendered from the evidence dict only.

One <testsuite> per gate family, one <testcase> per gate row. Test names are unique, because
they are built from the row key (gate, subject, reference) that the evidence keeps unique; the
anchor's `{modality}_{backend}_{gate}` names collided across formats.

Status mapping: fail -> <failure>; skipped (an absent capability) -> <skipped>; not_evaluated ->
<error type="NotEvaluated">, so CI shows it as broken rather than green or grey, and distinct
from a failed gate. A row outside the verdict (F-BACKEND-001: the backend, not the conversion)
that did not pass is <skipped> with "outside the verdict" and its status in the message: CI
shows it, and it cannot turn a qualified conversion's build red.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from convqa.gates.registry import counts_toward_verdict, family_sort_key
from convqa.report.evidence import display_number, row_diagnosis, row_name

FAILURE_TYPE = "GateFailure"
# Characters XML 1.0 cannot carry at all (not even escaped); a reason quoting binary garbage
# must not make the whole file unparsable.
XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
NOT_EVALUATED_TYPE = "NotEvaluated"


def xml_text(text) -> str:
    return XML_INVALID.sub("\ufffd", str(text))


def _classname(model: str, family: str) -> str:
    # JUnit viewers split classname on dots into packages; keep the model one package.
    return f"{model.replace('.', '_')}.{family}"


def _row_message(row: dict) -> str:
    parts = [row["reason"] or row["status"]]
    if row["value"] is not None or row["threshold"] is not None:
        parts.append(f"{row['metric'] or 'value'} = {display_number(row['value'])}, "
                     f"threshold {display_number(row['threshold'])}")
    return "; ".join(parts)


def _row_text(row: dict) -> str:
    lines = [f"gate: {row['gate']}", f"subject: {row['subject']}"]
    if row["reference"]:
        lines.append(f"reference: {row['reference']}")
    lines += [f"metric: {row['metric'] or ''}", f"value: {display_number(row['value'])}",
              f"threshold: {display_number(row['threshold'])}", f"reason: {row['reason']}"]
    if row_diagnosis(row):
        lines.append(f"diagnosis: {row_diagnosis(row)}")
    return "\n".join(lines)


def _wall_s(row: dict) -> float:
    details = row.get("details")
    value = details.get("wall_s") if isinstance(details, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def render_junit(evidence: dict) -> bytes:
    s = evidence["summary"]
    families: dict[str, list[dict]] = {}
    for row in evidence["gates"]:
        families.setdefault(row["family"], []).append(row)

    root = ET.Element("testsuites", name=xml_text(f"convqa {evidence['model']}"), tests=str(len(evidence["gates"])), failures=str(s["fail"]),
                      errors=str(s["not_evaluated"]),
                      time=f"{sum(_wall_s(r) for r in evidence['gates']):.3f}")
    properties = {"model": evidence["model"], "verdict": s["verdict"], "schema_version": evidence["schema_version"],
                  "pass_rate": display_number(s["pass_rate"]), "coverage": display_number(s["coverage"]),
                  **{f"version.{k}": v or "not installed" for k, v in evidence["tool_versions"].items()}}
    for family in sorted(families, key=family_sort_key):
        rows = families[family]
        judged = [r for r in rows if counts_toward_verdict(r["gate"])]
        suite = ET.SubElement(root, "testsuite", name=family, tests=str(len(rows)),
                              failures=str(sum(r["status"] == "fail" for r in judged)),
                              errors=str(sum(r["status"] == "not_evaluated" for r in judged)),
                              skipped=str(sum(r["status"] == "skipped" or r not in judged and r["status"] != "pass" for r in rows)),
                              time=f"{sum(_wall_s(r) for r in rows):.3f}", timestamp=evidence["generated_at"][:19])
        props = ET.SubElement(suite, "properties")
        for name, value in properties.items():
            ET.SubElement(props, "property", name=name, value=xml_text(value))
        for row in rows:
            case = ET.SubElement(suite, "testcase", name=xml_text(row_name(row)),
                                 classname=xml_text(_classname(evidence["model"], family)), time=f"{_wall_s(row):.3f}")
            if not counts_toward_verdict(row["gate"]) and row["status"] != "pass":
                ET.SubElement(case, "skipped", message=xml_text(
                    f"outside the verdict (judges the backend, not the conversion): {row['status']}: {row['reason']}"))
            elif row["status"] == "skipped":
                ET.SubElement(case, "skipped", message=xml_text(row["reason"]))
            elif row["status"] == "not_evaluated":
                ET.SubElement(case, "error", type=NOT_EVALUATED_TYPE,
                              message=xml_text(f"not evaluated: {row['reason']}")).text = xml_text(_row_text(row))
            elif row["status"] == "fail":
                ET.SubElement(case, "failure", type=FAILURE_TYPE, message=xml_text(_row_message(row))).text = xml_text(_row_text(row))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
