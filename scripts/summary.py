"""Rule summary: one row per model's qualification, and the overall verdict."""

import traceback

from convqa.report.summary import write_summary

with open(snakemake.log[0], "w") as log:
    try:
        summary = write_summary(list(snakemake.input.evidence), snakemake.output.json, snakemake.output.markdown)
        print(f"summary: {summary['verdict']} over {len(summary['models'])} models", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
