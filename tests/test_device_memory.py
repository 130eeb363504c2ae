"""Free gpu memory is checked before a gpu run loads anything (convqa.infer.device): too little
gives a `skipped` record with the numbers, never a CUDA OOM. The device is a fake
mem_get_info (the one thing a machine without a GPU cannot provide); the artifacts, their sizes
and the run records are real."""

from __future__ import annotations

import pytest

from convqa.convert.builtin import convert
from convqa.formats import open_model
from convqa.gates.inference import evaluate
from convqa.gates.rows import SKIPPED
from convqa.infer import device
from convqa.infer.prompts import DEFAULT_PROMPTS
from convqa.infer.run import run_prompts, run_reference

GIB = 2**30


@pytest.fixture(scope="module")
def artifacts(synthetic_dir, tmp_path_factory):
    source = synthetic_dir("qwen2-tiny")
    out = tmp_path_factory.mktemp("device")
    convert(source, out / "q8.gguf", "gguf", quant="q8_0")
    convert(source, out / "f32.apr", "apr")
    return source, out / "q8.gguf", out / "f32.apr"


def test_estimate_is_the_weights_as_each_engine_holds_them_plus_a_margin(artifacts):
    _, gguf, apr = artifacts
    with open_model(gguf) as model:
        elements = sum(t.n_elements for t in model)
        stored = sum(t.nbytes for t in model)
    assert device.weight_bytes(gguf, "transformers") == 4 * elements  # dequantized to float32
    assert device.weight_bytes(gguf, "llama.cpp") == stored < 4 * elements  # Q8_0 blocks stay blocks
    assert device.weight_bytes(apr, "transformers") == 4 * elements
    assert device.bytes_needed(GIB) == int(1.2 * GIB) + 256 * 2**20


def test_too_little_free_memory_is_a_skip_with_the_numbers(artifacts):
    _, gguf, _ = artifacts
    reason, memory = device.check_artifact(gguf, "transformers", mem_get_info=lambda: (100 * 2**20, 80 * GIB))
    assert reason.startswith("not enough free GPU memory: the run needs about 0.2")  # the 256 MiB margin dominates
    assert "0.10 GiB of 80.00 GiB is free" in reason
    assert memory == {"needed_bytes": device.bytes_needed(device.weight_bytes(gguf, "transformers")),
                      "free_bytes": 100 * 2**20, "total_bytes": 80 * GIB}
    assert device.check_artifact(gguf, "transformers", mem_get_info=lambda: (40 * GIB, 80 * GIB))[0] == ""


def test_a_device_that_cannot_be_asked_does_not_skip(artifacts):
    _, gguf, _ = artifacts

    def no_runtime():
        raise RuntimeError("CUDA driver initialization failed")

    assert device.check_artifact(gguf, "llama.cpp", mem_get_info=no_runtime) == ("", None)


def test_a_gpu_run_short_of_memory_is_recorded_skipped_before_anything_loads(artifacts, monkeypatch):
    """The workflow path (run_prompts, run_reference) on a machine that has a device (the
    capability check says so) but little free memory: skipped with the numbers, no engine built."""
    source, gguf, _ = artifacts
    monkeypatch.setattr("convqa.infer.run.capability", lambda engine, backend: (True, ""))
    monkeypatch.setattr(device, "torch_mem_get_info", lambda: (64 * 2**20, 16 * GIB))

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was built although the run cannot fit")

    monkeypatch.setattr("convqa.infer.run.engine_for", no_engine)
    record, logits = run_prompts(gguf, source, "transformers", "gpu", list(DEFAULT_PROMPTS), 4, 2)
    assert logits == {} and record["skipped"].startswith("not enough free GPU memory")
    assert record["device_memory"]["free_bytes"] == 64 * 2**20
    reference, _ = run_reference(source, gguf, list(DEFAULT_PROMPTS), 4, 2, backend="gpu")
    assert reference["skipped"].startswith("not enough free GPU memory") and reference["backend"] == "gpu"
    # ... and its gate rows are skipped with that reason, like any absent capability.
    record["logits"] = {}
    rows, _, _ = evaluate("m", "q8_0", {("st", "transformers", "gpu"): record, ("st-gguf", "transformers", "gpu"): record},
                          {}, {"transformers": {"max_mean_kl": 0.02, "reason": "q8_0"}}, ("run",))
    (row,) = [r for r in rows if r.gate == "F-INF-gguf-gpu-run"]
    assert row.status == SKIPPED and "GiB is free" in row.reason
