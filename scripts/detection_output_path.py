"""Rule detection_output_path: the output-path contract of one mutant, and of the correct
converter on the same input, each run in a scratch directory (convqa.detection.matrix)."""

from convqa.detection import matrix as detection
from convqa.files import write_json
from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored

mutant = snakemake.wildcards.mutant
entry = next(e for e in detection.entries(snakemake.config["detection"]) if e.mutant == mutant)
with job_log(snakemake.log[0]) as log, restored(snakemake.params.artifacts, log) as artifacts:
    rows = detection.output_path_check(entry, artifacts["artifact"], snakemake.params.quant)
    write_json(snakemake.output.json, {"mutant": mutant, "rows": rows})
    for row in rows:
        print(f"{row['converter']}: {row['status']} {row['reason']}", file=log)
