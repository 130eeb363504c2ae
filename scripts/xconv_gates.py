"""Rule xconv_gates: the gate rows of every side-by-side conversion of one (model, variant, tier)."""

import json
import traceback

from convqa import gates

from convqa.gates import cross_converter as xconv


def load(path):
    with open(path) as fh:
        return json.load(fh)


model, variant = snakemake.wildcards.model, snakemake.wildcards.variant
with open(snakemake.log[0], "w") as log:
    try:
        rows = []
        for slot in snakemake.params.slots:
            loaded = {key: load(slot[key]) for key in ("sidecar", "manifest", "vs_primary", "vs_parent",
                                                       "primary_manifest", "parent_manifest")}
            rows += xconv.side_rows(slot, loaded, model, variant)
        gates.write_rows_tsv(rows, snakemake.output.gates)
        for row in rows:
            print(f"{row.gate} {row.subject}: {row.status} {row.reason}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
