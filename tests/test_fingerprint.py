"""Code fingerprints come from what each rule's script imports: an edit to the GGUF writer
changes exactly the fingerprints of the jobs that write GGUF (and Snakemake reruns what reads
their output), an edit to the reader those of the jobs that read GGUF; a touch, a comment or a
docstring changes none.

The DAG is built by Snakemake itself (tests/snakemake_jobs.py, in a subprocess) over a copy of
the workflow and of the package (PYTHONPATH), so the edit never touches the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from convqa.workflow import plan
from convqa.workflow.fingerprint import module_closure, script_fingerprint, script_imports
from workflow_copy import REPO, Workflow

JOBS = Path(__file__).with_name("snakemake_jobs.py")
CODE_PARAMS = ("fingerprint", "code")


def workflow_config() -> dict:
    """The default config plus a side-by-side converter on three edges (the xconv rules)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["converters"]["other"] = {"command": "convqa convert {input} {output} --to {format} {quant_arg}"}
    config["route"] = {"st-gguf": ["convqa", "other"], "gguf-apr": ["other", "convqa"], "apr-st": ["convqa", "other"]}
    return config


def dag_jobs(wf: Workflow) -> dict[tuple, dict]:
    proc = subprocess.run([sys.executable, str(JOBS), str(wf.workdir), "all", "test-config.yaml"],
                          cwd=wf.workdir, env=wf.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = {}
    for line in proc.stdout.splitlines():
        job = json.loads(line)
        jobs[(job["rule"], json.dumps(job["wildcards"], sort_keys=True), tuple(job["output"]))] = job
    return jobs


def fingerprints(job: dict) -> dict:
    return {k: job["params"][k] for k in CODE_PARAMS if k in job["params"]}


def chain_is_gguf(chain: str | None) -> bool:
    return bool(chain) and chain != "st" and plan.target_format(chain) == "gguf"


def gguf_files(files: list[str]) -> bool:
    """A .gguf among `files`, or a side converter's artifact directory of a GGUF chain."""
    if any(f.endswith(".gguf") for f in files):
        return True
    side = [f for f in files if f.endswith("/artifact") and "/xconv/" in f]
    return any(chain_is_gguf(f.split("/")[-2]) for f in side)


def writes_gguf(job: dict) -> bool:
    return gguf_files(job["output"])


def read_files(job: dict) -> list[str]:
    """The job's inputs and the artifacts it reads (a converted artifact's reader declares its
    sidecar and gets the path in params.artifacts; convqa.workflow.intermediates)."""
    artifacts = job["params"].get("artifacts")
    return job["input"] + (list(artifacts.values()) if isinstance(artifacts, dict) else [])


def reads_gguf(job: dict) -> bool:
    """A GGUF among the files the job reads, or a source built from a GGUF (the bundled SmolLM2's
    input is the package's GGUF file, which tests may see under another name)."""
    return gguf_files(read_files(job)) or (job["rule"] == "prepare_source" and job["wildcards"]["model"] == "smollm2")


def downstream(jobs: dict, changed: set) -> set:
    """`changed` and every job that reads, transitively, what one of them writes: what Snakemake
    reruns when the jobs in `changed` rerun."""
    produced_by = {out: key for key, job in jobs.items() for out in job["output"]}
    result, frontier = set(changed), set(changed)
    while frontier:
        outputs = {out for key in frontier for out in jobs[key]["output"]}
        frontier = {key for key, job in jobs.items()
                    if key not in result and any(i in outputs or i.startswith(tuple(o + "/" for o in outputs))
                                                 for i in job["input"])}
        result |= frontier
    assert produced_by  # the DAG has outputs at all
    return result


def edited(workflow: Workflow, tmp_path: Path, module: str, text: str) -> dict:
    """The DAG's jobs after appending `text` to convqa/formats/<module> in a copy of the package."""
    wf = workflow.clone(tmp_path / module.replace(".", "_"))
    with open(wf.package / "formats" / module, "a") as fh:
        fh.write(text)
    return dag_jobs(wf)


def changed_jobs(baseline: dict, after: dict) -> set:
    assert after.keys() == baseline.keys()
    return {k for k in baseline if fingerprints(after[k]) != fingerprints(baseline[k])}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Workflow:
    return Workflow.create(tmp_path_factory.mktemp("fingerprint"), workflow_config())


@pytest.fixture(scope="module")
def baseline(workflow) -> dict:
    return dag_jobs(workflow)


def test_every_job_that_runs_convqa_code_carries_a_fingerprint(baseline):
    rules = {job["rule"] for job in baseline.values()}
    assert {"xconv_convert", "xconv_compare", "infer", "serve_check", "infer_reference", "summary"} <= rules
    for job in baseline.values():
        if job["rule"] != "all":
            assert job["params"].get("fingerprint"), job["rule"]


def test_touching_the_gguf_modules_changes_no_fingerprint(workflow, baseline, tmp_path):
    wf = workflow.clone(tmp_path / "touched")
    future = time.time() + 60
    for module in ("gguf.py", "gguf_writer.py", "gguf_keys.py"):
        os.utime(wf.package / "formats" / module, (future, future))
    after = dag_jobs(wf)
    assert {k: fingerprints(j) for k, j in after.items()} == {k: fingerprints(j) for k, j in baseline.items()}


def test_a_comment_or_docstring_edit_changes_no_fingerprint(workflow, baseline, tmp_path):
    wf = workflow.clone(tmp_path / "commented")
    for module in ("gguf.py", "gguf_writer.py"):
        path = wf.package / "formats" / module
        text = path.read_text().replace('"""', '"""Reworded docstring. ', 1)
        text = text.replace("\ndef ", "\n# a comment, and the blank line below\n\ndef ", 1)
        path.write_text(text + "\n# a comment at the end\n")
    after = dag_jobs(wf)
    assert changed_jobs(baseline, after) == set()


def test_a_writer_edit_changes_exactly_the_jobs_that_write_gguf(workflow, baseline, tmp_path):
    after = edited(workflow, tmp_path, "gguf_writer.py", "\n_A_REAL_CHANGE = 1\n")
    changed = changed_jobs(baseline, after)
    expected = {k for k, job in baseline.items() if writes_gguf(job)}
    assert changed == expected, (
        f"changed but not writing GGUF: {sorted(k[:2] for k in changed - expected)[:5]}; "
        f"writing GGUF but unchanged: {sorted(k[:2] for k in expected - changed)[:5]}"
    )
    assert {k[0] for k in changed} == {"convert_to_gguf", "xconv_convert"}
    rerun = downstream(baseline, changed)
    rules = {k[0] for k in rerun}
    assert {"inspect_artifact", "compare_tensors", "convert_to_apr", "convert_to_safetensors", "infer",
            "tensor_gates", "report", "summary"} <= rules
    # SmolLM2's source is imported G->S with the GGUF *reader*: it and its S->A chains stay.
    assert not [k for k in rerun if k[0] == "prepare_source"]
    assert not [k for k in rerun if k[0] == "convert_to_apr" and '"st-apr"' in k[1]]
    # Everything reading a rerun GGUF reruns: each reader of a .gguf a changed job writes is downstream.
    written = {out for k in changed for out in baseline[k]["output"]}
    readers = {k for k, job in baseline.items() if set(job["input"]) & written}
    assert readers and readers <= rerun


def test_a_reader_edit_changes_exactly_the_jobs_that_read_gguf(workflow, baseline, tmp_path):
    after = edited(workflow, tmp_path, "gguf.py", "\n_A_REAL_CHANGE = 1\n")
    changed = changed_jobs(baseline, after)
    expected = {k for k, job in baseline.items() if reads_gguf(job)}
    assert changed == expected, (
        f"changed but not reading GGUF: {sorted(k[:2] for k in changed - expected)[:5]}; "
        f"reading GGUF but unchanged: {sorted(k[:2] for k in expected - changed)[:5]}"
    )
    rules = {k[0] for k in changed}
    assert {"prepare_source", "convert_to_apr", "convert_to_safetensors", "inspect_artifact", "compare_tensors",
            "xconv_inspect", "xconv_compare", "infer", "infer_reference"} <= rules
    assert not rules & {"tensor_gates", "xconv_gates", "inference_gates", "report", "summary", "inspect_source"}
    # S -> G only writes GGUF: a reader fix leaves those conversions alone.
    assert not [k for k in changed if k[0] == "convert_to_gguf" and "smollm2" not in k[1]]
    # No GGUF anywhere on S -> A of a SafeTensors source: its conversions keep their fingerprints.
    untouched = {k for k in baseline if k[0].startswith("convert_to") and "st-apr\"" in k[1] and "smollm2" not in k[1]}
    assert untouched and not untouched & changed


def test_script_imports_are_the_modules_its_import_statements_name(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import json\n"
        "from convqa import gates\n"
        "from convqa.formats import open_model\n"
        "def later():\n"
        "    from convqa.workflow.plan import parent\n"
    )
    assert script_imports(script) == ("convqa", "convqa.formats", "convqa.gates", "convqa.workflow.plan")


def test_inference_gates_hash_the_run_loader_its_script_imports():
    """The hand-kept list this replaced (convqa.gates.inference, convqa.compare.inference,
    convqa.gates) had drifted: scripts/inference_gates.py also imports convqa.infer.run."""
    script = REPO / "scripts" / "inference_gates.py"
    assert "convqa.infer.run" in module_closure(list(script_imports(script)))
    assert script_fingerprint(str(script)) != script_fingerprint(str(REPO / "scripts" / "gates.py"))
