"""The gpu backend judged the right way, on recorded runs (no device needed).

Every gpu row is judged against a reference run on the gpu (convqa.workflow.references), and the
backends meet only in F-BACKEND-001, which stays outside the verdict. Without a CUDA device the
"gpu" runs here come from a real transformers engine whose kernels differ from the cpu ones the
way a GPU's do: the same model computed in float64 and rounded to float32 logits, so every
matmul sums in another precision and order (differences of 1e-7..1e-6 relative, as between
cuBLAS and CPU GEMM in float32) while the same kernels on the same values still agree bit for
bit. The records go through write_run/load_run, the files rule infer writes and the gates read.
"""

from __future__ import annotations

import numpy as np
import pytest

from convqa.convert.builtin import convert
from convqa.formats import open_model
from convqa.gates.backend import backend_rows
from convqa.gates.inference import compare_runs, evaluate, judge
from convqa.gates.rows import FAIL, NOT_EVALUATED, PASS, SKIPPED, GateRow
from convqa.infer.engines.transformers_engine import TransformersEngine
from convqa.infer.prompts import DEFAULT_PROMPTS
from convqa.infer.reference_model import reference_quantized
from convqa.infer.run import (_new_record, _run_loaded, artifact_tokenizer, ground_truth_tokenizer, load_run,
                              run_prompts, run_reference, write_run)
from convqa.report.evidence import summarize
from convqa.report.junit import render_junit
from convqa.workflow.references import RunRef, backend_pairs, references_of

PROMPTS = list(DEFAULT_PROMPTS)
MAX_NEW_TOKENS = 8
NATIVE = {"transformers": {"max_abs_dlogit": 0, "greedy_equal": True, "reason": "lossless"}}
Q8_0 = {"transformers": {"max_mean_kl": 0.02, "min_top1": 0.9, "reason": "q8_0 noise"}}
EXACT_REFERENCE = {"transformers": {"max_abs_dlogit": 0, "greedy_equal": True, "reason": "same decoder"}}
# config/config.yaml inference.backend_tolerances.transformers
BACKEND = {"transformers": {"max_rel_dlogit": 1.0e-3, "max_mean_kl": 1.0e-4, "reason": "provisional"}}
REFERENCE_TOLERANCES = {"q8_0": EXACT_REFERENCE}


class OtherKernelsEngine(TransformersEngine):
    """transformers whose kernels differ from the cpu ones (float64 arithmetic, float32 logits):
    the stand-in for a CUDA device. Its records say backend gpu."""

    def __init__(self, threads: int = 2):
        super().__init__(backend="cpu", threads=threads)
        self.backend = "gpu"

    def _load(self, artifact_path: str) -> None:
        super()._load(artifact_path)
        self.model = self.model.double()

    def load_artifact(self, artifact):
        super().load_artifact(artifact)
        self.model = self.model.double()
        return self


def recorded(tmp_path, name, record, logits):
    """The record as rule infer leaves it on disk, read back as the gate job reads it."""
    write_run(record, logits, tmp_path / f"{name}.json", tmp_path / f"{name}.npz")
    return load_run(tmp_path / f"{name}.json", tmp_path / f"{name}.npz")


def cpu_run(tmp_path, name, artifact, source):
    return recorded(tmp_path, name, *run_prompts(artifact, source, "transformers", "cpu", PROMPTS, MAX_NEW_TOKENS, 2))


def gpu_run(tmp_path, name, artifact, source):
    """run_prompts' record of `artifact` on the other kernels."""
    record = _new_record(str(artifact), "transformers", "gpu", MAX_NEW_TOKENS)
    with OtherKernelsEngine() as engine:
        engine.load(artifact)
        logits = _run_loaded(engine, ground_truth_tokenizer(source), artifact_tokenizer(artifact), PROMPTS,
                             MAX_NEW_TOKENS, record)
    return recorded(tmp_path, name, record, logits)


def gpu_reference_run(tmp_path, name, source, encoded):
    """run_reference's record of the reference-quantized model on the other kernels."""
    record = _new_record(f"reference of {encoded}", "transformers", "gpu", MAX_NEW_TOKENS)
    with OtherKernelsEngine() as engine, open_model(source) as src, open_model(encoded) as enc:
        reference = reference_quantized(src, enc)
        engine.load_artifact(reference)
        logits = _run_loaded(engine, ground_truth_tokenizer(source), reference.tokenizer, PROMPTS, MAX_NEW_TOKENS, record)
    return recorded(tmp_path, name, record, logits)


@pytest.fixture(scope="module")
def truth(synthetic_dir, tmp_path_factory):
    """The source and its ground truth on both backends."""
    source = synthetic_dir("qwen2-tiny")
    tmp = tmp_path_factory.mktemp("truth")
    return source, {("st", "transformers", "cpu"): cpu_run(tmp, "st-cpu", source, source),
                    ("st", "transformers", "gpu"): gpu_run(tmp, "st-gpu", source, source)}


def converted(source, tmp_path, fmt, **options):
    out = tmp_path / f"model.{fmt}"
    convert(source, out, fmt, **options)
    return out


def by_gate(rows):
    return {(r.gate, r.subject.rsplit("/", 1)[-1]): r for r in rows}


# ---------------------------------------------------------------- which run judges which


def test_every_row_is_judged_against_a_run_on_its_own_backend():
    gpu_truth = RunRef("st", "transformers", "gpu")
    assert references_of("st-apr", "transformers", "gpu", "native", REFERENCE_TOLERANCES) == {"F-INF": gpu_truth}
    # llama.cpp cannot read the source: the ground truth on its backend, with its own tolerance.
    assert references_of("st-gguf", "llama.cpp", "gpu", "q8_0", REFERENCE_TOLERANCES) == {"F-INF": gpu_truth}
    assert references_of("st-gguf-apr", "transformers", "gpu", "q8_0", REFERENCE_TOLERANCES) == {
        "F-INF": gpu_truth, "F-INF-REF": RunRef("st-gguf", "transformers", "gpu", kind="reference")}
    assert references_of("st-gguf", "transformers", "cpu", "q8_0", REFERENCE_TOLERANCES)["F-INF-REF"].key == ("st-gguf", "cpu")
    assert references_of("st", "transformers", "gpu", "native", REFERENCE_TOLERANCES) == {}  # a ground truth itself
    cells = [("st", "transformers", "cpu"), ("st", "transformers", "gpu"), ("st-gguf", "transformers", "cpu"),
             ("st-gguf", "transformers", "gpu"), ("st-gguf", "llama.cpp", "cpu"), ("st-gguf", "llama.cpp", "gpu"),
             ("st-apr", "transformers", "gpu")]
    # The backends meet only on identical inputs: the source under transformers, a GGUF under llama.cpp.
    assert [(g.key, c.key) for g, c in backend_pairs(cells)] == [
        (("st", "transformers", "gpu"), ("st", "transformers", "cpu")),
        (("st-gguf", "llama.cpp", "gpu"), ("st-gguf", "llama.cpp", "cpu"))]


# ---------------------------------------------------------------- the gates on recorded runs


def test_lossless_gpu_artifact_is_bit_exact_against_the_gpu_ground_truth_and_the_old_design_fails_it(truth, tmp_path):
    source, runs = truth
    apr = converted(source, tmp_path, "apr")
    runs = {**runs, ("st-apr", "transformers", "gpu"): gpu_run(tmp_path, "apr-gpu", apr, source),
            ("st-apr", "transformers", "cpu"): cpu_run(tmp_path, "apr-cpu", apr, source)}
    rows = by_gate(evaluate("m", "native", runs, {}, NATIVE, ("run", "chat"))[0])
    for modality in ("run", "chat"):
        for backend in ("cpu", "gpu"):
            row = rows[(f"F-INF-apr-{backend}-{modality}", "transformers")]
            assert row.status == PASS and row.value == "0", row
    assert rows[("F-INF-apr-gpu-run", "transformers")].reference == "native/st/transformers-gpu"
    assert not any(gate.startswith("F-INF-st-") for gate, _ in rows)  # the ground truths judge, they are not judged
    # The old design: the gpu run against the cpu ground truth. A perfect conversion fails.
    old = judge(GateRow("F-INF-apr-gpu-run", "native/st-apr/transformers"),
                compare_runs(runs[("st", "transformers", "cpu")], runs[("st-apr", "transformers", "gpu")], "run"),
                NATIVE["transformers"])
    assert old.status == FAIL and 0 < float(old.value) < 1e-3, old
    assert "max |dlogit|" in old.reason


def test_cross_backend_gate_passes_within_tolerance_and_is_not_bit_exact(truth):
    _, runs = truth
    (row,) = backend_rows("m", "native", runs, BACKEND)
    assert row.gate == "F-BACKEND-001" and row.status == PASS, row
    assert (row.subject, row.reference) == ("native/st/transformers-gpu", "native/st/transformers-cpu")
    rel, kl = (float(v) for v in row.value.split("; "))
    assert 0 < rel < 1e-5 and 0 <= kl < 1e-8  # kernel order: tiny, never zero
    # A backend off by more than float32 noise (TF32-sized, 1e-3 relative per product) fails.
    drifted = dict(runs[("st", "transformers", "gpu")])
    drifted["logits"] = {k: (v * (1 + 3e-3 * np.sign(np.sin(np.arange(v.size)))).reshape(v.shape)).astype(np.float32)
                         for k, v in drifted["logits"].items()}
    (bad,) = backend_rows("m", "native", {**runs, ("st", "transformers", "gpu"): drifted}, BACKEND)
    assert bad.status == FAIL and "max |dlogit| / max |logit|" in bad.reason, bad
    (unset,) = backend_rows("m", "native", runs, {})
    assert unset.status == NOT_EVALUATED and "backend_tolerances" in unset.reason


@pytest.mark.parametrize("mutant", ["lose-rope-theta", "transpose-2d"])
def test_broken_artifact_on_gpu_fails_against_the_gpu_ground_truth(truth, tmp_path, mutant):
    source, runs = truth
    apr = converted(source, tmp_path, "apr", mutant=mutant)
    runs = {**runs, ("st-apr", "transformers", "gpu"): gpu_run(tmp_path, "bad-gpu", apr, source)}
    rows = by_gate(evaluate("m", "native", runs, {}, NATIVE, ("run", "chat"))[0])
    row = rows[("F-INF-apr-gpu-run", "transformers")]
    assert row.status == FAIL and float(row.value) > 0, row


def test_lossy_gpu_artifact_is_bit_exact_against_the_gpu_reference_model(truth, tmp_path):
    source, runs = truth
    gguf = converted(source, tmp_path, "gguf", quant="q8_0")
    runs = {**runs, ("st-gguf", "transformers", "gpu"): gpu_run(tmp_path, "q8-gpu", gguf, source)}
    gpu_reference = gpu_reference_run(tmp_path, "ref-gpu", source, gguf)
    cpu_reference = recorded(tmp_path, "ref-cpu", *run_reference(source, gguf, PROMPTS, MAX_NEW_TOKENS, 2))
    rows = by_gate(evaluate("m", "q8_0", runs, {}, Q8_0, ("run", "chat"), references={("st-gguf", "gpu"): gpu_reference},
                            reference_tolerances=EXACT_REFERENCE)[0])
    row = rows[("F-INF-REF-gguf-gpu-run", "transformers")]
    assert row.status == PASS and row.value == "0" and row.reference == "q8_0/st-gguf/reference-gpu", row
    assert rows[("F-INF-gguf-gpu-run", "transformers")].status == PASS
    # Against the cpu reference the same correct artifact would fail: kernels, not the quantizer.
    rows = by_gate(evaluate("m", "q8_0", runs, {}, Q8_0, ("run",), references={("st-gguf", "gpu"): cpu_reference},
                            reference_tolerances=EXACT_REFERENCE)[0])
    assert rows[("F-INF-REF-gguf-gpu-run", "transformers")].status == FAIL
    # No gpu reference recorded: not evaluated, never a pass.
    rows = by_gate(evaluate("m", "q8_0", runs, {}, Q8_0, ("run",), references={("st-gguf", "cpu"): cpu_reference},
                            reference_tolerances=EXACT_REFERENCE)[0])
    missing = rows[("F-INF-REF-gguf-gpu-run", "transformers")]
    assert missing.status == NOT_EVALUATED and "on gpu" in missing.reason


def test_gpu_row_without_its_ground_truth_is_not_evaluated_and_no_device_is_skipped(truth, tmp_path):
    source, runs = truth
    apr = converted(source, tmp_path, "apr")
    artifact = gpu_run(tmp_path, "apr-gpu", apr, source)
    rows = by_gate(evaluate("m", "native", {("st", "transformers", "cpu"): runs[("st", "transformers", "cpu")],
                                            ("st-apr", "transformers", "gpu"): artifact}, {}, NATIVE, ("run",))[0])
    row = rows[("F-INF-apr-gpu-run", "transformers")]
    assert row.status == NOT_EVALUATED and "transformers, gpu" in row.reason, row
    skipped = {"skipped": "no CUDA device", "error": None, "prompts": [], "logits": {}}
    no_device = {("st", "transformers", "cpu"): runs[("st", "transformers", "cpu")],
                 ("st", "transformers", "gpu"): skipped, ("st-apr", "transformers", "gpu"): skipped}
    rows = evaluate("m", "native", no_device, {}, NATIVE, ("run", "chat"))[0] + backend_rows("m", "native", no_device, BACKEND)
    assert {(r.gate, r.status, r.reason) for r in rows} == {
        ("F-INF-apr-gpu-run", SKIPPED, "no CUDA device"), ("F-INF-apr-gpu-chat", SKIPPED, "no CUDA device"),
        ("F-BACKEND-001", SKIPPED, "no CUDA device")}


# ---------------------------------------------------------------- how F-BACKEND-001 counts


def _row(gate, status, subject="native/st-apr/transformers"):
    return {"gate": gate, "family": gate.rsplit("-", 1)[0], "status": status, "subject": subject, "reference": "r",
            "reason": f"{status} reason", "metric": "", "value": "", "threshold": "", "details": "", "model": "m",
            "variant": "native"}


def test_backend_gate_neither_fails_a_perfect_conversion_nor_hides_a_broken_one():
    backend_fail = _row("F-BACKEND-001", "fail", "native/st/transformers-gpu")
    perfect = summarize([_row("F-INF-apr-gpu-run", "pass"), backend_fail])
    assert perfect["verdict"] == "QUALIFIED" and perfect["fail"] == 0, perfect
    assert perfect["outside_verdict"] == {"rows": 1, "pass": 0, "fail": 1, "skipped": 0, "not_evaluated": 0}
    broken = summarize([_row("F-INF-apr-gpu-run", "fail"), _row("F-BACKEND-001", "pass", "native/st/transformers-gpu")])
    assert broken["verdict"] == "NOT QUALIFIED"
    only_backend = summarize([_row("F-BACKEND-001", "pass", "native/st/transformers-gpu")])
    assert only_backend["verdict"] == "INCOMPLETE"  # a passing backend check qualifies no conversion
    evidence = {"model": "m", "summary": perfect, "gates": [_row("F-INF-apr-gpu-run", "pass"), backend_fail],
                "schema_version": "x", "tool_versions": {}, "generated_at": "2026-01-01T00:00:00"}
    xml = render_junit(evidence).decode()
    assert "<failure" not in xml and "outside the verdict" in xml, xml


# ---------------------------------------------------------------- llama.cpp on gpu


def test_llamacpp_gpu_rows_say_why_they_cannot_run():
    import llama_cpp

    from convqa.infer.engines import capability
    from convqa.infer.engines.llamacpp_engine import gpu_offload_problem

    available, reason = capability("llama.cpp", "gpu")
    assert available == llama_cpp.llama_supports_gpu_offload()
    if not available:  # this machine's build: PyPI's sdist compiled without CMAKE_ARGS
        assert reason == gpu_offload_problem(llama_cpp.llama_print_system_info())
    cpu_build = b"CPU : SSE3 = 1 | AVX2 = 1 | FMA = 1 | OPENMP = 1 | REPACK = 1 | "
    assert "make setup-cuda" in gpu_offload_problem(cpu_build)
    cuda_build = b"CUDA : ARCHS = 900 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : AVX2 = 1 | "
    assert gpu_offload_problem(cuda_build).startswith("no CUDA device visible to llama.cpp")


# ---------------------------------------------------------------- bench/gpu.py


def test_gpu_check_prints_the_measured_values_of_recorded_gpu_rows(truth, tmp_path):
    """bench/gpu.py's summary of a gate table, on the rows the recorded runs above give."""
    import importlib.util

    from convqa.gates.rows import write_rows_tsv
    from convqa.report.evidence import read_gate_table

    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parent.parent / "bench" / "gpu.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    source, runs = truth
    apr = converted(source, tmp_path, "apr")
    runs = {**runs, ("st-apr", "transformers", "gpu"): gpu_run(tmp_path, "apr-gpu", apr, source)}
    rows = evaluate("m", "native", runs, {}, NATIVE, ("run", "chat"))[0] + backend_rows("m", "native", runs, BACKEND)
    write_rows_tsv(rows, tmp_path / "inference.tsv")
    lines = gpu_check.measured(read_gate_table(tmp_path / "inference.tsv"), "gpu")
    assert lines[0].startswith("F-BACKEND-001 transformers: max |dlogit| / max |logit|; mean KL = ")
    assert "F-INF gpu native transformers: max |dlogit| = 0 (worst of 2; threshold <= 0)" in lines
    config = gpu_check.workflow_config("smollm2", "gpu")
    assert config["inference"]["backends"] == ["cpu", "gpu"] and list(config["models"]) == ["smollm2"]
    assert gpu_check.workflow_config("qwen2-tiny", "cpu")["inference"]["backends"] == ["cpu"]


# ---------------------------------------------------------------- what the workflow runs


def _jobs(gpu_jobs="run", **inference):
    import yaml

    from convqa.workflow import jobs
    from workflow_copy import REPO

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.setdefault("route", {})
    config["gpu_jobs"] = gpu_jobs
    config["inference"].update(inference)
    return jobs.Jobs(config, REPO / "scripts")


def test_gpu_jobs_auto_starts_them_where_a_gpu_can_run_them(tmp_path, monkeypatch):
    from convqa.workflow import gpu

    assert gpu.skip_reason("run", device_visible=lambda: False) is None
    assert gpu.skip_reason("skip", device_visible=lambda: True).startswith("gpu backend not run: gpu_jobs is skip")
    no_device = gpu.skip_reason("auto", device_visible=lambda: False, environ={})
    assert no_device.startswith("no CUDA device") and "gpu_jobs: run" in no_device
    assert gpu.skip_reason("auto", device_visible=lambda: True, environ={}) is None
    # A SLURM login node without a GPU whose site names GPU nodes for the gpu jobs (profiles/slurm).
    assert gpu.skip_reason("auto", device_visible=lambda: False, environ={"CONVQA_SLURM_GPU_PARTITION": "gpu"}) is None
    # The probe: the driver's /dev/nvidia<N> nodes (not nvidiactl, nvidia-uvm), unless CUDA_VISIBLE_DEVICES hides them.
    (tmp_path / "nvidiactl").touch()
    (tmp_path / "nvidia-uvm").touch()
    pattern = str(tmp_path / "nvidia*")
    assert not gpu.cuda_device_visible({}, pattern)
    (tmp_path / "nvidia0").touch()
    assert gpu.cuda_device_visible({}, pattern)
    assert not gpu.cuda_device_visible({"CUDA_VISIBLE_DEVICES": ""}, pattern)
    assert not gpu.cuda_device_visible({"CUDA_VISIBLE_DEVICES": "-1"}, pattern)
    assert gpu.cuda_device_visible({"CUDA_VISIBLE_DEVICES": "0"}, pattern)


def test_gpu_cells_no_job_runs_are_skipped_records_with_the_reason():
    from convqa.gates.inference_table import _record

    planned, skipped = _jobs(gpu_jobs="run"), _jobs(gpu_jobs="skip")
    wildcards = type("W", (), {"model": "smollm2", "variant": "q8_0", "tier": "mvp"})()
    gpu_paths = [p for p in planned.inference_gate_inputs(wildcards) if "gpu" in p.rsplit("/", 1)[-1]]
    assert gpu_paths, "the gpu backend's runs are the gate job's inputs when they are started"
    assert not [p for p in skipped.inference_gate_inputs(wildcards) if "gpu" in p.rsplit("/", 1)[-1]]
    assert set(skipped.inference_cells("mvp")) == set(planned.inference_cells("mvp"))  # every cell still has rows
    inputs = skipped.inference_input_map("smollm2", "q8_0", "mvp")
    cell = inputs["runs"]["st-gguf|llama.cpp|gpu"]
    assert cell == {"skipped": skipped.gpu_skipped}
    record = _record("st-gguf|llama.cpp|gpu", cell)
    assert record["skipped"] == skipped.gpu_skipped and record["backend"] == "gpu" and record["logits"] == {}
    assert inputs["references"]["st-gguf|gpu"] == {"skipped": skipped.gpu_skipped}
    assert inputs["runs"]["st-gguf|llama.cpp|cpu"]["json"].endswith("llamacpp-cpu.json")


def test_the_gate_job_reads_the_ground_truth_and_references_of_every_backend():
    J = _jobs(chains={"smoke": ["st-gguf"], "mvp": ["st-gguf", "st-apr"], "full": ["st-gguf"]})  # no `st` chain
    cells = J.inference_cells("mvp")
    assert {("st", "transformers", "cpu"), ("st", "transformers", "gpu")} <= set(cells)
    inputs = J.inference_input_map("smollm2", "q8_0", "mvp")
    assert inputs["runs"]["st|transformers|gpu"]["json"] == "results/smollm2/source.infer/transformers-gpu.json"
    assert inputs["references"]["st-gguf|gpu"]["npz"] == "results/smollm2/q8_0/reference/st-gguf/transformers-gpu.npz"
    # q8_0 does not quantize S->A, which it shares with native (plan.owning_variant): native's
    # bit-exact F-INF rows judge that run, and no reference model of it is run.
    assert set(inputs["references"]) == {"st-gguf|cpu", "st-gguf|gpu"}
    assert inputs["judged_by_owner"] == {"st-apr": "native"}
    assert J.inference_input_map("smollm2", "native", "mvp")["references"] == {}  # lossless: no reference model
    cpu_only = _jobs(backends=["cpu"])
    assert not [c for c in cpu_only.inference_cells("mvp") if c[2] == "gpu"]
    assert set(cpu_only.inference_input_map("smollm2", "q8_0", "mvp")["references"]) == {"st-gguf|cpu"}
    alone = _jobs(backends=["cpu"])
    alone.config["models"]["smollm2"]["variants"] = ["q8_0"]  # no native to judge S->A: q8_0's own reference
    assert set(alone.inference_input_map("smollm2", "q8_0", "mvp")["references"]) == {"st-apr|cpu", "st-gguf|cpu"}


def test_backend_tolerances_are_configured_with_reasons_and_repeat_the_schema_defaults():
    import yaml

    from workflow_copy import REPO

    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    default = schema["properties"]["inference"]["properties"]["backend_tolerances"]["default"]
    configured = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["inference"]["backend_tolerances"]
    assert set(configured) == {"transformers", "llama.cpp"}
    for engine, tolerance in configured.items():
        assert tolerance["reason"].startswith("provisional"), "no gpu measurement yet: the reason says so"
        assert {k: v for k, v in tolerance.items() if k != "reason"} == {k: v for k, v in default[engine].items() if k != "reason"}
