"""Rule detection_matrix: results/detection/matrix.{json,md,html} from the detection models'
qualification.json files (convqa.detection.matrix)."""

from convqa.detection import matrix as detection
from convqa.workflow.joblog import job_log

with job_log(snakemake.log[0]) as log:
    params = snakemake.params
    matrix = detection.build_matrix(
        dict(params.section), dict(params.reports), dict(params.output_paths), dict(params.logits)
    )
    detection.write_matrix(matrix, snakemake.output.json, snakemake.output.markdown, snakemake.output.html)
    print(f"{matrix['summary']}", file=log)
