"""Rules inspect_source / inspect_artifact: write one artifact's manifest (replayed when the
artifact is the bytes an earlier run inspected: convqa.workflow.replay)."""

from convqa.errors import FormatError
from convqa.inspect.manifest import build_manifest, unreadable_manifest
from convqa.files import write_json
from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored
from convqa.workflow.replay import run_or_replay


def inspect():
    with job_log(snakemake.log[0]) as log, restored(snakemake.params.artifacts, log) as artifacts:
        try:
            manifest = build_manifest(artifacts["artifact"])
        except FormatError as exc:  # a converter wrote a file the strict reader refuses: a gate failure
            manifest = unreadable_manifest(artifacts["artifact"], exc)
            print(f"{artifacts['artifact']}: unreadable: {exc}", file=log)
        write_json(snakemake.output.manifest, manifest)
        print(f"{artifacts['artifact']}: {manifest['tensor_count']} tensors", file=log)


run_or_replay(snakemake, inspect)
