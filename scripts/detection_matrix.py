"""Rule detection_matrix: results/detection/matrix.{json,md,html} from the detection models'
qualification.json files (convqa.detection.matrix)."""

import traceback

from convqa.detection import matrix as detection

with open(snakemake.log[0], "w") as log:
    try:
        params = snakemake.params
        matrix = detection.build_matrix(
            dict(params.section), dict(params.reports), dict(params.output_paths), dict(params.logits)
        )
        detection.write_matrix(matrix, snakemake.output.json, snakemake.output.markdown, snakemake.output.html)
        print(f"{matrix['summary']}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
