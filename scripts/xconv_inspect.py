"""Rule xconv_inspect: the manifest of a side-by-side converter's artifact, or, when the
conversion failed, a manifest that says so (the gates turn it into fail rows)."""

import json
from pathlib import Path

from convqa.errors import FormatError
from convqa.inspect.manifest import build_manifest, unreadable_manifest
from convqa.files import write_json
from convqa.workflow.joblog import job_log

with job_log(snakemake.log[0]) as log:
    sidecar = json.loads(Path(snakemake.input.sidecar).read_text())
    if sidecar["status"] == "not_run":
        manifest = {"unavailable": sidecar["reason"]}
    elif sidecar["status"] == "failed":
        manifest = {"unavailable": f"conversion failed (exit {sidecar['returncode']})"}
    else:
        try:
            manifest = build_manifest(sidecar["artifact"])
        except FormatError as exc:  # the side converter wrote a file the strict reader refuses
            manifest = unreadable_manifest(sidecar["artifact"], exc)
    write_json(snakemake.output.manifest, manifest)
    print(f"{sidecar['label']}: {manifest.get('tensor_count', manifest.get('unavailable'))}", file=log)
