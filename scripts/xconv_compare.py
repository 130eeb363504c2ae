"""Rule xconv_compare: a side-by-side converter's artifact against the primary's (F-XCONV-001)
or against the input both converted (the edge gate), tensor by tensor."""

import json
from pathlib import Path

from convqa.compare.tensors import compare_models
from convqa.errors import FormatError
from convqa.formats import open_model
from convqa.files import write_json
from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored

with job_log(snakemake.log[0]) as log:
    sidecar = json.loads(Path(snakemake.input.sidecar).read_text())
    if sidecar["status"] == "not_run":
        comparison = {"unavailable": sidecar["reason"]}
    elif sidecar["status"] == "failed":
        comparison = {"unavailable": f"conversion failed (exit {sidecar['returncode']})"}
    else:
        comparison = {"subject": sidecar["label"], "reference": snakemake.wildcards.against}
        side = "reference"
        try:
            with restored({"reference": snakemake.params.artifacts["reference"]}, log) as artifacts, \
                    open_model(artifacts["reference"]) as ref:
                side = "subject"
                with open_model(sidecar["artifact"]) as cand:
                    result = compare_models(ref, cand)
            comparison.update(result.as_dict())
            print(f"{sidecar['label']} vs {snakemake.wildcards.against}: {result.summary()}", file=log)
        except FormatError as exc:  # an unreadable artifact (or a failed primary's placeholder) is a finding
            comparison.update(read_error=str(exc), read_error_side=side, tensors=[],
                              no_artifact=getattr(exc, "failure", None))
            print(f"{sidecar['label']} vs {snakemake.wildcards.against}: {side} unreadable: {exc}", file=log)
    write_json(snakemake.output.comparison, comparison)
