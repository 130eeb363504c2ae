"""convqa.workflow.intermediates: the locks readers of a converted artifact hold while it may be
deleted after use and restored."""

from __future__ import annotations

import io
import json
import threading

from convqa.workflow import intermediates


def _artifact(tmp_path):
    chain = tmp_path / "results" / "m" / "native" / "st-gguf"
    chain.mkdir(parents=True)
    (chain / "model.gguf").write_bytes(b"GGUF")
    (chain / "sidecar.json").write_text(json.dumps({"argv": ["true"], "input": "results/m/source", "sha256": "x"}))
    return str(chain / "model.gguf")


def test_readers_of_a_present_artifact_do_not_wait_for_each_other(tmp_path):
    """Every reader holds a shared lock for its whole job. Seeing that the artifact is there must
    not need more: with an exclusive lock for that, a served check of the 1.5B GGUF held a core
    idle until the 2-minute run of the same file was done."""
    artifact = _artifact(tmp_path)
    second_in = threading.Event()

    def second_reader():
        with intermediates.restored({"artifact": artifact}, io.StringIO()):
            second_in.set()

    with intermediates.restored({"artifact": artifact}, io.StringIO()):
        thread = threading.Thread(target=second_reader, daemon=True)
        thread.start()
        assert second_in.wait(timeout=10), "the second reader waited for the first to finish"
    thread.join(timeout=10)


def test_a_release_waits_for_its_readers_and_then_deletes(tmp_path):
    artifact = _artifact(tmp_path)
    released = {}

    def release():
        released.update(intermediates.release(artifact))

    with intermediates.restored({"artifact": artifact}, io.StringIO()):
        thread = threading.Thread(target=release, daemon=True)
        thread.start()
        thread.join(timeout=1)
        assert thread.is_alive() and not released, "deleted while a reader held it"
    thread.join(timeout=10)
    assert released["deleted"] and not (tmp_path / "results/m/native/st-gguf/model.gguf").exists()


def _converted(tmp_path, chain, payload, sha, name="model.gguf"):
    chain_dir = tmp_path / "results" / "m" / "native" / chain
    chain_dir.mkdir(parents=True)
    artifact = chain_dir / name
    if name == "model":  # a safetensors directory
        artifact.mkdir()
        for file, data in payload.items():
            (artifact / file).write_bytes(data)
        (artifact / ".snakemake_timestamp").touch()
    else:
        artifact.write_bytes(payload)
    (chain_dir / "sidecar.json").write_text(json.dumps({"argv": ["true"], "input": "results/m/source", "sha256": sha}))
    return artifact


def test_a_rerun_with_the_same_bytes_is_stored_once_and_either_copy_can_go_first(tmp_path):
    import os
    import time

    first = _converted(tmp_path, "st-gguf-apr", b"APR2" * 1000, "same")
    old = time.time() - 3600
    os.utime(first, (old, old))
    rerun = _converted(tmp_path, "st-gguf-apr.run2", b"APR2" * 1000, "same")
    log = io.StringIO()
    assert intermediates.share_bytes(rerun, "same", first, log) == str(first)
    assert os.path.samefile(first, rerun) and rerun.stat().st_nlink == 2
    assert rerun.stat().st_mtime > old + 3000, "the re-run's output must be newer than its inputs"
    assert "stored once" in log.getvalue()
    # Releasing one leaves the other whole, and the record says the bytes are still on disk.
    record = intermediates.release(first)
    assert record["deleted"] and record["bytes"] == record["bytes_still_linked"] == 4000
    assert rerun.read_bytes() == b"APR2" * 1000 and rerun.stat().st_nlink == 1
    assert intermediates.release(rerun)["bytes_still_linked"] == 0


def test_a_rerun_with_other_bytes_or_a_gone_original_keeps_its_own_copy(tmp_path):
    first = _converted(tmp_path, "st-gguf", b"GGUF-a", "a")
    rerun = _converted(tmp_path, "st-gguf.run2", b"GGUF-b", "b")
    assert intermediates.share_bytes(rerun, "b", first, io.StringIO()) is None
    assert rerun.stat().st_nlink == 1 and rerun.read_bytes() == b"GGUF-b"
    first.unlink()  # released before the re-run (a rerun of the re-run alone)
    assert intermediates.share_bytes(rerun, "a", first, io.StringIO()) is None
    failed = _converted(tmp_path, "st-apr", b"", "e")
    (failed.parent / "sidecar.json").write_text(json.dumps({"conversion_failed": "exit 1", "sha256": "e"}))
    assert intermediates.share_bytes(_converted(tmp_path, "st-apr.run2", b"", "e", "model.apr"), "e", failed,
                                     io.StringIO()) is None


def test_a_safetensors_rerun_is_linked_file_by_file(tmp_path):
    import os

    from convqa.report.disk import results_disk

    files = {"model.safetensors": b"x" * 5000, "config.json": b"{}"}
    first = _converted(tmp_path, "st-gguf-st", files, "s", name="model")
    rerun = _converted(tmp_path, "st-gguf-st.run2", files, "s", name="model")
    sidecars = sum(len(f.read_bytes()) for f in (tmp_path / "results").rglob("sidecar.json"))
    assert results_disk(tmp_path / "results") == (2 * 5002 + sidecars, 0)
    assert intermediates.share_bytes(rerun, "s", first, io.StringIO()) == str(first)
    for name in files:
        assert os.path.samefile(first / name, rerun / name)
    # The report's "on disk" figure counts a file once, however many links it has.
    assert results_disk(tmp_path / "results") == (5002 + sidecars, 0)


def test_files_also_linked_from_outside_the_results_are_counted_apart(tmp_path):
    """A source checkpoint prepare_source hard-linked (not copied) is on the disk whatever the
    run does: `results_disk` says how much of the results it is."""
    import os

    from convqa.report.disk import results_disk

    checkpoint = tmp_path / "checkpoint" / "model.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"w" * 7000)
    results = tmp_path / "results"
    (results / "m" / "source").mkdir(parents=True)
    os.link(checkpoint, results / "m" / "source" / "model.safetensors")
    (results / "m" / "artifact.gguf").write_bytes(b"g" * 300)
    os.link(results / "m" / "artifact.gguf", results / "m" / "artifact.run2.gguf")  # both inside: counted once, as the run's
    assert results_disk(results) == (7300, 7000)
    checkpoint.unlink()  # the user deleted the original: the results hold the only copy
    assert results_disk(results) == (7300, 0)
