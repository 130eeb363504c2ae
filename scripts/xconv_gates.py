"""Rule xconv_gates: the gate rows of every side-by-side conversion of one (model, variant, tier)."""

from convqa.gates.cross_converter import side_by_side_rows
from convqa.gates.rows import write_rows_tsv
from convqa.workflow.joblog import job_log

model, variant = snakemake.wildcards.model, snakemake.wildcards.variant
with job_log(snakemake.log[0]) as log:
    rows = side_by_side_rows(snakemake.params.slots, model, variant)
    write_rows_tsv(rows, snakemake.output.gates)
    for row in rows:
        print(f"{row.gate} {row.subject}: {row.status} {row.reason}", file=log)
