"""convqa.workflow.replay: a reader job whose inputs are the bytes an earlier run read gets that
run's outputs back without running; anything that can change its outputs (the artifact's bytes,
a param, the code fingerprint, its threads, a source file) makes it run; timings and the converter's
fingerprint in a sidecar do not; a run its body calls unreproducible, and a stored output that is
not the bytes recorded, are never replayed.

The job object is Snakemake's own (snakemake.iocontainers.Snakemake, what a `script:` receives);
the whole-workflow case (a GGUF-writer fix that leaves the bytes alone) is in
tests/test_workflow_run.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from snakemake.iocontainers import InputFiles, Log, OutputFiles, Params, ResourceList, Snakemake, Wildcards

from convqa.inspect.manifest import file_sha256
from convqa.workflow import replay

ARTIFACT = "results/m/native/st-gguf/model.gguf"
SIDECAR = "results/m/native/st-gguf/sidecar.json"
SOURCE = "results/m/source"
OUTPUT = "results/m/native/st-gguf/manifest.json"
LOG = "results/m/native/st-gguf/logs/inspect.log"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_artifact(b"GGUF" + bytes(range(256)) * 8)
    source = Path(SOURCE)
    source.mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"weights" * 100)
    Path(f"{SOURCE}.sidecar.json").write_text(json.dumps({"artifact": SOURCE, "sha256": file_sha256(source)}))
    return tmp_path


def write_artifact(data: bytes, **sidecar_extra) -> None:
    Path(ARTIFACT).parent.mkdir(parents=True, exist_ok=True)
    Path(ARTIFACT).write_bytes(data)
    sidecar = {"artifact": ARTIFACT, "sha256": file_sha256(ARTIFACT), "size": len(data),
               "conversion_failed": None, "wall_s": 1.5, "fingerprint": "convqa:aaaa", **sidecar_extra}
    Path(SIDECAR).write_text(json.dumps(sidecar))


def job(params=None, mem_mb=1000, tmpdir="/tmp/a", threads=1) -> Snakemake:
    resources = ResourceList(fromdict={"_cores": 1, "mem_mb": mem_mb, "tmpdir": tmpdir})
    return Snakemake(
        input_=InputFiles(fromdict={"artifact": SIDECAR, "source": SOURCE}),
        output=OutputFiles(fromdict={"manifest": OUTPUT}),
        params=Params(fromdict=params or {"fingerprint": "convqa:1111", "artifacts": {"artifact": ARTIFACT}}),
        wildcards=Wildcards(fromdict={"model": "m", "variant": "native", "chain": "st-gguf"}),
        threads=threads,
        resources=resources,
        log=Log(fromdict={"run": LOG}),
        config={},
        rulename="inspect_artifact",
        bench_iteration=None,
    )


class Body:
    """A reader: its output is a digest of the artifact it reads, its log says it ran."""

    def __init__(self, reproducible=True):
        self.calls = 0
        self.reproducible = reproducible

    def __call__(self, snakemake):
        self.calls += 1
        Path(LOG).parent.mkdir(parents=True, exist_ok=True)
        Path(LOG).write_text(f"read {ARTIFACT}\nrestoring nothing\n")
        Path(OUTPUT).write_text(json.dumps({"sha": file_sha256(ARTIFACT), "run": self.calls}))
        return self.reproducible


def run(snakemake, body) -> bool:
    """One job as Snakemake runs it: its outputs and logs removed first (Job.remove_existing_output)."""
    for path in (*snakemake.output, *snakemake.log):
        Path(path).unlink(missing_ok=True)
    return replay.run_or_replay(snakemake, lambda: body(snakemake))


def test_an_identical_rerun_is_replayed_with_the_first_runs_bytes_and_log(workdir):
    body = Body()
    assert run(job(), body) is False
    first = Path(OUTPUT).read_bytes()
    time.sleep(0.01)
    before = time.time()
    os.remove(ARTIFACT)  # a deleted intermediate: a replay does not need it back
    assert run(job(), body) is True
    assert body.calls == 1
    assert Path(OUTPUT).read_bytes() == first
    assert Path(OUTPUT).stat().st_mtime >= before - 1, "an old mtime would make Snakemake plan the job again"
    log = Path(LOG).read_text().splitlines()
    assert log[0].startswith("replayed: ")
    assert log[1:] == [f"  | read {ARTIFACT}", "  | restoring nothing"]
    [(_, rule, wildcards, _)] = replay.replayed_jobs("results/m")
    assert (rule, wildcards) == ("inspect_artifact", "model=m,variant=native,chain=st-gguf")


def test_a_sidecar_rewritten_for_the_same_bytes_replays(workdir):
    body = Body()
    run(job(), body)
    write_artifact(b"GGUF" + bytes(range(256)) * 8, wall_s=9.0, fingerprint="convqa:bbbb", argv=["x"])
    assert run(job(), body) is True
    assert body.calls == 1


@pytest.mark.parametrize("change", ["artifact bytes", "conversion failed", "param", "threads", "source file"])
def test_anything_the_outputs_depend_on_runs_the_job(workdir, change):
    body = Body()
    run(job(), body)
    rerun_job = job()
    if change == "artifact bytes":
        write_artifact(b"GGUF" + bytes(range(256)) * 7 + bytes(256))
    elif change == "conversion failed":
        write_artifact(b"GGUF" + bytes(range(256)) * 8, conversion_failed="exit 3")
    elif change == "param":
        rerun_job = job(params={"fingerprint": "convqa:2222", "artifacts": {"artifact": ARTIFACT}})
    elif change == "threads":
        rerun_job = job(threads=2)
    else:
        (Path(SOURCE) / "model.safetensors").write_bytes(b"weights" * 101)
    assert run(rerun_job, body) is False
    assert body.calls == 2
    assert json.loads(Path(OUTPUT).read_text())["run"] == 2


def test_tmpdir_and_mem_mb_are_not_part_of_the_key(workdir):
    """A job's mem_mb only decides whether an inference run is skipped, and a skipped run is not
    stored; Snakemake's estimate of it moves with which artifacts are on disk at the time."""
    body = Body()
    run(job(tmpdir="/tmp/a", mem_mb=502), body)
    assert run(job(tmpdir="/tmp/b", mem_mb=500), body) is True


def test_an_unreproducible_run_is_not_stored(workdir):
    body = Body(reproducible=False)
    run(job(), body)
    assert run(job(), body) is False
    assert body.calls == 2
    assert not any(replay.store_dir("m").rglob("entry.json"))


def test_a_stored_output_that_is_not_the_recorded_bytes_is_discarded_and_the_job_runs(workdir):
    body = Body()
    run(job(), body)
    Path(OUTPUT).unlink()
    [stored] = replay.store_dir("m").rglob("output-0")
    stored.write_text("tampered")
    assert run(job(), body) is False
    assert body.calls == 2
    assert json.loads(Path(OUTPUT).read_text())["run"] == 2
    assert run(job(), body) is True, "the fresh run is stored again"
    assert json.loads(Path(OUTPUT).read_text())["run"] == 2


def test_a_failing_body_stores_nothing(workdir):
    def failing(snakemake):
        Path(OUTPUT).write_text("half")
        raise RuntimeError("engine crashed")

    with pytest.raises(RuntimeError):
        run(job(), failing)
    assert not any(replay.store_dir("m").rglob("entry.json"))


def test_each_job_keeps_only_its_latest_runs(workdir):
    """However often a reader's inputs change, the store holds KEEP_PER_JOB versions of its
    outputs: the ones stored or replayed last (a reverted change still replays)."""
    body = Body()
    versions = [b"GGUF" + bytes([i]) * 512 for i in range(3)]
    for data in versions:  # three writer fixes, each changing the artifact's bytes
        write_artifact(data)
        assert run(job(), body) is False
    assert body.calls == 3
    [job_dir] = [d for d in replay.store_dir("m").iterdir() if d.is_dir()]
    assert len(list(job_dir.glob("*/entry.json"))) == replay.KEEP_PER_JOB == 2
    write_artifact(versions[1])
    assert run(job(), body) is True, "the run before the last is kept"
    write_artifact(versions[0])
    assert run(job(), body) is False, "the oldest was evicted"
    assert body.calls == 4
    # versions[1] was replayed after versions[2] was stored, so storing versions[0] evicted versions[2]
    write_artifact(versions[1])
    assert run(job(), body) is True
    write_artifact(versions[2])
    assert run(job(), body) is False
    assert body.calls == 5
    assert len(list(job_dir.glob("*/entry.json"))) == 2 and not list(job_dir.glob(".tmp-*"))


def test_only_a_run_that_completed_is_stored():
    """What the inference, reference and serve jobs tell run_or_replay: a skipped run (memory), a
    failed one (a timeout, an abort) or one with a failed prompt depends on more than the key."""
    from convqa.infer.run import reproducible

    ran = {"skipped": None, "error": None, "prompts": [{"prompt_id": "a", "error": None}]}
    assert reproducible(ran)
    assert reproducible({"skipped": None, "error": None, "answers": []})  # a served check
    assert not reproducible({**ran, "skipped": "needs 9.1 GB, 4.0 GB available"})
    assert not reproducible({**ran, "error": "did not finish within 600 s (hung?) and was killed"})
    assert not reproducible({**ran, "prompts": [{"prompt_id": "a", "error": "killed by SIGABRT"}]})
