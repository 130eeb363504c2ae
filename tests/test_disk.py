"""convqa.report.disk: the report's Disk section from real conversions' sidecars, a deleted
intermediate shown as deleted, and `convqa plan`'s estimate from a model's size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from convqa.convert.builtin import convert
from convqa.convert.runner import artifact_sidecar
from convqa.files import path_size, write_json
from convqa.report import disk
from convqa.report.build import write_report
from convqa.report.evidence import display_size, load_evidence


@pytest.fixture(scope="module")
def chains(synthetic_dir, tmp_path_factory):
    """Two real artifacts of qwen2-tiny (S->G, S->A) with their sidecars; the APR one deleted."""
    source = synthetic_dir("qwen2-tiny")
    root = tmp_path_factory.mktemp("disk")
    sidecars = {}
    for chain, name, fmt in (("st-gguf", "model.gguf", "gguf"), ("st-apr", "model.apr", "apr")):
        (root / chain).mkdir()
        artifact = root / chain / name
        convert(source, artifact, fmt)
        sidecars[f"native/{chain}"] = root / chain / "sidecar.json"
        write_json(sidecars[f"native/{chain}"], artifact_sidecar(artifact, converter="convqa", fingerprint="x"))
    sizes = {label: json.loads(p.read_text())["size"] for label, p in sidecars.items()}
    (root / "st-apr" / "model.apr").unlink()
    return root, sidecars, sizes


def test_disk_usage_counts_what_each_chain_wrote_and_what_was_deleted(chains):
    root, sidecars, sizes = chains
    usage = disk.disk_usage(sidecars)
    by_label = {c["label"]: c for c in usage["chains"]}
    assert by_label["native/st-gguf"]["state"] == disk.KEPT
    assert by_label["native/st-apr"]["state"] == disk.DELETED
    assert by_label["native/st-gguf"]["bytes_written"] == path_size(root / "st-gguf" / "model.gguf") > 0
    assert usage["written"] == sum(sizes.values())
    assert usage["deleted"] == sizes["native/st-apr"] and usage["kept"] == sizes["native/st-gguf"]


def test_the_report_shows_the_disk_section(chains, tmp_path):
    _root, sidecars, sizes = chains
    usage = {**disk.disk_usage(sidecars), "on_disk": 12345}
    out = write_report("tiny", [], {}, sidecars, {}, tmp_path, extra={"disk": usage})
    assert load_evidence(out["evidence"])["extra"]["disk"]["deleted"] == sizes["native/st-apr"]
    md = out["markdown"].read_text()
    assert "## Disk" in md and f"deleted after use: {display_size(sizes['native/st-apr'])}" in md
    assert f"| native/st-apr | {display_size(sizes['native/st-apr'])} | deleted after use |" in md
    page = out["html"].read_text()
    assert "<h2>Disk</h2>" in page and "deleted after use" in page
    assert "hard links to the source checkpoint" not in md + page  # nothing linked: not said


def test_the_report_says_how_much_of_the_results_is_the_linked_checkpoint(chains, tmp_path):
    """prepare_source hard-links a local checkpoint: on disk under results/, but not added by the run."""
    import os

    root, sidecars, _sizes = chains
    checkpoint = tmp_path / "checkpoint.safetensors"
    checkpoint.write_bytes(b"w" * 4096)
    os.link(checkpoint, root / "model.safetensors")
    recorded = disk.on_disk(root)
    assert recorded["linked_from_outside"] == 4096 and recorded["on_disk"] >= 4096
    out = write_report("tiny", [], {}, sidecars, {}, tmp_path / "report", extra={"disk": {**disk.disk_usage(sidecars), **recorded}})
    said = f"of which hard links to the source checkpoint's files (not a second copy): {display_size(4096)}"
    assert said in out["markdown"].read_text()
    assert said.replace("'", "&#39;") in out["html"].read_text() or said in out["html"].read_text()


def test_plan_estimates_disk_and_time_from_the_model_size(synthetic_dir):
    source = synthetic_dir("qwen2-tiny")
    proc = subprocess.run([sys.executable, "-m", "convqa.cli", "plan", str(source), "--tier", "mvp", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    size = path_size(source)
    assert plan["source_bytes"] == size
    assert plan["artifacts"] > 10  # mvp: chains x variants
    # Every artifact is about the source's size (F32 here: native and dequantized hops).
    assert size * plan["artifacts"] * 0.3 < plan["written_bytes"] < size * plan["artifacts"] * 2
    assert plan["peak_bytes_with_deletion"] < plan["written_bytes"]
    assert plan["cpu_seconds"] > 0


def test_plan_prices_a_quantized_gguf_as_the_f32_ground_truth_the_workflow_imports(smollm2_gguf, smollm2_st):
    """The workflow converts from the imported source, not from the Q4_1 file: sized from the
    file, the plan said 6.1 GB written for SmolLM2's mvp where its F32 source makes ~5x that."""
    proc = subprocess.run([sys.executable, "-m", "convqa.cli", "plan", str(smollm2_gguf), "--tier", "mvp", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    imported = path_size(smollm2_st)
    assert abs(plan["source_bytes"] - imported) < 0.02 * imported, (plan["source_bytes"], imported)
