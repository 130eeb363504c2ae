"""Rule report: a model's qualification.json, report.md, report.html and junit.xml."""

import traceback
from pathlib import Path

from convqa.report.build import write_report

inputs = snakemake.params.inputs
with open(snakemake.log[0], "w") as log:
    try:
        outputs = write_report(
            snakemake.wildcards.model,
            inputs["gate_tsvs"],
            inputs["manifests"],
            inputs["sidecars"],
            inputs["comparisons"],
            Path(snakemake.output.evidence).parent,
            extra={"tier": snakemake.wildcards.tier},
        )
        for name, path in outputs.items():
            print(f"{name}: {path}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
