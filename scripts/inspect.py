"""Rules inspect_source / inspect_artifact: write one artifact's manifest."""

import traceback

from convqa.manifest import build_manifest
from convqa.sidecar import write_json

with open(snakemake.log[0], "w") as log:
    try:
        manifest = build_manifest(snakemake.input.artifact)
        write_json(snakemake.output.manifest, manifest)
        print(f"{snakemake.input.artifact}: {manifest['tensor_count']} tensors", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
