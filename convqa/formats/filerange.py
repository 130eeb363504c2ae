"""Read one tensor's bytes from a file into private memory.

Readers hand out tensors through this rather than through a memory map: pages of a mapped
file count toward the process's resident set for as long as the map lives, so a converter that
maps its input reaches a peak RSS the size of the whole model. Reading each tensor into a buffer
that is freed once the writer has consumed it keeps the peak near the largest tensor.
"""

from __future__ import annotations

import os

import numpy as np

from convqa.errors import FormatError


def read_file_range(path: str | os.PathLike, offset: int, size: int) -> np.ndarray:
    """`size` bytes at `offset` as a fresh uint8 array; FormatError if the file is shorter."""
    buf = np.empty(size, dtype=np.uint8)
    view = memoryview(buf)
    got = 0
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        while got < size:
            n = fh.readinto(view[got:])
            if not n:
                raise FormatError(path, f"file ended {size - got} bytes before the end of a tensor's data", field="tensor data", offset=offset + got)
            got += n
    return buf
