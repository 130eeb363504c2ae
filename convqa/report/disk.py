"""Disk use of a model's qualification: what each chain's conversion wrote, what is still on disk
and what was deleted after use (`temp_intermediates`), for the report's Disk section.

The bytes come from the sidecars (each records its artifact's size when it was written); an
artifact whose file is gone when the report is built was deleted after its manifest, comparisons
and inference were done. `estimate` is the same arithmetic before a run: how much a tier writes
for a model of a given size (`convqa plan`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from convqa.files import path_size

KEPT, DELETED, FAILED = "kept", "deleted after use", "no artifact"
SHARED = "the conversion of"  # a label whose artifact another variant's label already counts


def disk_usage(sidecars: dict[str, str | os.PathLike]) -> dict:
    """{"chains": [{label, artifact, bytes_written, state}], "written", "deleted", "kept"} from
    the sidecars (label -> path). A sidecar that cannot be read counts nothing (the gates say why).
    Labels of two variants that share one conversion (convqa.workflow.plan.owning_variant) read
    one sidecar: its bytes count once, under the first label, and the other says whose they are."""
    chains = []
    first_label: dict[str, str] = {}
    for label, path in sorted(sidecars.items()):
        if os.fspath(path) in first_label:
            chains.append({"label": label, "artifact": None, "bytes_written": 0,
                           "state": f"{SHARED} {first_label[os.fspath(path)]}"})
            continue
        try:
            sidecar = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        first_label[os.fspath(path)] = label
        artifact = sidecar.get("artifact")
        size = int(sidecar.get("size") or 0)
        if sidecar.get("conversion_failed"):
            state = FAILED
        elif artifact and Path(artifact).exists():
            state = KEPT
        else:
            state = DELETED
        chains.append({"label": label, "artifact": artifact, "bytes_written": size, "state": state})
    written = sum(c["bytes_written"] for c in chains)
    deleted = sum(c["bytes_written"] for c in chains if c["state"] == DELETED)
    return {"chains": chains, "written": written, "deleted": deleted, "kept": written - deleted}


def results_bytes(root: str | os.PathLike) -> int:
    """Bytes under `root` now (every file, recursively)."""
    return path_size(root) if Path(root).exists() else 0


def markdown_section(disk: dict | None, display_size) -> list[str]:
    """The report's `## Disk` lines (empty when the evidence has no disk record)."""
    if not disk:
        return []
    out = ["## Disk", "",
           f"Artifacts written: {display_size(disk['written'])} in {len(disk['chains'])} artifacts; "
           f"deleted after use: {display_size(disk['deleted'])}; kept: {display_size(disk['kept'])}"
           + (f"; on disk under results/ for this model when the report was built: {display_size(disk['on_disk'])}"
              if disk.get("on_disk") is not None else "") + ".", "",
           "| artifact | written | state |", "|---|---:|---|"]
    out += [f"| {c['label']} | {display_size(c['bytes_written'])} | {c['state']} |" for c in disk["chains"]]
    return out + [""]
