"""Rule xconv_convert: run a side-by-side converter on one edge, into its own artifact directory.

The output-path contract holds as on the primary path. Neither a non-zero exit nor an exit 0
without the declared path fails the job: the sidecar records `status: failed` with the exit code
and the stderr tail (or the output-path message naming the expected path, the files written
instead and the converter), the artifact directory is left empty, and the xconv gates turn that
into `fail` rows, so the report shows the failure next to the other converters' results.
"""

import shutil
from pathlib import Path

from convqa.formats import ARTIFACT_NAME, no_artifact

from convqa.workflow import plan
from convqa.convert.converters import side_label
from convqa.convert.runner import (
    ConverterExitError,
    OutputPathError,
    artifact_sidecar,
    converter_record,
    expand_command,
    run_converter,
)
from convqa.files import write_json
from convqa.versions import CONVERSION_TOOLS, tool_versions
from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored


class UpstreamFailed(Exception):
    """The edge's input is a failed conversion's placeholder (convqa.formats.no_artifact)."""


params, wildcards = snakemake.params, snakemake.wildcards
artifact_dir = Path(snakemake.output.artifact)
artifact = artifact_dir / ARTIFACT_NAME[params.format]
extra = {
    "model": wildcards.model,
    "variant": wildcards.variant,
    "chain": wildcards.chain,
    "label": side_label(wildcards.chain, wildcards.converter),
    "parent": plan.parent(wildcards.chain),
    "input": params.artifacts["artifact"],
    "quant": params.quant,
    "env": params.env,
}
with job_log(snakemake.log[0]) as log, restored(snakemake.params.artifacts, log) as artifacts:
    artifact_dir.mkdir(parents=True, exist_ok=True)
    argv = expand_command(
        params.command,
        input=artifacts["artifact"],
        output=str(artifact),
        format=params.format,
        quant=params.quant,
    )
    upstream = no_artifact.read(artifacts["artifact"])
    try:
        if upstream is not None:  # the primary chain failed before this edge: nothing to convert
            raise UpstreamFailed(no_artifact.describe(upstream))
        result = run_converter(argv, artifacts["artifact"], str(artifact), log,
                               env=params.env, converter=wildcards.converter)
    except UpstreamFailed as not_run:
        print(f"not converted: {not_run}", file=log)
        sidecar = {"status": "not_run", "reason": str(not_run), "converter": wildcards.converter,
                   "fingerprint": params.fingerprint, "argv": argv, "tool_versions": tool_versions(CONVERSION_TOOLS), **extra}
    except (ConverterExitError, OutputPathError) as failure:
        print(f"{type(failure).__name__}: {failure}", file=log)
        # Nothing half-written may be mistaken for the converter's output.
        shutil.rmtree(artifact_dir)
        artifact_dir.mkdir()
        exited = isinstance(failure, ConverterExitError)
        sidecar = {
            "status": "failed",
            "converter": wildcards.converter,
            "fingerprint": params.fingerprint,
            "argv": failure.cmd if exited else argv,
            "returncode": failure.returncode if exited else 0,
            "stderr_tail": failure.stderr_tail if exited else "",
            "output_path_error": None if exited else str(failure),
            "stray": [] if exited else [str(p) for p in failure.strays],
            "tool_versions": tool_versions(CONVERSION_TOOLS),
            **extra,
        }
    else:
        sidecar = artifact_sidecar(
            artifact,
            converter=wildcards.converter,
            fingerprint=params.fingerprint,
            command=result,
            record=converter_record(result.stdout) if params.json_record else None,
            extra={"status": "ok", **extra},
        )
    write_json(snakemake.output.sidecar, sidecar)
