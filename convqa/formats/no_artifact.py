"""The placeholder a failed conversion leaves at its artifact path, so the workflow still ends in a report.

A converter that exits non-zero or writes somewhere else produces no artifact. Failing the job
would stop the workflow before any report is written, and a qualification tool exists to judge
exactly such converters. So the conversion job writes, at the artifact path, a small marker that
no reader mistakes for a model: a file (GGUF/APR) or a directory (SafeTensors) that starts with
`MAGIC` and holds the failure as JSON. Every reader refuses it through `open_model` with
`NoArtifactError`, naming the failed edge; the gates turn that into a `fail` row for the edge
that failed and `not_evaluated` rows, naming it, for everything that depended on it. A chain
converted from a placeholder is a placeholder too (kind `upstream`), without running its converter.

Nothing half-written is left: the converter's temporary files are its own business (convqa's
writers rename only on success), the stray files it wrote elsewhere stay where they are and are
named in the failure, and the placeholder is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from convqa.files import atomic_dir, atomic_file
from convqa.errors import FormatError

MAGIC = b"convqa: no artifact\n"
DIRECTORY_MARKER = "NO-ARTIFACT"  # the file inside a placeholder directory (SafeTensors chains)
CONVERTER_EXIT, OUTPUT_PATH, CONVERTER_ERROR, UPSTREAM = "converter_exit", "output_path", "converter_error", "upstream"
KINDS = (CONVERTER_EXIT, OUTPUT_PATH, CONVERTER_ERROR, UPSTREAM)


class NoArtifactError(FormatError):
    """The path holds a failed conversion's placeholder, not a model."""

    def __init__(self, path, failure: dict):
        self.failure = failure
        super().__init__(path, describe(failure))


def describe(failure: dict) -> str:
    if failure.get("kind") == UPSTREAM:
        return f"no artifact: not converted, because the conversion {failure.get('failed_chain')} failed"
    return f"no artifact: the conversion {failure.get('chain')} failed: {failure.get('reason', '')}"


def is_upstream(failure: dict | None) -> bool:
    return bool(failure) and failure.get("kind") == UPSTREAM


def write(path: str | os.PathLike, failure: dict, *, directory: bool) -> None:
    """The placeholder at `path` (a directory for SafeTensors artifacts), replacing whatever is there."""
    if failure.get("kind") not in KINDS:
        raise ValueError(f"failure kind must be one of {KINDS}, got {failure.get('kind')!r}")
    payload = MAGIC + json.dumps(failure, indent=2, sort_keys=True).encode() + b"\n"
    path = Path(path)
    if directory:
        with atomic_dir(path) as tmp:
            (tmp / DIRECTORY_MARKER).write_bytes(payload)
        return
    with atomic_file(path) as tmp:
        tmp.write_bytes(payload)


def read(path: str | os.PathLike) -> dict | None:
    """The failure a placeholder records, or None when `path` is not one."""
    path = Path(path)
    marker = path / DIRECTORY_MARKER if path.is_dir() else path
    try:
        with open(marker, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                return None
            body = fh.read()
    except OSError:
        return None
    try:
        failure = json.loads(body)
    except json.JSONDecodeError as exc:
        raise FormatError(marker, f"damaged no-artifact placeholder: {exc.msg}", offset=len(MAGIC) + exc.pos) from exc
    return failure if isinstance(failure, dict) else {"kind": CONVERTER_ERROR, "reason": "damaged placeholder"}


def check(path: str | os.PathLike) -> None:
    """Raise NoArtifactError when `path` is a placeholder."""
    failure = read(path)
    if failure is not None:
        raise NoArtifactError(path, failure)
