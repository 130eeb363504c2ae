"""Prepare a model's SafeTensors ground truth (`results/{model}/source/`) from its config spec.

Every qualification compares against one HF-style directory: config.json, tokenizer files and
*.safetensors. Where it comes from is the `source:` entry of a model in the workflow config:

  hub        {repo_id, revision}       downloaded with huggingface_hub (config, tokenizer, weights)
  local      {path}                    an HF directory on disk, validated then copied
  gguf       {path}                    a GGUF file imported G->S; quantized tensors become F32
  bundled    {name}                    a GGUF shipped in Python packages (convqa.sources.bundled), imported
                                       as `gguf` is; a chunked one is assembled beside out_dir first
  synthetic  {preset, seed, overrides} a tiny random model built with transformers

Whatever the kind, the directory is validated with the strict reader and the architecture's
expected tensor list before it is published (atomically), and `prepare_source` returns the
provenance that the workflow writes as the source's sidecar.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from convqa.files import atomic_dir
from convqa.inspect.manifest import file_sha256
from convqa.workflow.fingerprint import writes

# Files of an HF model directory that make up the ground truth (weights, config, tokenizer).
HF_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "*.safetensors",
    "model.safetensors.index.json",
)

# Formats each source kind reads (and writes, `writes`): the fingerprint of a source job covers
# their readers and writers only. A GGUF source is read, never written: a GGUF-writer fix leaves it.
KIND_FORMATS = {
    "hub": ("safetensors",),
    "local": ("safetensors",),
    "gguf": ("gguf", writes("safetensors")),
    "bundled": ("gguf", writes("safetensors")),
    "synthetic": ("safetensors",),
}
# Modules only one kind runs, excluded from the other kinds' fingerprints. (The bundled kind's
# GGUF, or its chunks, are the job's inputs.)
KIND_ONLY_MODULES = {"convqa.sources.synthetic": ("synthetic",), "convqa.sources.bundled": ("bundled",)}


class SourceError(RuntimeError):
    """A source cannot be prepared: bad spec, missing file, no network, invalid model."""


def kind_fingerprint_args(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(formats, excluded modules) of the source job's code fingerprint (`convqa.workflow.jobs.Jobs.code`)."""
    if kind not in KIND_FORMATS:
        raise SourceError(f"unknown source kind {kind!r}; expected one of {', '.join(KIND_FORMATS)}")
    exclude = tuple(m for m, kinds in KIND_ONLY_MODULES.items() if kind not in kinds)
    return KIND_FORMATS[kind], exclude


def prepare_source(spec: dict, out_dir: str | os.PathLike) -> dict:
    """Build the ground-truth directory `out_dir` from `spec`; return its provenance."""
    kind = spec.get("kind")
    prepare = {"hub": _from_hub, "local": _from_local, "gguf": _from_gguf, "bundled": _from_bundled, "synthetic": _from_synthetic}.get(kind)
    if prepare is None:
        raise SourceError(f"unknown source kind {kind!r}; expected one of {', '.join(KIND_FORMATS)}")
    out_dir = Path(out_dir)
    provenance = {"kind": kind, "spec": dict(spec)}
    provenance.update(prepare(spec, out_dir))
    provenance["files"] = {
        p.name: {"sha256": file_sha256(p), "size": p.stat().st_size} for p in sorted(out_dir.iterdir()) if p.is_file()
    }
    return provenance


def validate_model_dir(path: Path) -> dict:
    """Open with the strict reader and check the architecture's tensors are all there."""
    from convqa.convert.builtin import check_complete
    from convqa.errors import ConversionError, FormatError
    from convqa.formats import open_model

    try:
        with open_model(path) as model:
            check_complete(model)
            if not model.tensors:
                raise SourceError(f"{path}: no tensors")
            return {"architecture": model.config.architecture, "tensor_count": len(model.tensors),
                    "has_tokenizer": model.tokenizer is not None}
    except (FormatError, ConversionError) as exc:
        raise SourceError(f"{path} is not a usable HF model directory: {exc}") from exc


def _required(spec: dict, key: str):
    value = spec.get(key)
    if value in (None, ""):
        raise SourceError(f"source kind {spec.get('kind')!r} needs `{key}`")
    return value


def input_files(spec: dict) -> list[str]:
    """Files on disk a source is built from, for the workflow to track as the job's inputs
    (a replaced GGUF or edited weights rebuild the source). Hub and synthetic sources have none."""
    kind = spec.get("kind")
    if kind == "gguf":
        return [str(Path(spec["path"]).expanduser())]
    if kind == "local":
        directory = Path(spec["path"]).expanduser()
        return [str(p) for p in model_files(directory)] if directory.is_dir() else [str(directory / "config.json")]
    if kind == "bundled":
        from convqa.sources.bundled import BundledModelError, input_paths

        try:
            return [str(p) for p in input_paths(spec.get("name", ""))]
        except BundledModelError:
            return []  # the job reports the unknown name or the missing package with its install hint
    return []


def model_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in HF_MODEL_FILES))


def _copy_model_dir(src: Path, out_dir: Path) -> dict:
    """The model's files under out_dir, each a hard link to the user's file where the filesystem
    allows one, else a copy: the ground truth of a 1.5B BF16 model is 3.1 GB that need not be on
    disk twice. Safe because nothing writes a source file in place (every writer writes a new
    file and renames it over), and a changed original is a newer input: prepare_source reruns."""
    files = model_files(src)
    if not any(p.suffix == ".safetensors" for p in files):
        raise SourceError(f"{src}: no *.safetensors files (found: {', '.join(p.name for p in files) or 'nothing'})")
    linked = []
    with atomic_dir(out_dir) as tmp:
        for f in files:
            if _link_or_copy(f.resolve(), tmp / f.name):  # resolved: the HF cache links into blobs/
                linked.append(f.name)
        summary = validate_model_dir(tmp)
    return {**summary, "hard_linked": linked}


def _link_or_copy(src: Path, dest: Path) -> bool:
    """True when `dest` is a hard link to `src`; a copy where a link cannot be made (another
    filesystem, or a file the kernel will not link for this user: fs.protected_hardlinks)."""
    try:
        os.link(src, dest)
        return True
    except OSError:
        shutil.copyfile(src, dest)
        return False


def _from_hub(spec: dict, out_dir: Path) -> dict:
    repo_id = _required(spec, "repo_id")
    revision = spec.get("revision") or "main"
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise SourceError("source kind 'hub' needs huggingface_hub (pip install huggingface_hub)") from exc
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HF_MODEL_FILES)))
    except Exception as exc:  # offline, unknown repo, gated repo, HTTP error: all end the same way
        raise SourceError(
            f"cannot download {repo_id}@{revision} from the Hugging Face Hub: {type(exc).__name__}: {exc}. "
            "Without network access, download it elsewhere (`hf download REPO --revision REV --local-dir DIR`) "
            "and use `source: {kind: local, path: DIR}`"
        ) from exc
    summary = _copy_model_dir(snapshot, out_dir)
    # The snapshot directory is named by the commit it resolved to: a branch name is pinned here.
    return {"origin": {"repo_id": repo_id, "revision": revision, "commit": snapshot.name}, **summary}


def _from_local(spec: dict, out_dir: Path) -> dict:
    src = Path(_required(spec, "path")).expanduser()
    if not src.is_dir():
        raise SourceError(f"local source {src} is not a directory (expected an HF model directory)")
    validate_model_dir(src)  # fail on the user's directory, before copying gigabytes
    summary = _copy_model_dir(src, out_dir)
    return {"origin": {"path": str(src.resolve())}, **summary}


def _import_gguf(gguf: Path, out_dir: Path) -> dict:
    from convqa.convert.builtin import convert

    if not gguf.is_file():
        raise SourceError(f"GGUF source {gguf} does not exist")
    # quant=None: tensors SafeTensors can hold pass through, quantized ones are dequantized to
    # F32 and listed in the record (the ground truth is then the dequantized model).
    record = convert(gguf, out_dir, "safetensors")
    summary = validate_model_dir(out_dir)
    return {"origin": {"path": str(gguf.resolve()), "sha256": file_sha256(gguf)}, "record": record.as_dict(), **summary}


def _from_gguf(spec: dict, out_dir: Path) -> dict:
    return _import_gguf(Path(_required(spec, "path")).expanduser(), out_dir)


def _from_bundled(spec: dict, out_dir: Path) -> dict:
    from convqa.sources.bundled import BundledModelError, bundled_model, gguf_path

    name = _required(spec, "name")
    try:
        model = bundled_model(name)
        # A chunked GGUF is assembled beside the ground truth (results/{model}/source.bundled/),
        # not inside it: the source directory holds the HF files only.
        gguf = gguf_path(name, out_dir.parent / f"{out_dir.name}.bundled")
    except BundledModelError as exc:
        raise SourceError(str(exc)) from exc
    summary = _import_gguf(gguf, out_dir)
    summary["origin"].update(bundled=name, package=model.package, chunks=len(model.chunks))
    return summary


def _from_synthetic(spec: dict, out_dir: Path) -> dict:
    from convqa.sources.synthetic import SYNTHETIC_PRESETS, build_preset

    preset = _required(spec, "preset")
    if preset not in SYNTHETIC_PRESETS:
        raise SourceError(f"unknown synthetic preset {preset!r}; known: {', '.join(SYNTHETIC_PRESETS)}")
    overrides = dict(spec.get("overrides") or {})
    try:
        build_preset(out_dir, preset, seed=int(spec.get("seed", 0)), **overrides)
    except TypeError as exc:  # an override that build_synthetic_model does not take
        raise SourceError(f"synthetic preset {preset!r}: bad overrides {sorted(overrides)}: {exc}") from exc
    summary = validate_model_dir(out_dir)
    return {"geometry": {**SYNTHETIC_PRESETS[preset], **overrides}, **summary}
