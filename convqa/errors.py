"""The one exception type convqa raises for bad input files and bad requests.

Messages follow the tomli style: they name the file, the field and the byte offset, so a
user can open the file in a hex editor and see what is wrong.
"""

from __future__ import annotations

import os


class FormatError(Exception):
    """A model file (or directory) is malformed, truncated, hostile or unsupported."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        message: str,
        *,
        field: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.field = field
        self.offset = offset
        self.detail = message
        where = []
        if field is not None:
            where.append(f"field {field}")
        if offset is not None:
            where.append(f"offset {offset}")
        location = f" ({', '.join(where)})" if where else ""
        prefix = f"{self.path}: " if self.path else ""
        super().__init__(f"{prefix}{message}{location}")


class ConversionError(Exception):
    """A conversion was asked for that cannot be done faithfully (never a silent fallback)."""
