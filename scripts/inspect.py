"""Rules inspect_source / inspect_artifact: write one artifact's manifest."""

from convqa.errors import FormatError
from convqa.inspect.manifest import build_manifest, unreadable_manifest
from convqa.files import write_json
from convqa.workflow.joblog import job_log

with job_log(snakemake.log[0]) as log:
    try:
        manifest = build_manifest(snakemake.input.artifact)
    except FormatError as exc:  # a converter wrote a file the strict reader refuses: a gate failure
        manifest = unreadable_manifest(snakemake.input.artifact, exc)
        print(f"{snakemake.input.artifact}: unreadable: {exc}", file=log)
    write_json(snakemake.output.manifest, manifest)
    print(f"{snakemake.input.artifact}: {manifest['tensor_count']} tensors", file=log)
