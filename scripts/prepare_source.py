"""Rule prepare_source: build results/{model}/source/ and its provenance sidecar."""

from convqa.convert.runner import artifact_sidecar
from convqa.files import write_json
from convqa.sources.prepare import prepare_source
from convqa.workflow.joblog import job_log

with job_log(snakemake.log[0]) as log:
    provenance = prepare_source(snakemake.params.spec, snakemake.output.model)
    sidecar = artifact_sidecar(
        snakemake.output.model,
        converter=f"source:{provenance['kind']}",
        fingerprint=snakemake.params.fingerprint,
        record=provenance,
        extra={"model": snakemake.wildcards.model, "chain": "st"},
    )
    write_json(snakemake.output.sidecar, sidecar)
    print(f"{snakemake.output.model}: {provenance['kind']} source, {provenance['tensor_count']} tensors", file=log)
