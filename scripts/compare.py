"""Rule compare_tensors: compare a subject artifact against its reference, tensor by tensor."""

import traceback

from convqa.compare.tensors import compare_models
from convqa.formats import open_model
from convqa.sidecar import write_json

with open(snakemake.log[0], "w") as log:
    try:
        with open_model(snakemake.input.reference) as ref, open_model(snakemake.input.subject) as cand:
            result = compare_models(ref, cand)
        comparison = {
            "subject": snakemake.wildcards.subject,
            "reference": snakemake.wildcards.reference,
            **result.as_dict(),
        }
        write_json(snakemake.output.comparison, comparison)
        print(f"{snakemake.wildcards.subject} vs {snakemake.wildcards.reference}: {result.summary()}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
