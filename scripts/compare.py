"""Rule compare_tensors: compare a subject artifact against its reference, tensor by tensor."""

from convqa.compare.tensors import compare_models
from convqa.errors import FormatError
from convqa.formats import open_model
from convqa.files import write_json
from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored

subject, reference = snakemake.wildcards.subject, snakemake.wildcards.reference
with job_log(snakemake.log[0]) as log, restored(snakemake.params.artifacts, log) as artifacts:
    comparison = {"subject": subject, "reference": reference}
    side = "reference"
    try:
        with open_model(artifacts["reference"]) as ref:
            side = "subject"
            with open_model(artifacts["subject"]) as cand:
                result = compare_models(ref, cand)
        comparison.update(result.as_dict())
        print(f"{subject} vs {reference}: {result.summary()}", file=log)
    except FormatError as exc:  # an unreadable artifact is a gate finding (convqa.gates), not a crash
        comparison.update(read_error=str(exc), read_error_side=side, tensors=[],
                          no_artifact=getattr(exc, "failure", None))
        print(f"{subject} vs {reference}: {side} unreadable: {exc}", file=log)
    write_json(snakemake.output.comparison, comparison)
