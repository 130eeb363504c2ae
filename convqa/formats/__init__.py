"""Readers and writers for the three formats, behind one dispatch.

`open_model(path)` sniffs the format (a directory or `.safetensors` file is SafeTensors, the
magic `GGUF` is GGUF, `APR\\0`/`APR2` is APR) and returns the canonical `ModelArtifact`.
`write_model(path, plan, fmt)` writes atomically with the matching writer.
"""

from __future__ import annotations

import os
from pathlib import Path

from convqa.errors import FormatError
from convqa.model import ModelArtifact, WritePlan

FORMATS = ("safetensors", "gguf", "apr")
# The file (SafeTensors: directory) name of an artifact inside its workflow directory.
ARTIFACT_NAME = {"safetensors": "model", "gguf": "model.gguf", "apr": "model.apr"}


def detect_format(path: str | os.PathLike) -> str:
    """The format of the artifact at `path`. A failed conversion's placeholder raises
    NoArtifactError (naming the failed edge), as open_model does, never "unknown file type"."""
    from convqa.formats import no_artifact

    no_artifact.check(path)
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
        return "safetensors"
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise FormatError(path, f"cannot open: {exc.strerror}") from exc
    if magic == b"GGUF":
        return "gguf"
    if magic in (b"APR\x00", b"APR2"):
        return "apr"
    if magic in (b"APRN", b"APR1"):
        raise FormatError(path, f"APR v1 container {magic!r} holds no tensor index; only APR v2 is supported", field="magic", offset=0)
    raise FormatError(path, f"unknown file type, magic bytes {magic!r}", field="magic", offset=0)


def open_model(path: str | os.PathLike) -> ModelArtifact:
    """The canonical view of the model at `path`. A failed conversion's placeholder
    (convqa.formats.no_artifact) raises NoArtifactError, a FormatError naming the edge that failed."""
    from convqa.formats import no_artifact

    no_artifact.check(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        from convqa.formats.safetensors import read_safetensors

        return read_safetensors(path)
    if fmt == "gguf":
        from convqa.formats.gguf import read_gguf

        return read_gguf(path)
    from convqa.formats.apr import read_apr

    return read_apr(path)


def write_model(path: str | os.PathLike, plan: WritePlan, fmt: str) -> None:
    if fmt == "safetensors":
        from convqa.formats.safetensors import write_safetensors

        write_safetensors(path, plan)
    elif fmt == "gguf":
        from convqa.formats.gguf_writer import write_gguf

        write_gguf(path, plan)
    elif fmt == "apr":
        from convqa.formats.apr import write_apr

        write_apr(path, plan)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
