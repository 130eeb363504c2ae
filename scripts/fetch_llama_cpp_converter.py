"""Fetch llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py and its gguf-py) from the
llama-cpp-python source distribution on PyPI, which vendors llama.cpp, into a cache directory.

    python scripts/fetch_llama_cpp_converter.py [--version 0.3.36] [--cache build/llama-cpp-converter]

prints the directory holding `convert_hf_to_gguf.py` (and `gguf-py/`, plus `conversion/` when
that llama.cpp version has it). Run the converter with `PYTHONPATH=<dir>/gguf-py` so it imports
its own gguf package, not the one installed in the environment. A second call finds the cache
and downloads nothing. Exit status 2 means PyPI could not be reached (tests skip on it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DEFAULT_VERSION = "0.3.36"
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "build" / "llama-cpp-converter"
VENDOR = "vendor/llama.cpp"
# What the converter needs from the llama.cpp tree: the script, its optional helper package,
# and the gguf-py it was written against.
WANTED = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
COMPLETE_MARKER = ".complete"  # written last: a half-extracted cache is never used
UNREACHABLE = 2


def cached_converter(cache: Path, version: str) -> Path | None:
    target = cache / version
    return target if (target / COMPLETE_MARKER).is_file() else None


def download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConnectionError(f"pip download llama-cpp-python=={version} failed:\n{proc.stderr[-2000:]}")
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise ConnectionError(f"pip download left no llama_cpp_python sdist in {into}")
    return found[0]


def extract_converter(sdist: Path, target: Path) -> None:
    """Extract only the converter's files from the sdist (tar `data` filter: no links out, no
    absolute paths), then publish the directory atomically by rename."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(sdist) as tar:
        roots = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        if len(roots) != 1:
            raise ValueError(f"{sdist}: expected one top-level directory, found {sorted(roots)}")
        prefix = f"{roots.pop()}/{VENDOR}/"
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].split("/", 1)[0] in WANTED]
        tar.extractall(tmp, members=members, filter="data")
        vendor = Path(tmp) / prefix
        if not (vendor / "convert_hf_to_gguf.py").is_file() or not (vendor / "gguf-py" / "gguf").is_dir():
            raise ValueError(f"{sdist}: no {VENDOR}/convert_hf_to_gguf.py with gguf-py inside")
        shutil.copytree(vendor, staging)
    (staging / COMPLETE_MARKER).write_text(f"llama-cpp-python=={sdist.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def fetch(version: str = DEFAULT_VERSION, cache: Path = DEFAULT_CACHE) -> Path:
    """The directory holding convert_hf_to_gguf.py for `version`, downloading it if needed.
    Raises ConnectionError when PyPI cannot be reached."""
    if (found := cached_converter(cache, version)) is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        sdist = download_sdist(version, Path(tmp))
        extract_converter(sdist, cache / version)
    return cache / version


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python version (default %(default)s)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory (default %(default)s)")
    args = parser.parse_args()
    try:
        print(fetch(args.version, args.cache))
    except ConnectionError as exc:
        print(exc, file=sys.stderr)
        return UNREACHABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
