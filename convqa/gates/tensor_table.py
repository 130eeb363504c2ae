"""The tensor-level gate table of one (model, variant, tier): rule tensor_gates (scripts/gates.py).

Reads the manifests, sidecars and comparisons the workflow wrote (JSON) and evaluates, in this
order: the per-artifact gates of every chain, every planned comparison check (a first hop's
with its F-QUANT-001 row in lossy variants), and the contract
gates of every converted artifact against its parent.
"""

from __future__ import annotations

import json

from convqa.gates.artifact import artifact_rows
from convqa.gates.contracts import contract_rows
from convqa.gates.edges import check_rows
from convqa.gates.output_contract import conversion_failure_rows
from convqa.gates.quantizer import applies as quantizer_applies
from convqa.gates.quantizer import quantizer_rows
from convqa.gates.rows import GateRow
from convqa.workflow import plan


def _load(path):
    with open(path) as fh:
        return json.load(fh)


def tensor_gate_rows(model: str, variant: str, tier: str, inputs: dict) -> list[GateRow]:
    """inputs: `manifests` and `sidecars` (chain -> path), `comparisons` ("subject~reference" -> path)."""
    manifests = {chain: _load(path) for chain, path in inputs["manifests"].items()}
    sidecars = {chain: _load(path) for chain, path in inputs["sidecars"].items()}
    comparisons = {pair: _load(path) for pair, path in inputs["comparisons"].items()}
    rows = []
    for chain in plan.chains_for(tier, variant):
        rows += artifact_rows(manifests[chain], chain, model, variant)
    for check in plan.checks_for(tier, variant):
        if check.mode == "bytes":
            check_inputs = {
                "subject_sha256": sidecars[check.subject]["sha256"],
                "reference_sha256": sidecars[check.reference]["sha256"],
                "subject_failure": sidecars[check.subject].get("conversion_failed"),
                "reference_failure": sidecars[check.reference].get("conversion_failed"),
            }
        else:
            check_inputs = {"comparison": comparisons[f"{check.subject}~{check.reference}"]}
        rows += check_rows(check, check_inputs, model, variant)
        if variant != "native" and quantizer_applies(check):
            rows += quantizer_rows(check, check_inputs["comparison"], model, variant)
    for chain in plan.artifact_chains(tier, variant):
        parent = plan.parent(chain)
        contract_inputs = {
            "manifest": manifests[chain],
            "parent_manifest": manifests[parent],
            "sidecar": sidecars[chain],
            "parent_chain": parent,
        }
        rows += contract_rows(chain, contract_inputs, model, variant)
        rows += conversion_failure_rows(chain, sidecars[chain], model, variant)
    return rows
