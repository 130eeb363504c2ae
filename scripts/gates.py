"""Rule tensor_gates: evaluate the tensor-level gates of one (model, variant, tier)."""

import json
import traceback
from collections import Counter

from convqa import gates

from convqa.workflow import plan


def load(path):
    with open(path) as fh:
        return json.load(fh)


model, variant, tier = snakemake.wildcards.model, snakemake.wildcards.variant, snakemake.wildcards.tier
inputs = snakemake.params.inputs
with open(snakemake.log[0], "w") as log:
    try:
        manifests = {chain: load(path) for chain, path in inputs["manifests"].items()}
        sidecars = {chain: load(path) for chain, path in inputs["sidecars"].items()}
        comparisons = {pair: load(path) for pair, path in inputs["comparisons"].items()}
        rows = []
        for chain in plan.chains_for(tier, variant):
            rows += gates.artifact_rows(manifests[chain], chain, model, variant)
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
            rows += gates.check_rows(check, check_inputs, model, variant)
        for chain in plan.artifact_chains(tier, variant):
            parent = plan.parent(chain)
            contract_inputs = {
                "manifest": manifests[chain],
                "parent_manifest": manifests[parent],
                "sidecar": sidecars[chain],
                "parent_chain": parent,
            }
            rows += gates.contract_rows(chain, contract_inputs, model, variant)
            rows += gates.conversion_failure_rows(chain, sidecars[chain], model, variant)
        gates.write_rows_tsv(rows, snakemake.output.gates)
        statuses = dict(Counter(row.status for row in rows))
        print(f"{model} {variant} {tier}: {len(rows)} gate rows {statuses}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
