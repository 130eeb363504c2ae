"""Code fingerprints come from what each rule's script imports: an edit to the GGUF module
changes exactly the fingerprints of the jobs that write or read GGUF, a touch changes none.

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


def touches_gguf(job: dict) -> bool:
    """The job writes or reads a GGUF file: a .gguf among its files, a side converter's artifact
    directory of a GGUF chain, or a source built from a GGUF."""
    files = job["input"] + job["output"]
    if any(f.endswith(".gguf") for f in files):
        return True
    side = [f for f in files if f.endswith("/artifact") and "/xconv/" in f]
    return any(chain_is_gguf(f.split("/")[-2]) for f in side)


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


def test_touching_the_gguf_module_changes_no_fingerprint(workflow, baseline, tmp_path):
    wf = workflow.clone(tmp_path / "touched")
    future = time.time() + 60
    os.utime(wf.package / "formats" / "gguf.py", (future, future))
    after = dag_jobs(wf)
    assert {k: fingerprints(j) for k, j in after.items()} == {k: fingerprints(j) for k, j in baseline.items()}


def test_editing_the_gguf_module_changes_exactly_the_gguf_jobs(workflow, baseline, tmp_path):
    wf = workflow.clone(tmp_path / "edited")
    with open(wf.package / "formats" / "gguf.py", "a") as fh:
        fh.write("\n# a real change: this comment changes the module's content\n")
    after = dag_jobs(wf)
    assert after.keys() == baseline.keys()
    changed = {k for k in baseline if fingerprints(after[k]) != fingerprints(baseline[k])}
    expected = {k for k, job in baseline.items() if touches_gguf(job)}
    assert changed == expected, (
        f"changed but not GGUF: {sorted(k[:2] for k in changed - expected)[:5]}; "
        f"GGUF but unchanged: {sorted(k[:2] for k in expected - changed)[:5]}"
    )
    rules = {k[0] for k in changed}
    assert {"convert_to_gguf", "convert_to_apr", "convert_to_safetensors", "inspect_artifact", "compare_tensors",
            "xconv_convert", "xconv_inspect", "xconv_compare", "infer", "infer_reference"} <= rules
    assert not rules & {"tensor_gates", "xconv_gates", "inference_gates", "report", "summary", "inspect_source"}
    # No GGUF anywhere on S -> A: its conversions keep their fingerprints.
    untouched = {k for k in baseline if k[0].startswith("convert_to") and "st-apr\"" in k[1]}
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
