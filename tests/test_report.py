"""Qualification report: evidence JSON, Markdown, self-contained HTML, JUnit XML, cross-model summary.

Inputs are built here the way the workflow builds them: tensor comparisons come from
convqa.compare.tensors.compare_models on small in-memory llama models (one candidate quantized
to Q8_0 with its K rows left in GGUF's permuted order, one bit-exact copy), manifests from
convqa.inspect.manifest.artifact_manifest, sidecars from convqa.convert.builtin.ConversionRecord.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import xmlschema

from convqa import encodings
from convqa.arch import expected_tensors
from convqa.arch.permute import permute_rows_for_gguf
from convqa.compare.tensors import compare_models
from convqa.convert.builtin import ConversionRecord
from convqa.errors import FormatError
from convqa.inspect.manifest import artifact_manifest
from convqa.model import LazyTensor, ModelArtifact, ModelConfig
from convqa.report import render_reports, write_report, write_summary
from convqa.report.evidence import (GATE_COLUMNS, INCOMPLETE, NOT_QUALIFIED, QUALIFIED, load_evidence, row_key,
                                    row_name, summarize)

JUNIT_XSD = Path(__file__).parent / "data" / "junit.xsd"
CHROMIUM = Path("/usr/bin/chromium")
MODEL = "tiny-llama.v1"
HOSTILE_REASON = 'mean moved <script>alert("x")</script> | by 3% & more'

CONFIG = ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=6,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=10000.0,
                     rms_norm_eps=1e-06, tie_word_embeddings=False)


# --- synthetic but real inputs ----------------------------------------------------------------

def _tensor(name: str, values: np.ndarray, enc=encodings.F32) -> LazyTensor:
    raw = enc.encode(values.astype(np.float32)) if enc is not encodings.F32 else values.astype(np.float32)
    return LazyTensor(name, values.shape, enc, lambda raw=raw: raw)


def _reference_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {name: (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
                   else 0.05 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in expected_tensors(CONFIG).items()}


def _artifact(path: str, fmt: str, tensors: list[LazyTensor]) -> ModelArtifact:
    return ModelArtifact(path=path, format=fmt, config=CONFIG, tokenizer=None, tensors={t.name: t for t in tensors})


def _models():
    values = _reference_values()
    ref = _artifact("results/tiny/native/st/model.safetensors", "safetensors",
                    [_tensor(n, v) for n, v in values.items()])
    exact = _artifact("results/tiny/native/st-apr/model.apr", "apr", [_tensor(n, v) for n, v in values.items()])
    # A Q8_0 GGUF whose reader forgot to undo llama's K permutation: every k_proj is off, the
    # rest is within Q8_0 rounding.
    quant = []
    for n, v in values.items():
        if ".k_proj." in n:
            v = permute_rows_for_gguf(v, CONFIG.num_kv_heads)
        quant.append(_tensor(n, v, encodings.Q8_0 if v.ndim == 2 else encodings.F32))
    bad = _artifact("results/tiny/q8_0/st-gguf/model.gguf", "gguf", quant)
    return ref, exact, bad


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _write_tsv(path: Path, rows: list[dict], with_details: bool = True) -> Path:
    columns = list(GATE_COLUMNS) + (["details"] if with_details else [])
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, columns, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return path


def _row(gate, subject, status, reference="", metric="", value="", threshold="", reason="", details=None):
    variant = subject.split("/")[0]
    return {"gate": gate, "subject": subject, "reference": reference, "metric": metric, "value": value,
            "threshold": threshold, "status": status, "reason": reason, "model": MODEL, "variant": variant,
            "details": json.dumps(details) if details is not None else ""}


CONVERSION_ROWS = [
    _row("G0-INTEGRITY", "native/st", "pass", metric="config_vs_shapes", value=0, threshold=0),
    _row("G0-INTEGRITY", "q8_0/st-gguf", "pass", metric="config_vs_shapes", value=0, threshold=0),
    _row("G0-VALIDATE", "q8_0/st-gguf", "pass", metric="nan_inf_zero", value=0, threshold=0),
    _row("F-LAYOUT-001", "q8_0/st-gguf", "fail", metric="tensors_off", value=6, threshold=0,
         reason="6 tensors have values that do not match the canonical tensor",
         details={"diagnosis": "rows are in GGUF's permuted Q/K order (llama permutation not undone)",
                  "comparison": "F-CONV-S-G q8_0/st-gguf"}),
    _row("F-CONV-S-G", "q8_0/st-gguf", "fail", reference="native/st", metric="normalized_max_abs", value=1.9,
         threshold=0.005, reason="k_proj out of tolerance in every layer"),
    _row("F-CONV-S-A", "native/st-apr", "pass", reference="native/st", metric="normalized_max_abs", value=0,
         threshold=0),
    _row("F-CONV-RT-001", "native/st-apr-gguf-apr", "not_evaluated", reference="native/st-apr",
         reason="input native/st-apr-gguf was not produced (converter error)"),
    _row("F-CONV-COM-001", "native/st-gguf-apr", "pass", reference="native/st-apr", metric="bit_exact", value=1,
         threshold=1),
    _row("F-CONV-COM-001", "native/st-gguf-apr", "pass", reference="native/st-gguf-s-apr", metric="bit_exact",
         value=1, threshold=1),
    _row("F-CONTRACT-I4", "q8_0/st-gguf", "fail", metric="stat_drift", value="inf", threshold=0.05,
         reason=HOSTILE_REASON),
]
INFERENCE_ROWS = [
    _row("F-INF-gguf-cpu-run", "q8_0/st-gguf", "fail", reference="native/st", metric="kl_max", value=2.5,
         threshold=0.05, reason="logits diverge from the first position"),
    _row("F-INF-gguf-gpu-run", "q8_0/st-gguf", "skipped", reason="no CUDA device"),
    _row("F-INF-safetensors-cpu-chat", "native/st", "pass", reference="native/st", metric="kl_max", value=0,
         threshold=0),
    _row("F-ENGINE-001", "q8_0/st-gguf", "pass", metric="kl_max", value=0.001, threshold=0.01),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("inputs")
    ref, exact, bad = _models()
    comparisons = {"F-CONV-S-G q8_0/st-gguf": compare_models(ref, bad), "F-CONV-S-A native/st-apr": compare_models(ref, exact)}
    manifests, sidecars = {}, {}
    for label, model in (("native/st", ref), ("native/st-apr", exact), ("q8_0/st-gguf", bad)):
        m = artifact_manifest(model)
        m["file_sha256"] = hashlib.sha256(label.encode()).hexdigest()
        m["file_size"] = sum(t.nbytes for t in model)
        manifests[label] = _write_json(d / f"{label.replace('/', '_')}.manifest.json", m)
        if label != "native/st":
            record = ConversionRecord(source=ref.path, output=model.path, source_format="safetensors",
                                      target_format=model.format, quant=label.split("/")[0], mutant=None,
                                      tensors_written=len(model.tensors), wall_s=0.42)
            sidecars[label] = _write_json(d / f"{label.replace('/', '_')}.sidecar.json", {
                "sha256": m["file_sha256"], "size": m["file_size"], "converter": "convqa",
                "fingerprint": "f" * 64, "argv": ["convqa", "convert", ref.path, model.path], "wall_s": 0.42,
                "peak_rss_mb": 123.4, "tool_versions": {"convqa": "0.1.0"}, "record": record.as_dict()})
    details = _write_json(d / "inference_details.json", {"prompts": [
        {"prompt_id": f"p{i}", "prompt": f"<b>prompt {i}</b>", "kl_max": 0.5 * i, "top1_agreement": 1 - 0.1 * i,
         "first_divergence": i, "kl_per_position": [1e-4 * (i + 1) * (k + 1) for k in range(12)]} for i in range(4)]})
    return {
        "gate_tsvs": [_write_tsv(d / "conversion.tsv", CONVERSION_ROWS),
                      _write_tsv(d / "inference.tsv", INFERENCE_ROWS, with_details=False)],
        "manifests": manifests, "sidecars": sidecars,
        "comparisons": {label: _write_json(d / f"cmp{i}.json", c.as_dict()) for i, (label, c) in enumerate(comparisons.items())},
        "extra": {"throughput": [{"format": "gguf", "engine": "llama.cpp", "backend": "cpu", "prefill_tps": 812.5,
                                  "decode_tps": 95.25}],
                  "inference_details": {"q8_0/st-gguf": details}},
    }


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report")
    paths = write_report(MODEL, inputs["gate_tsvs"], inputs["manifests"], inputs["sidecars"], inputs["comparisons"], out,
                         extra=inputs["extra"])
    return {"paths": paths, "evidence": load_evidence(paths["evidence"])}


ALL_ROWS = CONVERSION_ROWS + INFERENCE_ROWS


# --- evidence ---------------------------------------------------------------------------------

def test_outputs_are_written(report):
    assert sorted(p.name for p in report["paths"].values()) == ["junit.xml", "qualification.json", "report.html",
                                                               "report.md"]
    out_dir = report["paths"]["evidence"].parent
    assert not list(out_dir.glob(".tmp-*")), "atomic writes left temporaries"


def test_evidence_is_strict_json_with_everything(report):
    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    json.loads(report["paths"]["evidence"].read_text(), parse_constant=refuse)
    ev = report["evidence"]
    assert ev["model"] == MODEL
    assert set(ev["tool_versions"]) >= {"python", "convqa", "numpy", "torch", "transformers", "gguf", "safetensors",
                                        "snakemake", "llama_cpp"}
    assert ev["tool_versions"]["numpy"] == np.__version__
    assert {row_key(r) for r in ev["gates"]} == {(r["gate"], r["subject"], r["reference"]) for r in ALL_ROWS}
    stat_row = next(r for r in ev["gates"] if r["gate"] == "F-CONTRACT-I4")
    assert stat_row["value"] == "inf" and stat_row["threshold"] == 0.05 and stat_row["reason"] == HOSTILE_REASON
    layout = next(r for r in ev["gates"] if r["gate"] == "F-LAYOUT-001")
    assert "permuted Q/K" in layout["details"]["diagnosis"]


def test_evidence_summary_and_verdict(report):
    s = report["evidence"]["summary"]
    assert (s["pass"], s["fail"], s["skipped"], s["not_evaluated"]) == (8, 4, 1, 1)
    assert s["pass_rate"] == pytest.approx(8 / 12)
    assert s["coverage"] == pytest.approx(12 / 13)
    assert s["verdict"] == NOT_QUALIFIED


def test_evidence_artifacts_carry_provenance(report):
    arts = {a["label"]: a for a in report["evidence"]["artifacts"]}
    assert set(arts) == {"native/st", "native/st-apr", "q8_0/st-gguf"}
    assert arts["native/st"]["producer"] is None  # the ground truth is not converted
    gguf = arts["q8_0/st-gguf"]
    assert len(gguf["file_sha256"]) == 64 and gguf["sha256_consistent"] is True
    assert gguf["encodings"] == {"F32": 13, "Q8_0": 44}
    p = gguf["producer"]
    assert (p["converter"], p["wall_s"], p["peak_rss_mb"], p["quant"]) == ("convqa", 0.42, 123.4, "q8_0")
    assert p["argv"][:2] == ["convqa", "convert"] and p["fingerprint"] == "f" * 64


def test_evidence_tensor_errors_single_out_the_broken_kind(report):
    checks = {c["label"]: c for c in report["evidence"]["tensor_checks"]}
    bad = checks["F-CONV-S-G q8_0/st-gguf"]
    assert not bad["ok"]
    off = [t for t in bad["tensors"] if not t["ok"]]
    assert {t["kind"] for t in off} == {"attn_k"}
    assert sorted(t["layer"] for t in off) == list(range(CONFIG.num_layers))
    assert all("permuted Q/K order" in t["diagnosis"] for t in off)
    within = [t for t in bad["tensors"] if t["ok"]]
    assert within and all(0 <= t["normalized_max_abs"] <= t["tolerance"] for t in within)
    kinds = {t["name"]: t["kind"] for t in bad["tensors"]}
    assert kinds["model.embed_tokens.weight"] == "embed" and kinds["lm_head.weight"] == "lm_head"
    assert kinds["model.layers.3.mlp.down_proj.weight"] == "mlp_down" and kinds["model.norm.weight"] == "norm"
    exact = checks["F-CONV-S-A native/st-apr"]
    assert exact["ok"] and all(t["normalized_max_abs"] == 0 for t in exact["tensors"])


# --- verdict logic ----------------------------------------------------------------------------

def _statuses(*statuses):
    return [{"status": s} for s in statuses]


@pytest.mark.parametrize("statuses, verdict", [
    ((), INCOMPLETE),
    (("skipped",), INCOMPLETE),
    (("not_evaluated",), INCOMPLETE),
    (("pass", "not_evaluated"), INCOMPLETE),
    (("pass", "skipped"), QUALIFIED),
    (("pass", "pass"), QUALIFIED),
    (("fail",), NOT_QUALIFIED),
    (("pass", "fail", "not_evaluated", "skipped"), NOT_QUALIFIED),
])
def test_verdict(statuses, verdict):
    assert summarize(_statuses(*statuses))["verdict"] == verdict


def test_rates_are_undefined_without_decided_rows():
    s = summarize(_statuses("skipped", "not_evaluated"))
    assert s["pass_rate"] is None and s["coverage"] == 0.0
    assert summarize([])["coverage"] is None


@pytest.mark.parametrize("tables", [[], [[]]], ids=["no tables", "header-only table"])
def test_empty_input_is_incomplete_everywhere(tmp_path, tables):
    tsvs = [_write_tsv(tmp_path / f"t{i}.tsv", rows) for i, rows in enumerate(tables)]
    paths = write_report(MODEL, tsvs, {}, {}, {}, tmp_path / "out")
    ev = load_evidence(paths["evidence"])
    assert ev["summary"]["verdict"] == INCOMPLETE and ev["gates"] == []
    assert "INCOMPLETE" in paths["markdown"].read_text() and "QUALIFIED</h1>" not in paths["html"].read_text().replace(
        "INCOMPLETE", "")
    xmlschema.XMLSchema(JUNIT_XSD).validate(paths["junit"])


def test_one_failure_means_not_qualified(tmp_path):
    rows = [_row("G0-INTEGRITY", "native/st", "pass"), _row("G0-VALIDATE", "native/st", "fail", reason="all-zero norm")]
    ev = load_evidence(write_report(MODEL, [_write_tsv(tmp_path / "g.tsv", rows)], {}, {}, {}, tmp_path)["evidence"])
    assert ev["summary"]["verdict"] == NOT_QUALIFIED


def test_not_evaluated_only_is_incomplete(tmp_path):
    rows = [_row("F-CONV-S-G", "native/st-gguf", "not_evaluated", reference="native/st", reason="0 tensors")]
    ev = load_evidence(write_report(MODEL, [_write_tsv(tmp_path / "g.tsv", rows)], {}, {}, {}, tmp_path)["evidence"])
    assert ev["summary"]["verdict"] == INCOMPLETE and ev["summary"]["coverage"] == 0.0


# --- malformed inputs and tampered evidence ---------------------------------------------------

@pytest.mark.parametrize("rows, field", [
    ([_row("G0-INTEGRITY", "native/st", "passed")], "status"),
    ([_row("G0-INTEGRITY", "native/st", "skipped")], "reason"),
    ([_row("G0-INTEGRITY", "", "pass")], "subject"),
    ([_row("G0-INTEGRITY", "native/st", "pass"), _row("G0-INTEGRITY", "native/st", "fail", reason="x")], "gate"),
], ids=["unknown status", "skip without reason", "no subject", "duplicate row"])
def test_malformed_gate_table_is_refused(tmp_path, rows, field):
    with pytest.raises(FormatError) as err:
        write_report(MODEL, [_write_tsv(tmp_path / "g.tsv", rows)], {}, {}, {}, tmp_path / "out")
    assert err.value.field == field and "g.tsv" in str(err.value)
    assert not (tmp_path / "out" / "qualification.json").exists()


def test_missing_column_is_refused(tmp_path):
    (tmp_path / "g.tsv").write_text("gate\tsubject\tstatus\nG0-INTEGRITY\tnative/st\tpass\n")
    with pytest.raises(FormatError, match="lacks columns"):
        write_report(MODEL, [tmp_path / "g.tsv"], {}, {}, {}, tmp_path / "out")


def test_tampered_summary_is_not_rendered(report, tmp_path):
    ev = json.loads(report["paths"]["evidence"].read_text())
    ev["summary"]["verdict"] = QUALIFIED
    (tmp_path / "qualification.json").write_text(json.dumps(ev))
    with pytest.raises(FormatError, match="summary does not match"):
        render_reports(tmp_path / "qualification.json", tmp_path)


# --- every rendered row is in the evidence ----------------------------------------------------

def _md_table(md: str, heading: str) -> list[list[str]]:
    section = md.split(f"## {heading}\n", 1)[1].lstrip("\n")
    lines = section.split("\n\n", 1)[0].splitlines()
    assert all(l.startswith("|") for l in lines)
    cells = [[html.unescape(c.strip().replace("\\|", "|").replace("\\\\", "\\")) for c in re.split(r"(?<!\\)\|", l)[1:-1]]
             for l in lines]
    return cells[2:]  # header and rule


class _RowCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.imgs, self.tags = [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "tr" and "data-gate" in a:
            self.rows.append((a["data-gate"], a["data-subject"], a["data-reference"]))
        if tag == "img":
            self.imgs.append((a["alt"], a["src"]))


def test_markdown_rows_are_in_evidence(report):
    md = report["paths"]["markdown"].read_text()
    keys = {row_key(r) for r in report["evidence"]["gates"]}
    all_rows = _md_table(md, "All gate rows")
    assert {(c[0], c[1], c[2]) for c in all_rows} == keys and len(all_rows) == len(keys)
    attention = _md_table(md, "Rows needing attention (failing first)")
    assert [c[3] for c in attention] == ["**FAIL**"] * 4 + ["*not evaluated*", "skip"]
    assert {(c[0], c[1], c[2]) for c in attention} <= keys
    assert HOSTILE_REASON in [c[7] for c in attention]  # the pipe was escaped, not a column break
    assert md.startswith(f"# Qualification of {MODEL}: NOT QUALIFIED")
    assert "<script>" not in md and "<b>" not in md  # quoted markup is shown, not applied


def test_html_rows_are_in_evidence_and_page_is_self_contained(report):
    page = report["paths"]["html"].read_text()
    parser = _RowCollector()
    parser.feed(page)
    keys = {row_key(r) for r in report["evidence"]["gates"]}
    assert set(parser.rows) <= keys and len(set(parser.rows)) == len(keys)
    for forbidden in ('src="http', "src='http", "<link", "<script", "@import", "url(", "href=\"http"):
        assert forbidden not in page, forbidden
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "&lt;script&gt;alert" in page and "&lt;b&gt;prompt 0&lt;/b&gt;" in page
    # matrix + one heatmap over all tensor checks + a detail plot for the failing check only (the
    # bit-exact one gets none) + KL per position; all inline PNGs
    assert [alt for alt, _ in parser.imgs] == ["gate matrix", "tensor error against tolerance, every comparison",
                                               "per-tensor error by layer, F-CONV-S-G q8_0/st-gguf", "KL per position"]
    for _, src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "NOT QUALIFIED" in page and "Throughput" in page and "812.5" in page
    assert "rows are in GGUF&#39;s permuted Q/K order" in page
    # the failing layout row links to the tensor check it was decided on, inside the page
    check = [c["label"] for c in report["evidence"]["tensor_checks"]].index("F-CONV-S-G q8_0/st-gguf")
    assert f'<a href="#check-{check}">' in page and f'id="check-{check}"' in page


def test_junit_validates_with_unique_names(report):
    schema = xmlschema.XMLSchema(JUNIT_XSD)
    schema.validate(report["paths"]["junit"])
    root = ET.parse(report["paths"]["junit"]).getroot()
    cases = root.findall("./testsuite/testcase")
    names = [c.get("classname") + "/" + c.get("name") for c in cases]
    assert len(names) == len(set(names)) == len(report["evidence"]["gates"])
    assert {c.get("name") for c in cases} == {row_name(r) for r in report["evidence"]["gates"]}
    assert len(root.findall("./testsuite/testcase/failure")) == 4
    errors = root.findall("./testsuite/testcase/error")
    assert len(errors) == 1 and errors[0].get("message").startswith("not evaluated: ")
    assert [s.get("message") for s in root.findall("./testsuite/testcase/skipped")] == ["no CUDA device"]
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"G0", "F-LAYOUT", "F-CONV", "F-CONV-RT", "F-CONV-COM", "F-CONTRACT", "F-INF", "F-ENGINE"}
    assert suites["F-INF"].get("failures") == "1" and suites["F-INF"].get("skipped") == "1"
    props = {p.get("name"): p.get("value") for p in suites["G0"].findall("properties/property")}
    assert props["verdict"] == NOT_QUALIFIED and props["version.numpy"] == np.__version__
    failure = next(c for c in cases if c.get("name") == "F-CONV-S-G q8_0/st-gguf vs native/st").find("failure")
    assert "1.9" in failure.get("message") and "0.005" in failure.get("message")


def test_junit_survives_control_characters(tmp_path):
    rows = [_row("G0-VALIDATE", "native/st", "fail", reason="tensor name b'\x01\x02' is not UTF-8")]
    paths = write_report(MODEL, [_write_tsv(tmp_path / "g.tsv", rows)], {}, {}, {}, tmp_path)
    xmlschema.XMLSchema(JUNIT_XSD).validate(paths["junit"])


# --- cross-model summary ----------------------------------------------------------------------

def test_summary_across_models(report, tmp_path):
    good = write_report("good-model", [_write_tsv(tmp_path / "g.tsv", [_row("G0-INTEGRITY", "native/st", "pass")])],
                        {}, {}, {}, tmp_path / "good")
    summary = write_summary([report["paths"]["evidence"], good["evidence"]], tmp_path / "s.json", tmp_path / "s.md")
    assert summary["verdict"] == NOT_QUALIFIED
    assert [(m["model"], m["verdict"], m["pass"], m["fail"]) for m in summary["models"]] == [
        (MODEL, NOT_QUALIFIED, 8, 4), ("good-model", QUALIFIED, 1, 0)]
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    md = (tmp_path / "s.md").read_text()
    assert "| good-model | QUALIFIED | 1 | 0 | 0 | 0 | 100.0% | 100.0% |" in md
    only_good = write_summary([good["evidence"]], tmp_path / "g.json", tmp_path / "g.md")
    assert only_good["verdict"] == QUALIFIED
    assert write_summary([], tmp_path / "e.json", tmp_path / "e.md")["verdict"] == INCOMPLETE


# --- the page in a real browser -----------------------------------------------------------------

# Runs in the page once it has loaded (a copy of the page: report.html itself holds no script) and
# writes what the browser laid out into <pre id="probe">, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const box = el => { if (!el) return null; const r = el.getBoundingClientRect(), st = getComputedStyle(el);
    return {top: r.top, width: r.width, height: r.height, visible: st.display !== "none" && st.visibility !== "hidden"}; };
  const imgs = [...document.images].map(i => ({alt: i.alt, complete: i.complete, natural: i.naturalWidth,
                                               width: i.getBoundingClientRect().width}));
  const out = {viewport: innerHeight, graph: box(document.getElementById("conversion-graph")),
               heatmap: box(document.getElementById("tensor-heatmap")), imgs: imgs,
               edges: [...document.querySelectorAll("#conversion-graph .edge")].map(e => e.dataset.status),
               failing_labels: [...document.querySelectorAll("#conversion-graph text.failing-label")].map(
                 t => [...t.childNodes].filter(n => n.nodeName !== "title").map(n => n.textContent).join(""))};
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium_probe(page: Path, tmp_path: Path, screenshot: Path | None = None) -> dict:
    """Load `page` in headless Chromium (1280x1000) and return what PROBE saw; optionally
    screenshot the first screen of the page itself."""
    probed = tmp_path / f"probe-{page.parent.name}.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1000",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run(flags + ["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()], check=True,
                         timeout=120, capture_output=True, text=True).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: " + dom[-500:]
    if screenshot is not None:
        subprocess.run(flags + [f"--screenshot={screenshot}", page.as_uri()], check=True, timeout=120, capture_output=True)
    return json.loads(html.unescape(found.group(1)))


def _assert_laid_out(probe: dict):
    graph, heatmap = probe["graph"], probe["heatmap"]
    assert graph and graph["visible"] and graph["width"] > 300 and graph["height"] > 200
    assert graph["top"] < probe["viewport"], "the conversion graph is not on the first screen"
    assert heatmap and heatmap["visible"] and heatmap["width"] > 200 and heatmap["height"] > 100
    broken = [i["alt"] for i in probe["imgs"] if not (i["complete"] and i["natural"] > 0 and i["width"] > 0)]
    assert probe["imgs"] and not broken, f"broken images: {broken}"


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        if os.environ.get("CONVQA_REQUIRE_CHROMIUM"):
            pytest.fail("CONVQA_REQUIRE_CHROMIUM is set but /usr/bin/chromium is missing")
        pytest.skip("no /usr/bin/chromium on this machine (apt-get install chromium)")
    return CHROMIUM


def test_failing_page_in_headless_chromium(chromium, report, tmp_path):
    shot = tmp_path / "report.png"
    probe = chromium_probe(report["paths"]["html"], tmp_path, screenshot=shot)
    _assert_laid_out(probe)
    assert "fail" in probe["edges"] and "pass" in probe["edges"]
    # the failing S->G edge is labelled with its most specific gate and the diagnosis
    assert any("S\u2192G F-LAYOUT-001" in t and "permuted Q/K" in t for t in probe["failing_labels"]), probe["failing_labels"]
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000


def test_passing_page_in_headless_chromium(chromium, inputs, tmp_path):
    rows = [_row("G0-INTEGRITY", "native/st", "pass"), _row("G0-INTEGRITY", "native/st-apr", "pass"),
            _row("F-CONV-S-A", "native/st-apr", "pass", reference="native/st", metric="normalized_max_abs", value=0,
                 threshold=0),
            _row("F-INF-apr-gpu-run", "native/st-apr", "skipped", reason="no CUDA device")]
    comparisons = {k: v for k, v in inputs["comparisons"].items() if k == "F-CONV-S-A native/st-apr"}
    paths = write_report(MODEL, [_write_tsv(tmp_path / "g.tsv", rows)], inputs["manifests"], inputs["sidecars"],
                         comparisons, tmp_path / "passing")
    page = paths["html"].read_text()
    assert "gpu: 1 row skipped, no CUDA device" in page and "Nothing failed and nothing was left unevaluated" in page
    probe = chromium_probe(paths["html"], tmp_path)
    _assert_laid_out(probe)
    assert set(probe["edges"]) == {"pass", "none"} and probe["failing_labels"] == []


# --- page size at SmolLM2 scale -----------------------------------------------------------------

def _smollm2_scale_evidence(base: dict) -> dict:
    """A passing evidence the size of the SmolLM2-135M mvp run: 30 layers (272 tensors), 44
    comparisons (40 bit-exact, 4 quantized at half their tolerance), 278 gate rows."""
    import copy
    roles = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{r}.weight" for i in range(30) for r in roles]
    from convqa.report.evidence import tensor_kind
    from convqa.arch import layer_index
    from convqa.gates.registry import family_of
    ev = copy.deepcopy(base)
    checks = []
    for j in range(44):
        lossy = j >= 40
        checks.append({"label": f"{'q8_0' if lossy else 'native'}/st-chain-{j}~st", "ok": True, "summary": {},
                       "config_differences": {}, "tokenizer_differences": {}, "tensors": [
                           {"name": n, "layer": layer_index(n), "kind": tensor_kind(n), "status": "within_tolerance",
                            "ok": True, "flagged": False, "blocks": "", "diagnosis": "", "max_abs": 0.0,
                            "normalized_max_abs": 0.0025 * (1 + (k % 7) / 10) if lossy and "norm" not in n else 0.0,
                            "tolerance": 0.005 if lossy else 0.0, "ref_encoding": "F32", "cand_encoding": "F32"}
                           for k, n in enumerate(names)]})
    ev["tensor_checks"] = checks
    rows = []
    for i in range(278):
        gate = ("G0-INTEGRITY", "G0-VALIDATE", "F-LAYOUT-001", "F-CONTRACT-I2", "F-CONV-S-G", "F-CONV-RT-001")[i % 6]
        rows.append({"gate": gate, "family": family_of(gate),
                     "subject": f"{'q8_0' if i % 2 else 'native'}/st-gguf-{i}", "reference": "native/st",
                     "metric": "m", "value": 0, "threshold": 0, "status": "pass", "reason": "", "model": "smollm2",
                     "variant": "native", "details": None, "source_table": "t.tsv", "source_line": i + 2})
    ev["gates"], ev["summary"] = rows, summarize(rows)
    return ev


def test_page_stays_under_a_megabyte_at_smollm2_scale(report, capsys):
    from convqa.report.html import render_html
    page = render_html(_smollm2_scale_evidence(report["evidence"]))
    size = len(page.encode("utf-8"))
    with capsys.disabled():
        print(f"\nreport.html at SmolLM2 scale: {size / 1e6:.2f} MB")
    assert size < 1_000_000
    parser = _RowCollector()
    parser.feed(page)
    alts = [alt for alt, _ in parser.imgs]
    # one heatmap for 44 comparisons; detail plots only for the 4 that come within 10x of tolerance
    assert alts.count("tensor error against tolerance, every comparison") == 1
    assert len([a for a in alts if a.startswith("per-tensor error by layer")]) == 4
