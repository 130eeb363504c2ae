"""The inference matrix in a real workflow run (smoke tier, one tiny synthetic model, both
variants): runs, servers, the inference gate table and the report's inference section.

The run extends a clone of the session's q8_0 mvp run (tests/workflow_runs.py) to the smoke tier
with native and the default matrix; the workflow and the package are copied into a temporary
directory (tests/workflow_copy.py).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from workflow_copy import REPO
from workflow_runs import run_config

MODEL = "qwen2-tiny"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(qwen2_mvp, tmp_path_factory) -> Path:
    """The smoke tier with the default inference matrix (both variants, cpu and gpu, servers), run
    in a clone of the session's q8_0 mvp run (tests/workflow_runs.py): its source, ground truth on
    cpu and q8_0 first hops with their cpu runs are reused, everything else runs here."""
    config = yaml.safe_load((REPO / "config/examples/synthetic-only.yaml").read_text())
    config["models"] = {MODEL: config["models"][MODEL]}
    config["tier"] = "smoke"
    # gpu cells as a cluster with GPU nodes plans them: the jobs run and, with no device here,
    # write their skipped records (gpu_jobs auto would plan none on this machine).
    config["gpu_jobs"] = "run"
    assert config["models"] == run_config()["models"], "the same model as the run it extends"
    wf = qwen2_mvp.clone(tmp_path_factory.mktemp("infer-wf"))
    wf.write_config(config)
    (wf.workdir / STARTED).write_text(repr(time.time()))
    wf.run("smoke")
    return wf.workdir


STARTED = ".smoke-run-started"


def current_files(workdir: Path, pattern: str) -> list[str]:
    """Files under results/{MODEL} matching `pattern`, but for what the q8_0-only run this one
    extends left of its S->A family (q8_0 owned it there; with native beside it, native does:
    plan.owning_variant), which this run must not have written."""
    started = float((workdir / STARTED).read_text())
    root = workdir / f"results/{MODEL}"
    found = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern))
    leftovers = [p for p in found if p.startswith(("q8_0/st-apr", "q8_0/reference/st-apr"))]
    assert all((root / p).stat().st_mtime < started for p in leftovers), leftovers
    return [p for p in found if p not in leftovers]


def gate_table(workdir: Path, variant: str) -> dict[tuple[str, str], dict]:
    path = workdir / f"results/{MODEL}/{variant}/gates/smoke/inference.tsv"
    with open(path, newline="") as fh:
        return {(r["gate"], r["subject"]): r for r in csv.DictReader(fh, delimiter="\t")}


def test_inference_gates_pass_for_correct_conversions(workdir):
    for variant in ("native", "q8_0"):
        rows = gate_table(workdir, variant)
        expected_cpu = {
            ("F-INF-gguf-cpu-run", f"{variant}/st-gguf/transformers"),
            ("F-INF-gguf-cpu-chat", f"{variant}/st-gguf/transformers"),
            ("F-INF-gguf-cpu-run", f"{variant}/st-gguf/llama.cpp"),
            ("F-INF-gguf-cpu-chat", f"{variant}/st-gguf/llama.cpp"),
            ("F-INF-apr-cpu-run", f"{variant}/st-apr/transformers"),
            ("F-INF-apr-cpu-chat", f"{variant}/st-apr/transformers"),
            ("F-ENGINE-001", f"{variant}/st-gguf/llama.cpp"),
            ("F-SERVE-001", f"{variant}/st-gguf/llama.cpp"),
            ("F-SERVE-001", f"{variant}/st-apr/transformers"),
            ("F-TOK-001", f"{variant}/st-gguf/llama.cpp"),
            ("F-CHAT-001", f"{variant}/st/transformers"),
            ("F-CHAT-001", f"{variant}/st-gguf/transformers"),
            ("F-CHAT-001", f"{variant}/st-gguf/llama.cpp"),
            ("F-CHAT-001", f"{variant}/st-apr/transformers"),
        }
        assert expected_cpu <= set(rows)
        for key in expected_cpu:
            assert rows[key]["status"] == "pass", rows[key]
        if variant == "native":
            assert rows[("F-INF-apr-cpu-run", "native/st-apr/transformers")]["value"] == "0"
            assert not [gate for gate, _ in rows if gate.startswith("F-INF-REF")], "lossless: no reference"
        else:  # the reference-quantized model (schema default reference_tolerances): bit for bit
            for modality in ("run", "chat"):
                row = rows[(f"F-INF-REF-gguf-cpu-{modality}", "q8_0/st-gguf/transformers")]
                assert (row["status"], row["value"], row["reference"]) == ("pass", "0", "q8_0/st-gguf/reference")
            # S->A is native's conversion (q8_0 does not quantize it): native's bit-exact F-INF rows
            # judge its run, so no reference model and no F-INF-REF row (Jobs.judged_by_owner).
            assert not [gate for gate, subject in rows if gate.startswith("F-INF-REF-apr")]
            assert not [gate for gate, subject in rows if gate.startswith("F-INF-REF") and "llama.cpp" in subject]
        gpu = [r for (gate, _), r in rows.items() if "-gpu-" in gate]
        assert gpu and all(r["status"] == "skipped" and r["reason"] for r in gpu)


def test_the_ground_truth_runs_once_per_model_references_once_per_lossy_first_hop_and_no_server_outlives_its_job(workdir):
    assert (workdir / f"results/{MODEL}/source.infer/transformers-cpu.npz").exists()
    references = current_files(workdir, "*/reference/*/transformers-cpu.npz")
    # q8_0's S->A is native's conversion (plan.owning_variant): no reference model of it.
    assert references == ["q8_0/reference/st-gguf/transformers-cpu.npz"]
    # gpu is in the matrix: its ground truth and references run there too (each backend is
    # judged against its own, convqa.workflow.references); without a device they are skipped.
    for path in ("source.infer/transformers-gpu.json", "q8_0/reference/st-gguf/transformers-gpu.json"):
        record = json.loads((workdir / f"results/{MODEL}" / path).read_text())
        assert record["backend"] == "gpu" and (record["skipped"] or not record["error"]), record
    assert not list((workdir / f"results/{MODEL}").glob("*/st/infer"))
    # Parity once per artifact: the source's once per model, each conversion's once (q8_0's S->A
    # is native's).
    parities = current_files(workdir, "**/parity.json")
    assert parities == ["native/st-apr/infer/parity.json", "native/st-gguf/infer/parity.json",
                        "q8_0/st-gguf/infer/parity.json", "source.infer/parity.json"]
    served = [workdir / f"results/{MODEL}" / p for p in current_files(workdir, "**/serve-*.json")]
    assert len(served) == 3  # config inference.serve: st-apr (transformers) once, st-gguf (llama.cpp) per variant
    for path in served:
        pid = json.loads(path.read_text())["server_pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_report_shows_inference_rows_throughput_and_details(workdir):
    evidence = json.loads((workdir / f"results/{MODEL}/report/smoke/qualification.json").read_text())
    families = {r["family"] for r in evidence["gates"]}
    assert {"F-INF", "F-ENGINE", "F-SERVE", "F-TOK", "F-CHAT"} <= families
    throughput = evidence["inference"]["throughput"]
    assert {(t["format"], t["engine"]) for t in throughput} >= {("gguf", "llama.cpp"), ("apr", "transformers")}
    assert all(t["prefill_tps"] > 0 for t in throughput)
    labels = {d["label"] for d in evidence["inference"]["details"]}
    assert "q8_0/st-gguf/llama.cpp-cpu" in labels
    assert "## Inference" in (workdir / f"results/{MODEL}/report/smoke/report.md").read_text()
    # F-BACKEND-001 (transformers on the source, llama.cpp on the GGUF, per variant) is counted apart.
    backend = [r for r in evidence["gates"] if r["gate"] == "F-BACKEND-001"]
    assert len(backend) == 4 and evidence["summary"]["outside_verdict"]["rows"] == 4
    assert evidence["summary"]["rows"] == len(evidence["gates"]) - 4
