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
