"""Rule compare_tensors: compare a subject artifact against its reference, tensor by tensor.

Decided from the two manifests when they prove the values equal (convqa.compare.manifests), so an
exact comparison needs neither artifact on disk; otherwise both are opened (restored first if
they were deleted after use) and compared in full. Replayed when both sides are the bytes an
earlier run compared (convqa.workflow.replay)."""

import json
from pathlib import Path

from convqa.compare.manifests import compare_from_manifests
from convqa.compare.tensors import compare_models
from convqa.errors import FormatError
from convqa.formats import open_model
from convqa.files import write_json
from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import RestoreError, restored
from convqa.workflow.replay import run_or_replay


def compare() -> bool:
    subject, reference = snakemake.wildcards.subject, snakemake.wildcards.reference
    manifests = {side: json.loads(Path(snakemake.input[f"{side}_manifest"]).read_text()) for side in ("subject", "reference")}
    with job_log(snakemake.log[0]) as log:
        comparison = {"subject": subject, "reference": reference}
        decided = compare_from_manifests(manifests["reference"], manifests["subject"])
        if decided is not None:
            comparison.update(decided)
            print(f"{subject} vs {reference}: decided from the manifests: {decided['summary']}", file=log)
        else:
            try:
                with restored(snakemake.params.artifacts, log, drop_regenerated=snakemake.params.exact) as artifacts:
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
            except RestoreError as exc:  # deleted after use and not reproducible (a non-deterministic converter)
                comparison.update(read_error=str(exc), read_error_side="deleted artifact", tensors=[])
                print(f"{subject} vs {reference}: {exc}", file=log)
        write_json(snakemake.output.comparison, comparison)
    # A restore that gave other bytes (a non-deterministic converter) is not a property of the inputs.
    return comparison.get("read_error_side") != "deleted artifact"


run_or_replay(snakemake, compare)
