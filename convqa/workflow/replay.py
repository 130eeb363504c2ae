"""Replay of a reader job whose inputs are the bytes an earlier run of the same job read.

Snakemake decides what reruns before anything runs: a conversion that reruns (its converter's
code changed) makes every job that reads its artifact rerun too, whatever bytes the conversion
writes. After a fix to the GGUF writer that leaves the GGUF bytes alone, the manifests, the tensor
comparisons, the inference runs, the served checks and the parity checks of every GGUF chain would
all be computed again from identical files (75% of a cold run's time at 1.5B, bench/scale.py).

So the reader rules (inspect, compare, infer, serve, parity) run their body through
`run_or_replay`. It keys the job by everything its outputs can depend on:

- the rule, its wildcards, its params (the fingerprint of the convqa code it runs among them),
  its threads and its gpus (not its `mem_mb`: a job's memory only decides whether an inference
  run is skipped, and a skipped run is never stored; Snakemake's estimate of it moves with
  which artifacts happen to be on disk when the job is scheduled);
- the content of each input: a converted artifact's sidecar stands for the artifact by the
  sha256, size and failure the converter's job recorded (convqa.convert.runner), not by its
  timings or by the converter's fingerprint, which a behaviour-preserving fix changes; a source
  directory by its sidecar and its file listing; any other input by the sha256 of its bytes;
- the versions of python, convqa and every tool (convqa.versions), and the machine's type.

When an earlier run with that key stored its outputs (`results/{model}/.replay/`), they are
linked back in place (each checked against the sha256 stored with it), the stored logs copied to
the job's logs with a line that says the job was replayed (and a line appended to
`results/{model}/.replay/replayed.tsv`), and the body does not run: a deleted artifact is not even
restored. Otherwise the body runs and, if it says its outputs are
reproducible, they are stored. A body returns False for outputs that depend on more than the key
(an engine that timed out or was killed, a run skipped for lack of memory), which are never
replayed.

Outputs are hard links (Snakemake removes a job's outputs before it runs the job, so a rerun
never writes through a link into the store); logs are copies, since a replay appends to them.

The store keeps the last `KEEP_PER_JOB` keys of each job (`.replay/<job>/<key>/`), the ones stored
or replayed most recently: the current run's, and the one before it, so that reverting a change
replays too. Older ones are removed when a new one is stored, so the store holds at most two
versions of each reader's outputs however many times the workflow is rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

from convqa.files import atomic_dir
from convqa.inspect.manifest import file_sha256
from convqa.versions import tool_versions

REPLAY_VERSION = 1
STORE_NAME = ".replay"
ENTRY_NAME = "entry.json"
# One line per replayed job (rule, wildcards, key), appended: what a run replayed, for the user
# and for bench/scale.py's rerun count.
JOURNAL_NAME = "replayed.tsv"
# What a sidecar says about its artifact's bytes; the rest (timings, argv, the converter's
# fingerprint, tool versions) describes how they were made, which the readers never see.
SIDECAR_CONTENT_FIELDS = ("artifact", "sha256", "size", "conversion_failed", "status", "reason")
SIDECAR_SUFFIXES = ("sidecar.json", ".sidecar.json")
# Entries kept per job: the latest run's and the one before it (module docstring).
KEEP_PER_JOB = 2
# Resources that change what a reader writes; mem_mb, tmpdir and the like do not (docstring).
KEYED_RESOURCES = ("gpu",)


def store_dir(model: str) -> Path:
    """Where the replayable outputs of a model's jobs are kept (removed with the model's results)."""
    return Path("results") / model / STORE_NAME


def _items(namedlist) -> dict:
    """A Snakemake Namedlist (params, wildcards, resources) as a plain dict."""
    return {name: value for name, value in namedlist.items()}


def _sidecar_digest(path: Path) -> dict:
    sidecar = json.loads(path.read_text())
    return {"sidecar": {field: sidecar.get(field) for field in SIDECAR_CONTENT_FIELDS}}


def _directory_digest(path: Path) -> dict:
    """A source directory: its sidecar (which records the directory's sha256) and its listing;
    a directory without one: the sha256 of its files."""
    sidecar = path.parent / f"{path.name}.sidecar.json"
    if not sidecar.is_file():
        return {"sha256": file_sha256(path)}
    listing = sorted((f.relative_to(path).as_posix(), f.stat().st_size) for f in path.rglob("*") if f.is_file())
    return {**_sidecar_digest(sidecar), "listing": listing}


def input_digest(path: str | os.PathLike) -> dict:
    """What one input contributes to a job's key (module docstring)."""
    p = Path(path)
    if p.is_dir():
        return _directory_digest(p)
    if p.name.endswith(SIDECAR_SUFFIXES):
        return _sidecar_digest(p)
    return {"sha256": file_sha256(p)}


def _key_of(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def key_material(snakemake) -> dict:
    """Everything a reader job's outputs can depend on (module docstring), which its key hashes;
    stored with each entry, so that a job that was not replayed can be
    told why (diff it against the entry of the run it was expected to repeat)."""
    resources = _items(snakemake.resources)
    described = {
        "replay_version": REPLAY_VERSION,
        "rule": snakemake.rule,
        "wildcards": _items(snakemake.wildcards),
        "params": _items(snakemake.params),
        "threads": snakemake.threads,
        "resources": {name: resources.get(name) for name in KEYED_RESOURCES},
        "inputs": {os.fspath(path): input_digest(path) for path in sorted(set(map(os.fspath, snakemake.input)))},
        "outputs": [os.fspath(path) for path in snakemake.output],
        "versions": tool_versions(),
        "machine": platform.machine(),
    }
    return json.loads(json.dumps(described, sort_keys=True, default=str))


def _job_dir(snakemake) -> Path:
    """The store's directory for one job (its rule, wildcards and outputs), whatever its key."""
    job = {"rule": snakemake.rule, "wildcards": _items(snakemake.wildcards),
           "outputs": [os.fspath(path) for path in snakemake.output]}
    return store_dir(snakemake.wildcards.model) / _key_of(job)[:16]


def _entry_dir(snakemake, key: str) -> Path:
    return _job_dir(snakemake) / key


def _evict(job_dir: Path, keep: int = KEEP_PER_JOB) -> None:
    """Remove all but the `keep` entries of a job stored or replayed most recently (the mtime of
    their entry.json, which a replay refreshes)."""
    def last_used(entry: Path) -> float:
        try:
            return (entry / ENTRY_NAME).stat().st_mtime
        except OSError:
            return 0.0  # an entry without its record is not usable

    entries = sorted((d for d in job_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=last_used, reverse=True)
    for stale in entries[keep:]:
        shutil.rmtree(stale, ignore_errors=True)


def _place(stored: Path, target: Path) -> None:
    """`stored` at `target`, a hard link where the filesystem allows one, with a fresh mtime (an
    output older than its inputs would make Snakemake plan the job again)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(stored, target)
    except OSError:
        shutil.copyfile(stored, target)
    os.utime(target)


def replay(snakemake, key: str) -> dict | None:
    """Put the stored outputs and logs of `key` in place; the stored entry, or None (nothing
    stored, or a stored output that is not the bytes recorded, which is then discarded)."""
    entry_dir = _entry_dir(snakemake, key)
    try:
        entry = json.loads((entry_dir / ENTRY_NAME).read_text())
        stored = [entry_dir / f"output-{i}" for i in range(len(entry["outputs"]))]
        if [file_sha256(path) for path in stored] != [o["sha256"] for o in entry["outputs"]]:
            raise ValueError("a stored output is not the bytes recorded")
    except (OSError, ValueError, KeyError, TypeError):
        shutil.rmtree(entry_dir, ignore_errors=True)
        return None
    for path, target in zip(stored, snakemake.output):
        _place(path, Path(target))
    os.utime(entry_dir / ENTRY_NAME)  # used now: the last to be evicted
    _journal(snakemake, key)
    for i, log in enumerate(snakemake.log):
        saved = entry_dir / f"log-{i}"
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            out.write(f"replayed: the inputs are the bytes an earlier run of this job read, on "
                      f"{entry['stored_at']} (key {key[:16]}); its outputs are in place, its log was:\n")
            if saved.is_file():  # indented: a line of it is not something this job did
                out.writelines(f"  | {line}\n" for line in saved.read_text(errors="replace").splitlines())
    return entry


def _journal(snakemake, key: str) -> None:
    wildcards = ",".join(f"{k}={v}" for k, v in _items(snakemake.wildcards).items())
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{snakemake.rule}\t{wildcards}\t{key[:16]}\n"
    with open(store_dir(snakemake.wildcards.model) / JOURNAL_NAME, "a") as fh:  # O_APPEND: one write per line
        fh.write(line)


def replayed_jobs(model_results: str | os.PathLike) -> list[list[str]]:
    """The journal of a model's results directory: [time, rule, wildcards, key] per replayed job."""
    journal = Path(model_results) / STORE_NAME / JOURNAL_NAME
    if not journal.is_file():
        return []
    return [line.split("\t") for line in journal.read_text().splitlines() if line]


def remember(snakemake, key: str, material: dict | None = None) -> None:
    """Store the job's outputs (links) and logs (copies) under `key`, published atomically. An
    output that is not a plain file (a directory) makes the job not replayable: nothing stored."""
    outputs = [Path(path) for path in snakemake.output]
    if not all(path.is_file() for path in outputs):
        return
    entry_dir = _entry_dir(snakemake, key)
    with atomic_dir(entry_dir) as tmp:
        recorded = []
        for i, path in enumerate(outputs):
            try:
                os.link(path, tmp / f"output-{i}")
            except OSError:
                shutil.copyfile(path, tmp / f"output-{i}")
            recorded.append({"path": os.fspath(path), "sha256": file_sha256(path)})
        for i, log in enumerate(snakemake.log):
            if Path(log).is_file():
                shutil.copyfile(log, tmp / f"log-{i}")
        (tmp / ENTRY_NAME).write_text(json.dumps({
            "rule": snakemake.rule,
            "outputs": recorded,
            "stored_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "key_material": material,
        }, indent=1))
    _evict(entry_dir.parent)


def run_or_replay(snakemake, body: Callable[[], bool | None]) -> bool:
    """Replay the job if an earlier run read the same inputs (module docstring), else run `body`
    and store its outputs unless it returns False. True when the job was replayed."""
    material = key_material(snakemake)
    key = _key_of(material)
    if replay(snakemake, key) is not None:
        return True
    if body() is not False:
        remember(snakemake, key, material)
    return False
