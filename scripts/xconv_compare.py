"""Rule xconv_compare: a side-by-side converter's artifact against the primary's (F-XCONV-001)
or against the input both converted (the edge gate), tensor by tensor."""

import json
import traceback
from pathlib import Path

from convqa.compare.tensors import compare_models
from convqa.formats import open_model
from convqa.sidecar import write_json

with open(snakemake.log[0], "w") as log:
    try:
        sidecar = json.loads(Path(snakemake.input.sidecar).read_text())
        if sidecar["status"] == "failed":
            comparison = {"unavailable": f"conversion failed (exit {sidecar['returncode']})"}
        else:
            with open_model(snakemake.input.reference) as ref, open_model(sidecar["artifact"]) as cand:
                result = compare_models(ref, cand)
            comparison = {"subject": sidecar["label"], "reference": snakemake.wildcards.against, **result.as_dict()}
            print(f"{sidecar['label']} vs {snakemake.wildcards.against}: {result.summary()}", file=log)
        write_json(snakemake.output.comparison, comparison)
    except Exception:
        traceback.print_exc(file=log)
        raise
