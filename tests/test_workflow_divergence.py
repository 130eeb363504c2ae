"""The first divergent layer in a real workflow run: a model whose S->G edge is converted by the
skip-qk-permute mutant, and the same model converted correctly. The mutant's failing transformers
row names layer 0's self_attn in the gate table, the evidence and report.html (with the curve as
an inline PNG); the correct model's rows pass and name no layer.

The workflow and the package are copied into a temporary directory (tests/workflow_copy.py).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from workflow_copy import Workflow

from convqa.detection.matrix import converter_name, mutant_command

pytestmark = pytest.mark.slow

MUTANT = "skip-qk-permute"
SOURCE = {"kind": "synthetic", "preset": "llama-tiny", "seed": 0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    config = {
        "tier": "smoke",
        "variants": ["native"],
        "converters": {
            "convqa": {"command": "convqa convert {input} {output} --to {format} {quant_arg} --json", "json_record": True},
            converter_name(MUTANT): {"command": mutant_command(MUTANT), "json_record": True,
                                     "version": converter_name(MUTANT), "edges": ["st-gguf"]},
        },
        "inference": {"engines": ["transformers"], "backends": ["cpu"], "modalities": ["run", "chat"],
                      "max_new_tokens": 4, "threads": 1, "serve": {"smoke": []}},
        "models": {
            "bad": {"source": SOURCE, "route": {"st-gguf": converter_name(MUTANT)}},
            "good": {"source": SOURCE},
        },
    }
    wf = Workflow.create(tmp_path_factory.mktemp("divergence-wf"), config)
    wf.run("results/bad/report/smoke/report.html", "results/good/report/smoke/report.html")
    return wf.workdir


def rows(workdir: Path, model: str) -> dict[str, dict]:
    with open(workdir / f"results/{model}/native/gates/smoke/inference.tsv", newline="") as fh:
        return {(r["gate"], r["subject"]): r for r in csv.DictReader(fh, delimiter="\t")}


def test_the_mutants_failing_row_names_layer_0_self_attn(workdir):
    row = rows(workdir, "bad")[("F-INF-gguf-cpu-run", "native/st-gguf/transformers")]
    assert row["status"] == "fail"
    details = json.loads(row["details"])
    assert details["diagnosis"].startswith("diverges at layer 0, self_attn output")
    divergence = details["divergence"]
    first = divergence["first"]
    assert divergence["points"][first]["layer"] == 0 and divergence["points"][first]["sublayer"] == "self_attn"
    assert all(v == 0.0 for v in divergence["values"][:first])  # embedding and layer 0's norm are exact
    page = (workdir / "results/bad/report/smoke/report.html").read_text()
    assert "diverges at layer 0, self_attn output" in page
    assert 'alt="first divergent layer, native/st-gguf/transformers"' in page
    assert 'id="logit-evidence"' in page
    evidence = json.loads((workdir / "results/bad/report/smoke/qualification.json").read_text())
    diagnosed = [r for r in evidence["gates"] if r["gate"] == "F-INF-gguf-cpu-run"]
    assert diagnosed[0]["details"]["diagnosis"].startswith("diverges at layer 0, self_attn output")


def test_a_correct_conversion_names_no_layer(workdir):
    for key, row in rows(workdir, "good").items():
        if key[0].startswith("F-INF-"):
            assert row["status"] == "pass", row
            assert "divergence" not in (json.loads(row["details"]) if row["details"] else {})
    page = (workdir / "results/good/report/smoke/report.html").read_text()
    assert "diverges at" not in page and "first divergent layer," not in page
    assert len(page.encode()) < 1_000_000
