"""Rule inference_gates: F-INF, F-INF-REF, F-ENGINE-001, F-SERVE-001, F-BACKEND-001, F-TOK-001 and F-CHAT-001 rows of
one (model, variant, tier), plus the throughput table and per-prompt details the report shows."""

from collections import Counter

from convqa.files import write_json
from convqa.gates.inference_table import inference_gate_rows
from convqa.gates.rows import write_rows_tsv
from convqa.workflow.joblog import job_log

model, variant = snakemake.wildcards.model, snakemake.wildcards.variant
with job_log(snakemake.log[0]) as log:
    key, rows, extra = inference_gate_rows(
        model, variant, snakemake.params.inputs, dict(snakemake.params.tolerances),
        dict(snakemake.params.reference_tolerances), tuple(snakemake.params.modalities),
        backend_tolerances=dict(snakemake.params.backend_tolerances),
    )
    print(f"tolerances: inference.tolerances.{key}", file=log)
    write_rows_tsv(rows, snakemake.output.gates)
    write_json(snakemake.output.extra, extra)
    statuses = dict(Counter(row.status for row in rows))
    print(f"{model} {variant}: {len(rows)} inference gate rows {statuses}", file=log)
