"""Real checkpoints and broken artifacts: a verdict for every one, never a crash.

- A checkpoint shaped like Qwen2.5-Coder-1.5B-Instruct on the Hub (BF16, sharded, tied, vocab
  padded past the tokenizer, no BOS, a tool-aware template, a transformers-4.x config): GGUF
  stores its 1-D tensors in F32 as llama.cpp's converter does (a recorded, lossless upcast), and
  llama.cpp runs it.
- Engines run in a child process (convqa.infer.isolated): an abort, a segfault, a kill or a hang is a
  recorded failure with the signal and the stderr tail.
- Non-finite logits on either side of a comparison give fail or not_evaluated rows.
- Through the workflow: the real-world shape qualifies; a GGUF with a NaN weight and a GGUF that
  llama.cpp aborts on each end in a NOT QUALIFIED report with the expected failing gates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convqa.convert.builtin import convert
from convqa.infer.engines import capability
from convqa.formats import open_model
from convqa.gates.artifact import artifact_rows
from convqa.gates.contracts import contract_rows
from convqa.gates.rows import FAIL, NOT_EVALUATED, PASS
from convqa.gates.inference import compare_runs, engine_rows, evaluate, judge, select_tolerances
from convqa.infer.run import load_run, run_prompts_isolated, serve_prompts
from convqa.infer.isolated import run_isolated
from convqa.inspect.manifest import build_manifest
from convqa.convert.mutants import NAN_WEIGHT
from workflow_copy import Workflow

needs_llama_cpp = pytest.mark.skipif(not capability("llama.cpp", "cpu")[0], reason="llama-cpp-python not installed")
PRESET = "qwen2.5-tiny-bf16"


@pytest.fixture(scope="module")
def hub_checkpoint(tmp_path_factory) -> Path:
    from convqa.sources.synthetic import build_preset

    return build_preset(tmp_path_factory.mktemp("hub") / "model", PRESET)


@pytest.fixture(scope="module")
def converted(hub_checkpoint, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("converted")
    records = {
        "gguf": convert(hub_checkpoint, out / "model.gguf"),
        "apr": convert(hub_checkpoint, out / "model.apr"),
        "bad_gguf": convert(hub_checkpoint, out / "bf16-norms.gguf", mutant="bf16-norms-in-gguf"),
        "nan_gguf": convert(hub_checkpoint, out / "nan.gguf", mutant="nan-weight"),
    }
    records["gguf_st"] = convert(out / "model.gguf", out / "model-back", "safetensors")
    return {"dir": out, "records": records}


# ---------------------------------------------------------------- the checkpoint's shape


def test_the_preset_looks_like_a_hub_checkpoint(hub_checkpoint):
    files = sorted(p.name for p in hub_checkpoint.iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 2
    assert "generation_config.json" in files
    config = json.loads((hub_checkpoint / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "rope_theta" in config and config["use_sliding_window"] is False
    with open_model(hub_checkpoint) as model:
        assert {t.encoding.name for t in model} == {"BF16"}
        assert model.config.tie_word_embeddings and "lm_head.weight" not in model.tensors
        tok = model.tokenizer
        assert model.config.vocab_size == 512 and len(tok.tokens) == 512
        real = [t for t, kind in zip(tok.tokens, tok.token_types) if kind != 5]
        assert len(real) == 448 and tok.tokens[448] == "[PAD448]", "embedding padded past the tokenizer"
        assert tok.add_bos_token is False and tok.tokens[tok.eos_token_id] == "<|im_end|>"
        assert "tools" in tok.chat_template and tok.token_types[tok.tokens.index("<tool_call>")] == 4


def test_gguf_upcasts_1d_tensors_to_f32_and_records_it(hub_checkpoint, converted):
    record = converted["records"]["gguf"]
    with open_model(hub_checkpoint) as source, open_model(converted["dir"] / "model.gguf") as gguf:
        one_d = sorted(n for n, t in source.tensors.items() if len(t.shape) == 1)
        assert one_d and sorted(name for name, _, _ in record.upcast) == one_d
        assert all(src == "BF16" and dst == "F32" for _, src, dst in record.upcast)
        for name, tensor in gguf.tensors.items():
            assert tensor.encoding.name == ("F32" if name in one_d else "BF16"), name
            assert np.array_equal(tensor.to_float32(), source.tensors[name].to_float32()), "the upcast is exact"
    # APR keeps what the APR toolchain keeps: BF16 passes through.
    with open_model(converted["dir"] / "model.apr") as apr:
        assert {t.encoding.name for t in apr} == {"BF16"}
    assert converted["records"]["apr"].upcast == []


@pytest.mark.parametrize("quant", ["bf16", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "apr-int8", "apr-int4"])
def test_every_lossy_variant_converts_a_bf16_checkpoint(hub_checkpoint, tmp_path, quant):
    from convqa.encodings import QUANT_TARGETS

    for fmt, encoding in QUANT_TARGETS[quant].items():
        if fmt == "safetensors":
            continue
        out = tmp_path / f"model.{fmt}"
        record = convert(hub_checkpoint, out, quant=quant)
        with open_model(out) as model:
            for name, tensor in model.tensors.items():
                if len(tensor.shape) == 1:
                    assert tensor.encoding.name == ("F32" if fmt == "gguf" else "BF16"), (quant, name)
                else:
                    assert tensor.encoding.name == encoding, (quant, name, tensor.encoding.name)
        assert bool(record.quantized) == (encoding != "BF16"), "BF16 -> BF16 is no quantization"
        assert (record.upcast != []) == (fmt == "gguf")


@needs_llama_cpp
def test_a_single_file_f16_checkpoint_runs_in_llama_cpp(synthetic_dir, tmp_path):
    source = synthetic_dir("qwen2-tiny", dtype="float16")
    assert (source / "model.safetensors").is_file()
    record = convert(source, tmp_path / "model.gguf")
    assert record.upcast and {src for _, src, _ in record.upcast} == {"F16"}
    run = run_prompts_isolated(tmp_path / "model.gguf", source, "llama.cpp", "cpu", 4, 2, tmp_path / "r.json",
                               tmp_path / "r.npz", timeout_s=300, engine_log=tmp_path / "r.log")
    assert run["error"] is None, run["error"]


def test_gates_treat_the_upcast_as_exact_and_the_bf16_norm_gguf_as_a_layout_failure(hub_checkpoint, converted):
    source, gguf = build_manifest(hub_checkpoint), build_manifest(converted["dir"] / "model.gguf")
    sidecar = {"record": converted["records"]["gguf"].as_dict()}
    contracts = {r.gate: r for r in contract_rows("st-gguf", {"manifest": gguf, "parent_manifest": source, "sidecar": sidecar,
                                                            "parent_chain": "st"}, "m", "native")}
    assert {g: r.status for g, r in contracts.items()} == {g: PASS for g in contracts}
    unrecorded = contract_rows("st-gguf", {"manifest": gguf, "parent_manifest": source, "sidecar": {"record": {}},
                                           "parent_chain": "st"}, "m", "native")
    assert next(r for r in unrecorded if r.gate == "F-CONTRACT-I3").status == FAIL, "an unrecorded upcast is a silent change"

    layout = {r.gate: r for r in artifact_rows(gguf, "st-gguf", "m", "native")}
    assert layout["F-LAYOUT-003"].status == PASS
    bad = {r.gate: r for r in artifact_rows(build_manifest(converted["dir"] / "bf16-norms.gguf"), "st-gguf", "m", "native")}
    assert bad["F-LAYOUT-003"].status == FAIL and bad["F-LAYOUT-003"].value == "11" and "k_proj.bias is BF16" in bad["F-LAYOUT-003"].reason
    assert bad["G0-INTEGRITY"].status == PASS, "the values are right: only the storage breaks llama.cpp"


def test_gguf_back_to_safetensors_is_bit_exact(hub_checkpoint, converted):
    with open_model(hub_checkpoint) as source, open_model(converted["dir"] / "model-back") as back:
        assert back.config == source.config
        assert back.tokenizer.fingerprint() == source.tokenizer.fingerprint()
        for name, tensor in source.tensors.items():
            assert np.array_equal(back.tensors[name].to_float32(), tensor.to_float32()), name


# ---------------------------------------------------------------- engines that cannot take the run down


def test_isolated_child_outcomes_name_the_signal(tmp_path):
    abort = run_isolated("os:abort", {}, timeout_s=60, stderr_path=tmp_path / "abort.log")
    assert not abort.ok and abort.signal == "SIGABRT" and "aborted" in abort.describe()
    segv = run_isolated("faulthandler:_sigsegv", {}, timeout_s=60, stderr_path=tmp_path / "segv.log")
    assert segv.signal == "SIGSEGV" and "segmentation fault" in segv.describe() and "Fatal Python error" in segv.stderr_tail
    hang = run_isolated("signal:pause", {}, timeout_s=2, stderr_path=tmp_path / "hang.log")
    assert hang.timed_out and "did not finish within 2 s" in hang.describe() and hang.wall_s < 30
    status = run_isolated("os:_exit", {}, args=[3], timeout_s=60, stderr_path=tmp_path / "exit.log")
    assert status.returncode == 3 and status.describe() == "exited with status 3"
    assert run_isolated("os:getpid", {}, timeout_s=60, stderr_path=tmp_path / "ok.log").ok


@needs_llama_cpp
def test_llama_cpp_abort_is_a_recorded_failure_and_the_correct_file_runs(hub_checkpoint, converted, tmp_path):
    bad = run_prompts_isolated(converted["dir"] / "bf16-norms.gguf", hub_checkpoint, "llama.cpp", "cpu", 4, 2,
                               tmp_path / "bad.json", tmp_path / "bad.npz", timeout_s=300, engine_log=tmp_path / "bad.log")
    assert "killed by SIGABRT" in bad["error"] and "binary_op: unsupported types" in bad["error"]
    assert bad["exit"]["signal"] == "SIGABRT" and load_run(tmp_path / "bad.json", tmp_path / "bad.npz")["logits"] == {}
    good = run_prompts_isolated(converted["dir"] / "model.gguf", hub_checkpoint, "llama.cpp", "cpu", 4, 2,
                                tmp_path / "good.json", tmp_path / "good.npz", timeout_s=300, engine_log=tmp_path / "good.log")
    assert good["error"] is None and all(p["generated_ids"] for p in good["prompts"] if p.get("ids"))
    assert load_run(tmp_path / "good.json", tmp_path / "good.npz")["logits"]


@needs_llama_cpp
def test_llama_cpp_server_dying_on_a_request_is_an_answer_error(hub_checkpoint, converted, tmp_path):
    from convqa.infer.prompts import DEFAULT_PROMPTS

    record = serve_prompts(converted["dir"] / "bf16-norms.gguf", hub_checkpoint, "llama.cpp", list(DEFAULT_PROMPTS)[:2], 4, 2,
                           log_path=tmp_path / "server.log")
    errors = [a["error"] for a in record["answers"] if a.get("error")] + ([record["error"]] if record["error"] else [])
    assert errors and any("SIGABRT" in e or "binary_op" in e for e in errors), record


# ---------------------------------------------------------------- non-finite logits never raise


def _run(logits: dict, ids=(1, 2, 3), generated=(4, 5)) -> dict:
    prompts = [{"prompt_id": p, "modality": "run", "ids": list(ids), "generated_ids": list(generated), "text": "ok text"}
               for p in logits]
    return {"prompts": prompts, "logits": logits, "skipped": None, "error": None}


def test_nan_candidate_fails_and_nan_reference_is_not_evaluated():
    good = np.linspace(-3, 3, 3 * 8, dtype=np.float32).reshape(3, 8)
    nan = good.copy()
    nan[1, 2] = np.nan
    tolerance = {"max_abs_dlogit": 0, "reason": "exact"}
    from convqa.gates.rows import GateRow

    failed = judge(GateRow("F-INF-gguf-cpu-run", "s"), compare_runs(_run({"p": good}), _run({"p": nan})), tolerance)
    assert failed.status == FAIL and "candidate logits hold NaN or Inf (1 of 3 positions)" in failed.reason
    broken = judge(GateRow("F-INF-gguf-cpu-run", "s"), compare_runs(_run({"p": nan}), _run({"p": good})), tolerance)
    assert broken.status == NOT_EVALUATED and "reference run is itself broken" in broken.reason
    shape = judge(GateRow("F-INF-gguf-cpu-run", "s"), compare_runs(_run({"p": good}), _run({"p": good[:, :4]})), tolerance)
    assert shape.status == FAIL and "the reference's are [3, 8]" in shape.reason


def test_a_broken_ground_truth_gives_rows_not_an_exception():
    good = np.zeros((3, 8), dtype=np.float32) + np.arange(8, dtype=np.float32)
    nan = np.full((3, 8), np.nan, dtype=np.float32)
    tolerances = {"transformers": {"max_abs_dlogit": 0, "reason": "x"}, "llama.cpp": {"max_rel_dlogit": 1e-4, "reason": "y"}}
    runs = {("st", "transformers", "cpu"): _run({"p": nan}), ("st-gguf", "transformers", "cpu"): _run({"p": nan}),
            ("st-gguf", "llama.cpp", "cpu"): _run({"p": good})}
    rows, _, _ = evaluate("m", "native", runs, {}, tolerances, ("run",))
    by = {(r.gate, r.subject): r for r in rows}
    assert by[("F-INF-gguf-cpu-run", "native/st-gguf/llama.cpp")].status == NOT_EVALUATED
    engine = by[("F-ENGINE-001", "native/st-gguf/llama.cpp")]
    assert engine.status == NOT_EVALUATED and "reference run is itself broken" in engine.reason
    crashed = {**runs, ("st", "transformers", "cpu"): {"prompts": [], "logits": {}, "skipped": None,
                                                        "error": "transformers process killed by SIGKILL (signal 9)"}}
    rows, _, _ = evaluate("m", "native", crashed, {}, tolerances, ("run",))
    assert all(r.status == NOT_EVALUATED and "ground truth run failed" in r.reason for r in rows if r.gate.startswith("F-INF"))
    # llama.cpp against a transformers run that crashed on the same file: the crash is its own row's.
    crashed_torch = {**runs, ("st-gguf", "transformers", "cpu"): crashed[("st", "transformers", "cpu")]}
    assert engine_rows("m", "native", crashed_torch, tolerances)[0].status == NOT_EVALUATED


def test_a_damaged_logits_file_is_the_runs_error(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(_run({}) | {"logits": None}))
    (tmp_path / "run.npz").write_bytes(b"PK\x03\x04 not really a zip")
    record = load_run(tmp_path / "run.json", tmp_path / "run.npz")
    assert "unreadable" in record["error"] and record["logits"] == {}
    (tmp_path / "cut.json").write_text('{"prompts": [')
    assert "run record" in load_run(tmp_path / "cut.json", tmp_path / "run.npz")["error"]


def test_native_on_a_bf16_source_picks_the_bf16_tolerances():
    configured = {"native": {"transformers": {"max_abs_dlogit": 0, "reason": "exact"}, "llama.cpp": {"max_rel_dlogit": 1e-4, "reason": "f32"}},
                  "native@bf16": {"llama.cpp": {"max_mean_kl": 2e-3, "reason": "bf16 activations"}}}
    bf16 = {"tensors": [{"shape": [8, 8], "encoding": "BF16"}, {"shape": [8], "encoding": "BF16"}]}
    f32 = {"tensors": [{"shape": [8, 8], "encoding": "F32"}]}
    key, tol = select_tolerances("native", configured, bf16)
    assert key == "native@bf16" and tol["llama.cpp"]["max_mean_kl"] == 2e-3 and tol["transformers"]["max_abs_dlogit"] == 0
    assert select_tolerances("native", configured, f32) == ("native", configured["native"])
    assert select_tolerances("q8_0", configured, bf16) == ("q8_0", {})


# ---------------------------------------------------------------- through the workflow


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Workflow:
    convqa = "convqa convert {input} {output} --to {format} {quant_arg} --json"
    config = {
        "tier": "smoke",
        "variants": ["native"],
        # cpu only (gpu cells are skipped without a device anyway) and llama.cpp's server only: what
        # these tests look at, in a third of the jobs.
        "inference": {"backends": ["cpu"], "max_new_tokens": 8, "serve": {"smoke": ["st-gguf:llama.cpp"]}},
        "converters": {
            "convqa": {"command": convqa, "json_record": True},
            "nan": {"command": convqa.replace(" --json", " --mutant nan-weight"), "edges": ["st-gguf"]},
            "bf16-norms": {"command": convqa.replace(" --json", " --mutant bf16-norms-in-gguf"), "edges": ["st-gguf"]},
        },
        "models": {
            "hub-shape": {"source": {"kind": "synthetic", "preset": PRESET}, "variants": ["native", "q8_0"]},
            "nan-gguf": {"source": {"kind": "synthetic", "preset": "qwen2-tiny"}, "route": {"st-gguf": ["nan"]}},
            "abort-gguf": {"source": {"kind": "synthetic", "preset": PRESET}, "route": {"st-gguf": ["bf16-norms"]}},
        },
    }
    wf = Workflow.create(tmp_path_factory.mktemp("real"), config)
    proc = wf.run("smoke")
    assert proc.returncode == 0
    return wf


def _rows(wf: Workflow, model: str, variant: str = "native") -> dict:
    rows = wf.rows(f"results/{model}/{variant}/gates/smoke/tensor.tsv") + wf.rows(f"results/{model}/{variant}/gates/smoke/inference.tsv")
    return {(r["gate"], r["subject"]): r for r in rows}


def _verdict(wf: Workflow, model: str) -> str:
    return json.loads(wf.path(f"results/{model}/report/smoke/qualification.json").read_text())["summary"]["verdict"]


@pytest.mark.slow
@needs_llama_cpp
def test_the_hub_shaped_bf16_checkpoint_qualifies_with_llama_cpp(workflow):
    assert _verdict(workflow, "hub-shape") == "QUALIFIED"
    for variant in ("native", "q8_0"):
        rows = _rows(workflow, "hub-shape", variant)
        assert not [r for r in rows.values() if r["status"] in (FAIL, NOT_EVALUATED)]
        llama = rows[("F-INF-gguf-cpu-run", f"{variant}/st-gguf/llama.cpp")]
        assert llama["status"] == PASS and llama["metric"]
    assert _rows(workflow, "hub-shape")[("F-LAYOUT-003", "native/st-gguf")]["status"] == PASS
    log = workflow.path("results/hub-shape/native/gates/smoke/inference.log").read_text()
    assert "inference.tolerances.native@bf16" in log
    sidecar = json.loads(workflow.path("results/hub-shape/native/st-gguf/sidecar.json").read_text())
    assert sidecar["record"]["upcast"] and all(src == "BF16" for _, src, _ in sidecar["record"]["upcast"])


@pytest.mark.slow
@needs_llama_cpp
def test_a_gguf_with_a_nan_weight_ends_in_a_not_qualified_report(workflow):
    assert _verdict(workflow, "nan-gguf") == "NOT QUALIFIED"
    rows = _rows(workflow, "nan-gguf")
    validate = rows[("G0-VALIDATE", "native/st-gguf")]
    assert validate["status"] == FAIL and f"{NAN_WEIGHT}: 1 NaN" in validate["reason"]
    for engine in ("llama.cpp", "transformers"):
        row = rows[("F-INF-gguf-cpu-run", f"native/st-gguf/{engine}")]
        assert row["status"] == FAIL and "NaN" in row["reason"], row
    assert rows[("F-ENGINE-001", "native/st-gguf/llama.cpp")]["status"] in (FAIL, NOT_EVALUATED)
    assert rows[("F-CONV-S-A", "native/st-apr")]["status"] == PASS, "the other edge is judged on its own"
    assert workflow.path("results/nan-gguf/report/smoke/report.html").stat().st_size > 0


@pytest.mark.slow
@needs_llama_cpp
def test_a_gguf_llama_cpp_aborts_on_ends_in_a_not_qualified_report(workflow):
    assert _verdict(workflow, "abort-gguf") == "NOT QUALIFIED"
    rows = _rows(workflow, "abort-gguf")
    assert rows[("F-LAYOUT-003", "native/st-gguf")]["status"] == FAIL
    for modality in ("run", "chat"):
        row = rows[(f"F-INF-gguf-cpu-{modality}", "native/st-gguf/llama.cpp")]
        assert row["status"] == FAIL and "killed by SIGABRT" in row["reason"] and "binary_op" in row["reason"]
        assert rows[(f"F-INF-gguf-cpu-{modality}", "native/st-gguf/transformers")]["status"] == PASS
    serve = rows[("F-SERVE-001", "native/st-gguf/llama.cpp")]
    assert serve["status"] == FAIL, serve
    engine_log = workflow.path("results/abort-gguf/native/st-gguf/infer/llamacpp-cpu.engine.log").read_text()
    assert "binary_op: unsupported types" in engine_log
