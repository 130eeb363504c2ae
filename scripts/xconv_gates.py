"""Rule xconv_gates: the gate rows of every side-by-side conversion of one (model, variant, tier)."""

import traceback

from convqa.gates.cross_converter import side_by_side_rows
from convqa.gates.rows import write_rows_tsv

model, variant = snakemake.wildcards.model, snakemake.wildcards.variant
with open(snakemake.log[0], "w") as log:
    try:
        rows = side_by_side_rows(snakemake.params.slots, model, variant)
        write_rows_tsv(rows, snakemake.output.gates)
        for row in rows:
            print(f"{row.gate} {row.subject}: {row.status} {row.reason}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
