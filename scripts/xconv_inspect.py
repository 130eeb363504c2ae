"""Rule xconv_inspect: the manifest of a side-by-side converter's artifact, or, when the
conversion failed, a manifest that says so (the gates turn it into fail rows)."""

import json
import traceback
from pathlib import Path

from convqa.manifest import build_manifest
from convqa.sidecar import write_json

with open(snakemake.log[0], "w") as log:
    try:
        sidecar = json.loads(Path(snakemake.input.sidecar).read_text())
        if sidecar["status"] == "failed":
            manifest = {"unavailable": f"conversion failed (exit {sidecar['returncode']})"}
        else:
            manifest = build_manifest(sidecar["artifact"])
        write_json(snakemake.output.manifest, manifest)
        print(f"{sidecar['label']}: {manifest.get('tensor_count', manifest.get('unavailable'))}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
