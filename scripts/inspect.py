"""Rules inspect_source / inspect_artifact: write one artifact's manifest."""

import traceback

from convqa.errors import FormatError
from convqa.inspect.manifest import build_manifest, unreadable_manifest
from convqa.files import write_json

with open(snakemake.log[0], "w") as log:
    try:
        try:
            manifest = build_manifest(snakemake.input.artifact)
        except FormatError as exc:  # a converter wrote a file the strict reader refuses: a gate failure
            manifest = unreadable_manifest(snakemake.input.artifact, exc)
            print(f"{snakemake.input.artifact}: unreadable: {exc}", file=log)
        write_json(snakemake.output.manifest, manifest)
        print(f"{snakemake.input.artifact}: {manifest['tensor_count']} tensors", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
