"""Rule convert_to_{gguf,apr,safetensors}: run the configured converter on one edge, enforce
the output path, and write the artifact's sidecar. A converter that fails leaves a placeholder
(convqa.formats.no_artifact) that the gates judge, so the job succeeds and the report is written.
A re-run whose bytes equal the conversion it repeats is stored as a hard link to it
(convqa.workflow.intermediates.share_bytes)."""

from convqa.workflow import plan
from convqa.convert.runner import artifact_sidecar, convert_or_leave_placeholder, converter_record, expand_command
from convqa.files import write_json
from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored, share_bytes

params, wildcards = snakemake.params, snakemake.wildcards
with job_log(snakemake.log[0]) as log, restored(snakemake.params.artifacts, log) as artifacts:
    argv = expand_command(
        params.command,
        input=artifacts["artifact"],
        output=snakemake.output.artifact,
        format=params.format,
        quant=params.quant,
    )
    result, failure = convert_or_leave_placeholder(
        argv, artifacts["artifact"], snakemake.output.artifact, log, chain=wildcards.chain,
        directory=params.format == "safetensors", env=params.env, converter=params.converter,
    )
    sidecar = artifact_sidecar(
        snakemake.output.artifact,
        converter=params.converter,
        fingerprint=params.fingerprint,
        command=result,
        record=converter_record(result.stdout) if result and params.json_record else None,
        extra={
            "model": wildcards.model,
            "variant": wildcards.variant,
            "chain": wildcards.chain,
            "parent": plan.parent(wildcards.chain),
            "input": artifacts["artifact"],
            "quant": params.quant,
            "env": params.env,  # what a restore of this artifact runs the converter with
            "conversion_failed": failure,
        },
    )
    if params.repeats and not failure:
        sidecar["shares_bytes_with"] = share_bytes(snakemake.output.artifact, sidecar["sha256"], params.repeats, log)
    write_json(snakemake.output.sidecar, sidecar)
