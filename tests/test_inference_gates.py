"""Inference gates on real tiny models: a correct conversion passes, known-bad converters fail
the matching gates with values that show why, an absent capability is `skipped` with the reason.

Runs are real (transformers and llama.cpp on 2 threads); each tiny model answers in well under
a second, so the whole file stays fast.
"""

from __future__ import annotations

import json

import pytest

from convqa.convert.builtin import convert
from convqa.gates.rows import FAIL, NOT_EVALUATED, PASS, SKIPPED
from convqa.gates.inference import evaluate
from convqa.infer.run import HIDDEN_PREFIX, load_run, run_prompts, serve_prompts, write_run
from convqa.infer.prompts import DEFAULT_PROMPTS, NO_CHAT_TEMPLATE

PROMPTS = list(DEFAULT_PROMPTS)
MAX_NEW_TOKENS = 8
TOLERANCES = {
    "native": {
        "transformers": {"max_abs_dlogit": 0, "greedy_equal": True, "reason": "lossless"},
        "llama.cpp": {"max_rel_dlogit": 1e-4, "reason": "F32 kernels"},
    },
    "q8_0": {
        "transformers": {"max_mean_kl": 0.02, "min_top1": 0.9, "reason": "q8_0 noise"},
        "llama.cpp": {"max_mean_kl": 0.02, "min_top1": 0.9, "reason": "q8_0 noise"},
    },
}


def run(artifact, source, engine="transformers", backend="cpu"):
    record, logits = run_prompts(artifact, source, engine, backend, PROMPTS, MAX_NEW_TOKENS, 2)
    record["logits"] = logits
    return record


@pytest.fixture(scope="module")
def qwen2(synthetic_dir):
    source = synthetic_dir("qwen2-tiny")
    return source, run(source, source)


def gate_rows(source, ground_truth, artifact, chain, variant="native", engines=("transformers",), serves=None):
    runs = {("st", "transformers", "cpu"): ground_truth}
    for engine in engines:
        runs[(chain, engine, "cpu")] = run(artifact, source, engine)
    rows, throughput, details = evaluate("m", variant, runs, serves or {}, TOLERANCES[variant])
    return {(r.gate, r.subject.rsplit("/", 1)[-1]): r for r in rows}, throughput, details


def converted(source, tmp_path, fmt, **options):
    out = tmp_path / f"model.{fmt}"
    convert(source, out, fmt, **options)
    return out


def test_correct_conversions_pass_bit_exact_under_transformers(qwen2, tmp_path):
    source, truth = qwen2
    for fmt in ("gguf", "apr"):
        rows, throughput, details = gate_rows(source, truth, converted(source, tmp_path, fmt), f"st-{fmt}")
        for modality in ("run", "chat"):
            row = rows[(f"F-INF-{fmt}-cpu-{modality}", "transformers")]
            assert row.status == PASS, row
            assert row.value == "0" and row.threshold == "<= 0"
        assert throughput[0]["prefill_tps"] > 0
        (prompts,) = details.values()
        assert all(p["max_abs_dlogit"] == 0 and p["kl_per_position"] for p in prompts)


def test_llamacpp_on_f32_gguf_is_within_relative_tolerance_and_agrees_with_transformers(qwen2, tmp_path):
    source, truth = qwen2
    gguf = converted(source, tmp_path, "gguf")
    rows, _, _ = gate_rows(source, truth, gguf, "st-gguf", engines=("transformers", "llama.cpp"))
    row = rows[("F-INF-gguf-cpu-run", "llama.cpp")]
    assert row.status == PASS and float(row.value) < 1e-5, row
    assert rows[("F-ENGINE-001", "llama.cpp")].status == PASS


def test_q8_0_passes_the_kl_tolerance_but_is_not_bit_exact(qwen2, tmp_path):
    source, truth = qwen2
    rows, _, _ = gate_rows(source, truth, converted(source, tmp_path, "gguf", quant="q8_0"), "st-gguf", "q8_0")
    row = rows[("F-INF-gguf-cpu-run", "transformers")]
    assert row.status == PASS, row
    mean_kl, top1 = (float(v) for v in row.value.split("; "))
    assert 0 < mean_kl < 0.02 and top1 >= 0.9


@pytest.mark.parametrize("fmt", ["gguf", "apr"])
@pytest.mark.parametrize("mutant", ["transpose-2d", "lose-rope-theta", "drop-qkv-bias"])
def test_mutants_fail_the_run_and_chat_gates(qwen2, tmp_path, mutant, fmt):
    source, truth = qwen2
    artifact = converted(source, tmp_path, fmt, mutant=mutant)
    rows, _, _ = gate_rows(source, truth, artifact, f"st-{fmt}")
    for modality in ("run", "chat"):
        row = rows[(f"F-INF-{fmt}-cpu-{modality}", "transformers")]
        assert row.status == FAIL, row
        # Either the loader refused the broken file, or the logits moved: both say why.
        assert "could not load" in row.reason or (float(row.value) > 0 and "max |dlogit|" in row.reason), row
    if mutant == "lose-rope-theta":  # a subtle bug: small logit shifts, still far beyond bit-exact
        assert 0 < float(rows[("F-INF-gguf-cpu-run" if fmt == "gguf" else "F-INF-apr-cpu-run", "transformers")].value) < 0.1


def test_dropped_chat_template_fails_only_the_chat_gate(qwen2, tmp_path):
    source, truth = qwen2
    rows, _, _ = gate_rows(source, truth, converted(source, tmp_path, "apr", mutant="drop-chat-template"), "st-apr")
    assert rows[("F-INF-apr-cpu-run", "transformers")].status == PASS
    chat = rows[("F-INF-apr-cpu-chat", "transformers")]
    assert chat.status == FAIL and NO_CHAT_TEMPLATE in chat.reason


def test_missing_gpu_is_skipped_with_the_reason_and_loads_nothing(qwen2, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    source, truth = qwen2
    record, logits = run_prompts(tmp_path / "does-not-exist.gguf", source, "transformers", "gpu", PROMPTS, 4, 2)
    assert record["skipped"] == "no CUDA device" and logits == {}
    write_run(record, logits, tmp_path / "r.json", tmp_path / "r.npz")
    loaded = load_run(tmp_path / "r.json", tmp_path / "r.npz")
    runs = {("st", "transformers", "cpu"): truth, ("st-gguf", "transformers", "gpu"): loaded}
    rows, _, _ = evaluate("m", "native", runs, {}, TOLERANCES["native"])
    inference = [r for r in rows if r.gate.startswith("F-INF-")]
    assert [r.gate for r in inference] == ["F-INF-gguf-gpu-run", "F-INF-gguf-gpu-chat"]
    assert all(r.status == SKIPPED and r.reason == "no CUDA device" for r in inference)
    # Without a cpu run of both engines, engine agreement is not evaluated (never a vacuous pass).
    (engine,) = [r for r in rows if r.gate == "F-ENGINE-001"]
    assert engine.status == NOT_EVALUATED


def test_unconfigured_variant_is_not_evaluated(qwen2, tmp_path):
    source, truth = qwen2
    runs = {("st", "transformers", "cpu"): truth, ("st-apr", "transformers", "cpu"): run(converted(source, tmp_path, "apr"), source)}
    rows, _, _ = evaluate("m", "f16", runs, {}, {})
    assert {r.status for r in rows} == {NOT_EVALUATED}


def test_saved_runs_round_trip(qwen2, tmp_path):
    source, truth = qwen2
    logits = truth["logits"]
    record = {k: v for k, v in truth.items() if k != "logits"}
    write_run(record, logits, tmp_path / "r.json", tmp_path / "r.npz")
    loaded = load_run(tmp_path / "r.json", tmp_path / "r.npz")
    assert json.loads((tmp_path / "r.json").read_text())["prompts"][0]["ids"] == truth["prompts"][0]["ids"]
    # run_prompts' arrays are the logits by prompt id plus the hidden-state capture, which
    # load_run keeps apart (record["hidden"]).
    hidden = {k[len(HIDDEN_PREFIX):]: v for k, v in logits.items() if k.startswith(HIDDEN_PREFIX)}
    assert hidden and set(loaded["hidden"]) == set(hidden)
    assert all((loaded["hidden"][k] == v).all() for k, v in hidden.items())
    assert all((loaded["logits"][k] == v).all() for k, v in logits.items() if not k.startswith(HIDDEN_PREFIX))


def test_served_answers_equal_the_run_and_a_server_that_differs_fails(qwen2, tmp_path):
    source, truth = qwen2
    gguf = converted(source, tmp_path, "gguf")
    runs = {("st", "transformers", "cpu"): truth, ("st-gguf", "transformers", "cpu"): run(gguf, source),
            ("st-gguf", "llama.cpp", "cpu"): run(gguf, source, "llama.cpp")}
    serves = {(chain, engine): serve_prompts(gguf, source, engine, PROMPTS, MAX_NEW_TOKENS, 2)
              for chain, engine in [("st-gguf", "transformers"), ("st-gguf", "llama.cpp")]}
    rows, _, _ = evaluate("m", "native", runs, serves, TOLERANCES["native"])
    serve = {r.subject: r for r in rows if r.gate == "F-SERVE-001"}
    assert serve["native/st-gguf/transformers"].status == PASS, serve
    assert serve["native/st-gguf/llama.cpp"].status == PASS, serve
    # A server answering other ids is caught token for token.
    served = serves[("st-gguf", "transformers")]
    served["answers"][0]["token_ids"] = list(served["answers"][0]["token_ids"])[:-1] + [0]
    rows, _, _ = evaluate("m", "native", runs, serves, TOLERANCES["native"])
    row = next(r for r in rows if r.gate == "F-SERVE-001" and r.subject.endswith("transformers"))
    assert row.status == FAIL and row.value == "1" and "ids differ" in row.reason


def test_p99_and_top5_limits_fail_where_the_mean_and_top1_pass(qwen2, tmp_path):
    """A mean KL within tolerance does not pass a run whose p99 is out of it (the worst few
    positions), nor a top-1 within tolerance one whose top-5 is not."""
    from convqa.gates.inference import compare_runs, judge
    from convqa.gates.rows import GateRow

    source, truth = qwen2
    candidate = {**truth, "logits": dict(truth["logits"])}
    prompt = PROMPTS[0].id
    positions = sum(len(p["ids"]) for p in truth["prompts"] if p["modality"] == "run" and p["ids"])
    bad = max(2, -(-3 * positions // 100))  # 3% of the positions: above the 99th percentile's reach
    damaged = truth["logits"][prompt].copy()
    assert bad < len(damaged)
    damaged[-bad:] = damaged[-bad:, ::-1]  # those positions' distributions reversed, the others exact
    candidate["logits"][prompt] = damaged
    comparison = compare_runs(truth, candidate, "run")
    aggregate = comparison["aggregate"]
    assert aggregate["p99_kl"] > 10 * aggregate["mean_kl"] > 0 and aggregate["median_kl"] == 0.0
    loose_mean = {"max_mean_kl": aggregate["mean_kl"] * 1.01, "min_top1": 0.5, "reason": "r"}
    assert judge(GateRow("F-INF-gguf-cpu-run", "s"), comparison, loose_mean).status == PASS
    with_p99 = {**loose_mean, "max_p99_kl": aggregate["p99_kl"] / 2}
    row = judge(GateRow("F-INF-gguf-cpu-run", "s"), comparison, with_p99)
    assert row.status == FAIL and "p99 KL" in row.reason and "p99 KL" in row.metric
    with_top5 = {**loose_mean, "min_top5": 1.0}
    row = judge(GateRow("F-INF-gguf-cpu-run", "s"), comparison, with_top5)
    assert aggregate["top5_agreement"] < 1.0 and row.status == FAIL and "top-5 agreement" in row.reason


def test_chat_rows_are_skipped_when_neither_side_has_a_chat_template(qwen2, tmp_path):
    """A base model (Gemma-3-270M) has no chat template: nothing to render on either side is an
    absent capability, not a gap that blocks QUALIFIED."""
    import shutil

    from convqa.gates.inference import NO_TEMPLATES

    source = tmp_path / "base"
    shutil.copytree(qwen2[0], source)
    (source / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    rows, _, _ = gate_rows(source, run(source, source), converted(source, tmp_path, "apr"), "st-apr")
    assert rows[("F-INF-apr-cpu-run", "transformers")].status == PASS
    chat = rows[("F-INF-apr-cpu-chat", "transformers")]
    assert chat.status == SKIPPED and chat.reason == NO_TEMPLATES


# Served vs run answers recorded from real llama.cpp runs of the phi3, qwen3 and mistral tiny
# presets (byte-level vocabularies emitting lone UTF-8 lead bytes): llama-cpp-python's server kept
# generating past max_tokens to complete a character, so its answer is the run's, continued.
@pytest.mark.parametrize("served, run", [
    ("le4et helpyK npHel\u06b7\u0391", "le4\ufffd\ufffd\ufffd\ufffdet hel\ufffdpyK\ufffd npHel\u06b7\ufffd"),
    (" cou cou capit cou capit cou capit cou\x0b\uae2d", " cou\ufffd cou capit\ufffd cou capit\ufffd cou capit\ufffd c"),
    ("umbou ccouameHELazumcouameHELazumumum a", "umbou ccouameHELazumcouameHELazum\ufffdum\ufffd"),
    ("plain answer", "plain answer"),
])
def test_a_served_answer_continued_past_an_unfinished_character_matches(served, run):
    from convqa.gates.inference import served_text_matches

    assert served_text_matches(served, run)


@pytest.mark.parametrize("served, run", [
    ("plain answer and more", "plain answer"),  # the run ended on a whole character: no continuation
    ("other text", "le4\ufffd\ufffdet"),
    ("umbou ccouameHELazumcouameHELaz", "umbou ccouameHELazumcouameHELazum\ufffdum\ufffd"),  # shorter
    ("", "an answer"),
])
def test_a_served_answer_that_differs_from_the_run_does_not_match(served, run):
    from convqa.gates.inference import served_text_matches

    assert not served_text_matches(served, run)
