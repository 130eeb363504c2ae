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
        if sidecar.get("shares_bytes_with"):  # a re-run stored as a hard link (intermediates.share_bytes)
            state += f"; the same bytes as {sidecar['shares_bytes_with']}, one copy on disk"
        chains.append({"label": label, "artifact": artifact, "bytes_written": size, "state": state,
                       "shared": bool(sidecar.get("shares_bytes_with"))})
    written = sum(c["bytes_written"] for c in chains)
    deleted = sum(c["bytes_written"] for c in chains if c["state"].startswith(DELETED))
    shared = sum(c["bytes_written"] for c in chains if c.get("shared"))
    return {"chains": chains, "written": written, "deleted": deleted, "kept": written - deleted, "shared": shared}


def results_disk(root: str | os.PathLike) -> tuple[int, int]:
    """(bytes under `root` now, the part of it in files also linked from outside `root`). Every
    file is counted once however many hard links it has (a re-run's artifact and the one it
    repeats: intermediates.share_bytes). A source checkpoint prepare_source linked rather than
    copied is on the disk whether or not the run is, so the run added the difference."""
    links: dict[tuple[int, int], list[int]] = {}  # inode -> [size, st_nlink, links seen under root]
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue  # deleted while walking (a release)
            links.setdefault((st.st_dev, st.st_ino), [st.st_size, st.st_nlink, 0])[2] += 1
    total = sum(size for size, _, _ in links.values())
    outside = sum(size for size, nlink, seen in links.values() if nlink > seen)
    return total, outside


def on_disk(model_results: str | os.PathLike) -> dict:
    """The report's record of a model's results directory now: `on_disk` (each file once), and
    `linked_from_outside`, the part that is hard links to files elsewhere (the source checkpoint
    prepare_source linked rather than copied), which the run did not add to the disk."""
    total, outside = results_disk(model_results)
    return {"on_disk": total, "linked_from_outside": outside}


def markdown_section(disk: dict | None, display_size) -> list[str]:
    """The report's `## Disk` lines (empty when the evidence has no disk record)."""
    if not disk:
        return []
    out = ["## Disk", "",
           f"Artifacts written: {display_size(disk['written'])} in {len(disk['chains'])} artifacts; "
           f"deleted after use: {display_size(disk['deleted'])}; kept: {display_size(disk['kept'])}"
           + (f"; stored as hard links to identical artifacts (no second copy on disk): {display_size(disk['shared'])}"
              if disk.get("shared") else "")
           + (f"; on disk under results/ for this model when the report was built: {display_size(disk['on_disk'])}"
              if disk.get("on_disk") is not None else "")
           + (f", of which hard links to the source checkpoint's files (not a second copy): "
              f"{display_size(disk['linked_from_outside'])}" if disk.get("linked_from_outside") else "") + ".", "",
           "| artifact | written | state |", "|---|---:|---|"]
    out += [f"| {c['label']} | {display_size(c['bytes_written'])} | {c['state']} |" for c in disk["chains"]]
    return out + [""]
