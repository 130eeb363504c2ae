"""Converted artifacts as intermediates: deleted once every job of the tier that reads them is
done, brought back from their sidecar when a later job needs one again.

Why not Snakemake's `temp()`: a job whose input is a deleted temp file makes Snakemake rerun the
job that produced it, and a rerun producer reruns *every* job that reads its output, whatever
bytes it writes (`ancient()` does not help: it only spares an input that exists). After a fix
to the GGUF writer, S->A->G must rerun; its input S->A was deleted; so S->A, its manifest, its
comparisons, its inference and A->S all reran (117 of 127 jobs on the scale benchmark).

So a job that reads a converted artifact declares the artifact's *sidecar* as its Snakemake input
(`dependency`), which is rewritten exactly when the conversion reruns (its code, its converter,
its input changed), and receives the artifact's path in `params.artifacts`. At run time
`restored` brings a deleted artifact back by re-running the conversion its sidecar records (its
own parent first, if that is gone too) and checks that the bytes are the ones recorded (sha256):
the other jobs that read it do not rerun, because nothing they declared changed. A regenerated
artifact that is not byte-identical is an error naming both hashes (a non-deterministic
converter; F-CONV-IDEM-001 judges that on a cold run).

Deletion is the rule `release_artifact` (rules/intermediates.smk), one job per artifact and tier
whose inputs are the outputs of every job of the tier that reads the artifact
(`convqa.workflow.jobs.Jobs.artifact_consumers`): it runs after the last of them and removes the
artifact; the sidecar, manifest, comparisons and inference records stay. A placeholder of a
failed conversion (convqa.formats.no_artifact) is never removed: it is what the gates read to
name the failure, and it cannot be regenerated.

A re-run (`st-gguf-apr.run2`, F-CONV-IDEM-001) converts right after the conversion it repeats,
which waits for it, and identical bytes become a hard link to that artifact (`share_bytes`): one
copy on disk for both, whichever is released first.

Locks (`fcntl.flock` on `<chain dir>/.artifact.lock`) keep concurrent jobs of one run from
restoring an artifact twice or deleting one another job is reading: a reader holds a shared
lock for its job, a restore or a deletion an exclusive one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

SIDECAR_NAME = "sidecar.json"
LOCK_NAME = ".artifact.lock"


class RestoreError(RuntimeError):
    """A deleted artifact could not be brought back as the bytes its sidecar records."""


def sidecar_of(artifact: str | os.PathLike) -> Path:
    """The sidecar beside a converted artifact (`<chain dir>/sidecar.json`)."""
    return Path(artifact).parent / SIDECAR_NAME


def is_intermediate(artifact: str | os.PathLike) -> bool:
    """A primary chain's converted artifact (`model.gguf`, `model.apr`, `model/`) with its sidecar
    beside it. The source directory is not one (prepare_source's output is never deleted), nor
    a side-by-side converter's artifact directory (Snakemake's temp(); rules/xconv.smk)."""
    from convqa.formats import ARTIFACT_NAME

    return Path(artifact).name in ARTIFACT_NAME.values() and sidecar_of(artifact).is_file()


def read_sidecar(artifact: str | os.PathLike) -> dict:
    return json.loads(sidecar_of(artifact).read_text())


@contextlib.contextmanager
def _locked(artifact: str | os.PathLike, mode: int):
    lock = Path(artifact).parent / LOCK_NAME
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, mode)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore(artifact: str | os.PathLike, log, keep: frozenset[str] = frozenset()) -> bool:
    """Make sure `artifact` is on disk; True when it had to be regenerated. A present artifact,
    the source, or a path without a sidecar is left as it is. An ancestor restored on the way is
    deleted again afterwards unless it is in `keep` (the job reads it too)."""
    from convqa.convert.runner import run_converter
    from convqa.inspect.manifest import file_sha256

    path = Path(artifact)
    if not is_intermediate(path):
        return False
    # Present: a shared lock to see it, as every reader holds one for its whole job. An exclusive
    # lock here made each reader wait for the one before it to finish (at 1.5B a served check
    # held a core idle while the 2-minute run of the same GGUF went on).
    with _locked(path, fcntl.LOCK_SH):
        if path.exists():
            return False
    with _locked(path, fcntl.LOCK_EX):
        if path.exists():
            return False
        sidecar = read_sidecar(path)
        if sidecar.get("conversion_failed") or not sidecar.get("argv"):
            raise RestoreError(f"{path} is gone and its conversion did not succeed: nothing to restore it from")
        parent = sidecar["input"]
        parent_restored = restore(parent, log, keep)
        with _locked(parent, fcntl.LOCK_SH) if is_intermediate(parent) else contextlib.nullcontext():
            print(f"restoring {path} (deleted after use): re-running its recorded conversion", file=log, flush=True)
            try:
                run_converter(list(sidecar["argv"]), parent, os.fspath(path), log,
                              env=sidecar.get("env") or None, converter=sidecar.get("converter"))
            except BaseException:  # nothing half-written may pass for the artifact
                _remove(path)
                raise
        if parent_restored and os.fspath(parent) not in keep:  # brought back only to convert from: gone again unless someone reads it
            _try_delete(Path(parent), log)
        digest = file_sha256(path)
        if digest != sidecar["sha256"]:
            _remove(path)
            raise RestoreError(
                f"{path} regenerated from its sidecar's command is not the recorded artifact "
                f"(sha256 {digest}, recorded {sidecar['sha256']}): the converter is not deterministic, "
                f"so jobs that read the first copy cannot be combined with jobs that read this one; "
                f"delete its sidecar to convert it again, or set temp_intermediates: false"
            )
        print(f"restored {path}: sha256 matches the sidecar", file=log, flush=True)
    return True


def share_bytes(artifact: str | os.PathLike, sha256: str, repeated: str | os.PathLike, log) -> str | None:
    """Store a re-run's fresh artifact (`st-gguf-apr.run2`) as a hard link to the conversion it
    repeats, when that artifact is on disk and its sidecar records the same sha256: a
    deterministic converter writes the same bytes twice (F-CONV-IDEM-001 compares the hashes,
    recorded before this), and at 1.5B a second copy of an F32 artifact was 7.1 GB of the peak.
    Returns the repeated artifact's path when the bytes are now shared, else None (a failed or
    different conversion, a deleted artifact, a file system without hard links).

    The link is made under a shared lock, so the repeated artifact cannot be released meanwhile;
    releasing either one later leaves the other whole. The shared inode is touched: the re-run's
    output must be newer than its inputs, the repeated conversion's sidecar among them."""
    from convqa.inspect.manifest import WORKFLOW_MARKERS

    mine, theirs = Path(artifact), Path(repeated)
    if not is_intermediate(theirs):
        return None
    recorded = read_sidecar(theirs)
    if recorded.get("conversion_failed") or recorded.get("sha256") != sha256:
        return None
    with _locked(theirs, fcntl.LOCK_SH):
        if not theirs.exists() or mine.is_dir() != theirs.is_dir():
            return None
        if mine.is_dir():
            files = [f.relative_to(mine) for f in sorted(mine.rglob("*")) if f.is_file() and f.name not in WORKFLOW_MARKERS]
            pairs = [(mine / f, theirs / f) for f in files]
        else:
            pairs = [(mine, theirs)]
        if not all(t.is_file() and t.stat().st_size == m.stat().st_size for m, t in pairs):
            return None
        for m, t in pairs:
            staged = m.with_name(f".{m.name}.link")
            try:
                staged.unlink(missing_ok=True)
                os.link(t, staged)
            except OSError as exc:  # another file system, or none with hard links: keep the copy
                print(f"kept {m} as its own copy: cannot hard-link it to {t} ({exc})", file=log, flush=True)
                return None
            os.replace(staged, m)
            os.utime(m)
    print(f"{mine}: the same bytes as {theirs} (sha256 {sha256}); stored once, as a hard link", file=log, flush=True)
    return os.fspath(theirs)


def _try_delete(artifact: Path, log) -> None:
    lock = artifact.parent / LOCK_NAME
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"kept {artifact}: another job is reading it", file=log, flush=True)
            return
        try:
            _remove(artifact)
            print(f"deleted {artifact} again (restored only to convert from it)", file=log, flush=True)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _depth(artifact: str) -> int:
    return Path(artifact).parent.name.count("-")


@contextlib.contextmanager
def restored(artifacts: dict[str, str], log, drop_regenerated: bool = False):
    """The job's artifacts (role -> path) on disk for the duration of the block: each deleted one
    restored, and each held under a shared lock so that no restore or release removes it.

    Deepest chain first: a restore takes exclusive locks on an artifact and its ancestors only,
    never on one this job already holds shared (a descendant's)."""
    keep = frozenset(os.fspath(p) for p in artifacts.values())
    regenerated = []
    with contextlib.ExitStack() as stack:
        for path in sorted(artifacts.values(), key=_depth, reverse=True):
            for _attempt in range(3):
                if restore(path, log, keep):
                    regenerated.append(Path(path))
                if not is_intermediate(path):
                    break
                held = contextlib.ExitStack()
                held.enter_context(_locked(path, fcntl.LOCK_SH))
                if Path(path).exists():
                    stack.push(held.__exit__)
                    break
                held.close()  # released between the restore and the lock (a reader its release does not wait for): again
            else:
                raise RestoreError(f"{path} was deleted three times while this job started; rerun the job")
        yield dict(artifacts)
    # `drop_regenerated`: a reader the release does not wait for (an exact comparison the
    # manifests could not decide) brought the artifact back for itself only; gone again, or the
    # disk would keep it to the end. (A reader the release waits for leaves that to the release,
    # which reruns after it: deleting here would make the next reader restore it once more.)
    for path in regenerated if drop_regenerated else ():
        if any(path.parent.glob("released-*.json")):
            _try_delete(path, log)


def release(artifact: str | os.PathLike) -> dict:
    """Delete a converted artifact whose readers are all done; what was done, for the record."""
    path = Path(artifact)
    record = {"artifact": os.fspath(path), "deleted": False, "bytes": 0}
    if not sidecar_of(path).is_file():  # (not is_intermediate: this runs without convqa.formats)
        record["reason"] = "not a converted artifact (no sidecar beside it)"
        return record
    sidecar = read_sidecar(path)
    if sidecar.get("conversion_failed"):
        record["reason"] = "the placeholder of a failed conversion: kept for the gates"
        return record
    with _locked(path, fcntl.LOCK_EX):
        if not path.exists():
            record["reason"] = "already deleted"
            return record
        files = [f.stat() for f in [path, *path.rglob("*")] if f.is_file()]
        record["bytes"] = sum(st.st_size for st in files)
        # A re-run's artifact and the one it repeats can be one file (share_bytes): its bytes
        # stay on disk while the other link does.
        record["bytes_still_linked"] = sum(st.st_size for st in files if st.st_nlink > 1)
        _remove(path)
    record.update(deleted=True, reason="every job of the tier that reads it is done")
    return record


def write_release(artifact: str | os.PathLike, record_path: str | os.PathLike) -> dict:
    """Rule release_artifact: delete the artifact, write what was done."""
    record = release(artifact)
    Path(record_path).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


if __name__ == "__main__":
    # rules/intermediates.smk: `python -m convqa.workflow.intermediates release ARTIFACT RECORD`, a
    # shell job (a `run:` job would start a whole Snakemake process to parse the workflow again).
    import sys

    command, artifact_arg, record_arg = sys.argv[1:]
    if command != "release":
        raise SystemExit(f"unknown command {command!r}; expected: release ARTIFACT RECORD")
    write_release(artifact_arg, record_arg)
