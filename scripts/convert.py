"""Rule convert_to_{gguf,apr,safetensors}: run the configured converter on one edge, enforce
the output path, and write the artifact's sidecar."""

import traceback

from convqa import plan
from convqa.sidecar import artifact_sidecar, converter_record, expand_command, run_converter, write_json

params, wildcards = snakemake.params, snakemake.wildcards
with open(snakemake.log[0], "w") as log:
    try:
        argv = expand_command(
            params.command,
            input=snakemake.input.artifact,
            output=snakemake.output.artifact,
            format=params.format,
            quant=params.quant,
        )
        result = run_converter(
            argv, snakemake.input.artifact, snakemake.output.artifact, log, env=params.env, converter=params.converter
        )
        sidecar = artifact_sidecar(
            snakemake.output.artifact,
            converter=params.converter,
            fingerprint=params.fingerprint,
            command=result,
            record=converter_record(result.stdout) if params.json_record else None,
            extra={
                "model": wildcards.model,
                "variant": wildcards.variant,
                "chain": wildcards.chain,
                "parent": plan.parent(wildcards.chain),
                "input": snakemake.input.artifact,
                "quant": params.quant,
            },
        )
        write_json(snakemake.output.sidecar, sidecar)
    except Exception:
        traceback.print_exc(file=log)
        raise
