"""Atomic outputs: write to a temporary sibling, rename into place only on success.

A conversion killed half way leaves a `.tmp-*` sibling that no reader or workflow rule treats
as the artifact, and an exception removes it. Also the one JSON writer and the one size of an
artifact (a file, or a directory's files).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _make_shareable(tmp_path, 0o666)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success replace `path` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent))
    _make_shareable(tmp_path, 0o777)
    try:
        yield tmp_path
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise


def _make_shareable(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create owner-only entries; give the artifact the umask's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def write_json(path: str | os.PathLike, data: dict, *, sort_keys: bool = True, ensure_ascii: bool = True) -> None:
    """`data` as indented JSON (one trailing newline), written atomically.

    Workflow records sort their keys; HF files (config.json, tokenizer_config.json, ...) keep
    their key order and non-ASCII text as transformers writes them: `sort_keys=False,
    ensure_ascii=False`.
    """
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n", encoding="utf-8")


def path_size(path: str | os.PathLike, exclude: frozenset[str] | set[str] = frozenset()) -> int:
    """Bytes of a file, or of every file under a directory (recursively) whose name is not in `exclude`."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name not in exclude)
    return path.stat().st_size
