"""Versions of the tools a record was made with: sidecars (conversion) and the evidence (report)."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Iterable

from convqa import __version__

# The installed distribution behind each tool, by the name a record gives it.
TOOL_DISTRIBUTIONS = {
    "numpy": "numpy",
    "torch": "torch",
    "transformers": "transformers",
    "gguf": "gguf",
    "safetensors": "safetensors",
    "snakemake": "snakemake",
    "llama_cpp": "llama_cpp_python",
}
# What a conversion can run, recorded in every artifact's sidecar (no inference engine).
CONVERSION_TOOLS = ("numpy", "gguf", "safetensors", "torch", "transformers", "snakemake")


def tool_versions(tools: Iterable[str] = tuple(TOOL_DISTRIBUTIONS)) -> dict:
    """python and convqa, then each of `tools` (None when not installed), in that order."""
    versions = {"python": platform.python_version(), "convqa": __version__}
    for key in tools:
        try:
            versions[key] = importlib.metadata.version(TOOL_DISTRIBUTIONS[key])
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    return versions
