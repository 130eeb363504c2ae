"""Rule tensor_gates: evaluate the tensor-level gates of one (model, variant, tier)."""

from collections import Counter

from convqa.gates.rows import write_rows_tsv
from convqa.gates.tensor_table import tensor_gate_rows
from convqa.workflow.joblog import job_log

model, variant, tier = snakemake.wildcards.model, snakemake.wildcards.variant, snakemake.wildcards.tier
with job_log(snakemake.log[0]) as log:
    rows = tensor_gate_rows(model, variant, tier, snakemake.params.inputs)
    write_rows_tsv(rows, snakemake.output.gates)
    statuses = dict(Counter(row.status for row in rows))
    print(f"{model} {variant} {tier}: {len(rows)} gate rows {statuses}", file=log)
