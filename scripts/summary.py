"""Rule summary: one row per model's qualification, and the overall verdict."""

from convqa.report.summary import write_summary
from convqa.workflow.joblog import job_log

with job_log(snakemake.log[0]) as log:
    summary = write_summary(list(snakemake.input.evidence), snakemake.output.json, snakemake.output.markdown)
    print(f"summary: {summary['verdict']} over {len(summary['models'])} models", file=log)
