"""The inference gates, decided from recorded runs (convqa.infer.run): pure functions, no engines.

- F-INF-{fmt}-{backend}-{modality}: one artifact under one engine and backend, against the ground
  truth on the same backend (transformers over the SafeTensors source; convqa.workflow.references
  says why never across backends): teacher-forced logits (max |dlogit|,
  relative |dlogit|, KL, top-1) within the tolerance configured for (variant, engine), greedy
  continuation compared token by token, output non-empty and not garbage.
- F-INF-REF-{fmt}-{backend}-{modality}: one artifact of a lossy variant under one engine, against
  the reference-quantized model of its chain's first hop run on the same backend (convqa.infer.reference_model): where F-INF
  can only bound the loss, this one holds the encoding itself to the reference quantizer's values
  (a correct artifact is bit-identical under transformers).
- F-ENGINE-001: llama.cpp and transformers on the same GGUF file.
- F-SERVE-001: the HTTP answers equal the `run` answers (ids for transformers, text for llama.cpp,
  whose server tokenizes the prompt text itself).

A tolerance is a dict of limits, any of: max_abs_dlogit, max_rel_dlogit, max_mean_kl, max_p99_kl
(the KL's 99th percentile over all positions), min_top1, min_top5, greedy_equal, plus the `reason`
for the values; the aggregate carries every logit statistic whichever limits apply. Garbage
output fails only where the ground truth itself is not garbage: a random-weight test model
babbles under every engine, and that is no conversion's fault. A failing transformers row on cpu
names its first divergent layer (convqa.gates.divergence).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from convqa.formats import no_artifact
from convqa.compare.inference import compare_greedy, compare_logits, detect_garbage, kl_statistics
from convqa.gates.divergence import annotate_divergence
from convqa.gates.rows import FAIL, NOT_EVALUATED, PASS, SKIPPED, GateRow, label
from convqa.workflow.plan import hops
from convqa.workflow.references import ground_truth, inference_reference, quantized_reference
from convqa.infer.prompts import CHAT, NO_CHAT_TEMPLATE, RUN

REPLACEMENT_CHARACTER = "\ufffd"
# Limit name -> (metric name, aggregate key, True when the value must stay at or below the limit).
LIMITS = {
    "max_abs_dlogit": ("max |dlogit|", "max_abs_dlogit", True),
    "max_rel_dlogit": ("max |dlogit| / max |logit|", "max_rel_dlogit", True),
    "max_mean_kl": ("mean KL", "mean_kl", True),
    "max_p99_kl": ("p99 KL", "p99_kl", True),
    "min_top1": ("top-1 agreement", "top1_agreement", False),
    "min_top5": ("top-5 agreement", "top5_agreement", False),
}
# (format, backend, modality) -> gate: the backends and modalities config/schema.yaml allows.
INFERENCE_GATES = {
    ("st", "cpu", RUN): "F-INF-st-cpu-run",
    ("st", "cpu", CHAT): "F-INF-st-cpu-chat",
    ("st", "gpu", RUN): "F-INF-st-gpu-run",
    ("st", "gpu", CHAT): "F-INF-st-gpu-chat",
    ("gguf", "cpu", RUN): "F-INF-gguf-cpu-run",
    ("gguf", "cpu", CHAT): "F-INF-gguf-cpu-chat",
    ("gguf", "gpu", RUN): "F-INF-gguf-gpu-run",
    ("gguf", "gpu", CHAT): "F-INF-gguf-gpu-chat",
    ("apr", "cpu", RUN): "F-INF-apr-cpu-run",
    ("apr", "cpu", CHAT): "F-INF-apr-cpu-chat",
    ("apr", "gpu", RUN): "F-INF-apr-gpu-run",
    ("apr", "gpu", CHAT): "F-INF-apr-gpu-chat",
}
# (format, backend, modality) -> gate: the reference model runs on the artifact's backend.
REFERENCE_GATES = {
    ("st", "cpu", RUN): "F-INF-REF-st-cpu-run",
    ("st", "cpu", CHAT): "F-INF-REF-st-cpu-chat",
    ("st", "gpu", RUN): "F-INF-REF-st-gpu-run",
    ("st", "gpu", CHAT): "F-INF-REF-st-gpu-chat",
    ("gguf", "cpu", RUN): "F-INF-REF-gguf-cpu-run",
    ("gguf", "cpu", CHAT): "F-INF-REF-gguf-cpu-chat",
    ("gguf", "gpu", RUN): "F-INF-REF-gguf-gpu-run",
    ("gguf", "gpu", CHAT): "F-INF-REF-gguf-gpu-chat",
    ("apr", "cpu", RUN): "F-INF-REF-apr-cpu-run",
    ("apr", "cpu", CHAT): "F-INF-REF-apr-cpu-chat",
    ("apr", "gpu", RUN): "F-INF-REF-apr-gpu-run",
    ("apr", "gpu", CHAT): "F-INF-REF-apr-gpu-chat",
}
ENGINE_GATE = "F-ENGINE-001"
SERVE_GATE = "F-SERVE-001"


def fmt_of(chain: str) -> str:
    """st | gguf | apr: the format of the chain's last hop."""
    return hops(chain)[-1]


def subject_of(variant: str, chain: str, engine: str) -> str:
    return f"{label(variant, chain)}/{engine}"


def _g(x) -> str:
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return "inf" if np.isinf(x) else f"{x:.6g}"
    return str(x)


def _by_prompt(record: dict, modality: str | None = None) -> dict[str, dict]:
    return {p["prompt_id"]: p for p in record.get("prompts", []) if modality is None or p["modality"] == modality}


# ---------------------------------------------------------------- which tolerances apply


def weight_encoding(manifest: dict | None) -> str | None:
    """The encoding most of a model's 2-D weights are stored in (BF16 for a typical Hub checkpoint)."""
    counts = Counter(t["encoding"] for t in (manifest or {}).get("tensors", []) if len(t.get("shape", ())) == 2)
    return counts.most_common(1)[0][0] if counts else None


def select_tolerances(variant: str, configured: dict, source_manifest: dict | None) -> tuple[str, dict]:
    """(config key, engine -> tolerance) for a variant of a model whose source is `source_manifest`.

    `native` keeps the source's dtypes, and an engine's own error depends on them: llama.cpp
    multiplies BF16 (F16) weights with activations rounded to BF16 (F16), so on a BF16 source it
    cannot reproduce the ground truth to F32 precision while transformers (which holds every
    artifact in the ground truth's dtype and computes in float32, convqa.infer.weights_dtype)
    still must, bit for bit. `native@bf16` / `native@f16`, when configured, hold the engines for such a source; any engine they leave out falls back
    to `native`'s.
    """
    base = dict(configured.get(variant) or {})
    encoding = weight_encoding(source_manifest)
    key = f"{variant}@{encoding.lower()}" if encoding else None
    if variant == "native" and key in configured:
        return key, {**base, **configured[key]}
    # An architecture whose own ops llama.cpp computes less exactly (gemma's GELU: an F16 table)
    # has `native@<architecture>` (convqa.arch.registry name), the same way.
    architecture = ((source_manifest or {}).get("config") or {}).get("architecture")
    key = f"{variant}@{architecture}" if architecture else None
    if variant == "native" and key in configured:
        return key, {**base, **configured[key]}
    return variant, base


# ---------------------------------------------------------------- comparing one run against another


def compare_runs(reference: dict, candidate: dict, modality: str | None = None) -> dict:
    """Per-prompt and aggregate parity of `candidate` against `reference` (loaded run records).

    Returns {"prompts": [...], "aggregate": {...} or None, "problems": [...], "reference_problems":
    [...]}. A prompt the candidate could not render (or that renders to other ids), or whose
    logits are missing, misshapen or non-finite, is a problem (the candidate fails). A prompt
    whose reference logits are missing or non-finite is a reference problem: nothing can be
    judged against a broken reference, so it is left out, never counted as a pass or a fail.
    """
    refs, cands = _by_prompt(reference, modality), _by_prompt(candidate, modality)
    prompts, problems, reference_problems = [], [], []
    abs_d, rel_d, kls, agree, agree5, positions = [], [], [], 0, 0, 0
    for prompt_id, ref in refs.items():
        cand = cands.get(prompt_id)
        if ref.get("ids") is None:
            continue  # the ground truth cannot render it either (source without a chat template)
        if cand is None or cand.get("ids") is None:
            why = (cand or {}).get("error") or "prompt missing from the run"
            problems.append(f"{prompt_id}: {why}")
            prompts.append({"prompt_id": prompt_id, "modality": ref["modality"], "error": why})
            continue
        if list(cand["ids"]) != list(ref["ids"]):
            first = compare_greedy(ref["ids"], cand["ids"]).first_divergence
            why = f"prompt renders to other ids than the ground truth's (first difference at position {first})"
            problems.append(f"{prompt_id}: {why}")
            prompts.append({"prompt_id": prompt_id, "modality": ref["modality"], "error": why})
            continue
        ref_logits = reference.get("logits", {}).get(prompt_id)
        cand_logits = candidate.get("logits", {}).get(prompt_id)
        why_reference = _unusable_logits(ref_logits)
        if why_reference:
            reference_problems.append(f"{prompt_id}: reference {why_reference}")
            continue
        why = _unusable_logits(cand_logits, ref_logits.shape)
        if why:
            problems.append(f"{prompt_id}: {why}")
            prompts.append({"prompt_id": prompt_id, "modality": ref["modality"], "error": why})
            continue
        logits = compare_logits(ref_logits, cand_logits)
        if not logits.all_finite:
            bad = int((~np.isfinite(np.asarray(cand_logits))).any(axis=-1).sum())
            problems.append(f"{prompt_id}: candidate logits hold NaN or Inf ({bad} of {logits.n_positions} positions)")
        greedy = compare_greedy(ref["generated_ids"], cand["generated_ids"])
        garbage = detect_garbage(cand["generated_ids"], cand.get("text"))
        ref_garbage = detect_garbage(ref["generated_ids"], ref.get("text"))
        if garbage.is_garbage and not ref_garbage.is_garbage:
            problems.append(f"{prompt_id}: garbage output ({'; '.join(garbage.reasons)})")
        abs_d.append(logits.max_abs_dlogit)
        rel_d.append(logits.max_rel_dlogit)
        kls.extend(logits.kl_per_position)
        agree += round(logits.top1_agreement * logits.n_positions)
        agree5 += round(logits.top5_agreement * logits.n_positions)
        positions += logits.n_positions
        prompts.append({
            "prompt_id": prompt_id,
            "modality": ref["modality"],
            "n_prompt_tokens": len(ref["ids"]),
            "max_abs_dlogit": logits.max_abs_dlogit,
            "max_rel_dlogit": logits.max_rel_dlogit,
            "mean_kl": logits.mean_kl,
            "median_kl": logits.median_kl,
            "p99_kl": logits.p99_kl,
            "max_kl": logits.max_kl,
            "top1_agreement": logits.top1_agreement,
            "top5_agreement": logits.top5_agreement,
            "greedy_equal": greedy.ids_equal,
            "first_divergence": greedy.first_divergence,
            "garbage": "; ".join(garbage.reasons),
            "reference_garbage": "; ".join(ref_garbage.reasons),
            "text": cand.get("text", ""),
            "reference_text": ref.get("text", ""),
            "kl_per_position": logits.kl_per_position,
        })
    aggregate = None
    if positions:
        aggregate = {
            "prompts_compared": len(abs_d),
            "max_abs_dlogit": max(abs_d),
            "max_rel_dlogit": max(rel_d),
            **kl_statistics(kls),  # pooled over every compared position of every prompt
            "top1_agreement": agree / positions,
            "top5_agreement": agree5 / positions,
            "greedy_equal": all(p.get("greedy_equal") for p in prompts if "greedy_equal" in p),
        }
    return {"prompts": prompts, "aggregate": aggregate, "problems": problems, "reference_problems": reference_problems}


def _unusable_logits(logits, reference_shape=None) -> str:
    """Why a prompt's logits cannot be compared ('' when they can; non-finite candidate logits
    can: they compare as infinitely far). Without `reference_shape` this judges a reference,
    which must be finite."""
    if logits is None:
        return "logits missing from the run"
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.size == 0:
        return f"logits of shape {list(logits.shape)}, expected (positions, vocab)"
    if reference_shape is None:
        return "" if np.isfinite(logits).all() else "logits hold NaN or Inf"
    if tuple(logits.shape) != tuple(reference_shape):
        return f"logits of shape {list(logits.shape)}, the reference's are {list(reference_shape)}"
    return ""


def judge(row: GateRow, comparison: dict, tolerance: dict | None) -> GateRow:
    """Fill `row` from a compare_runs result and a tolerance: metric/value/threshold, status, reason."""
    aggregate, problems = comparison["aggregate"], list(comparison["problems"])
    if tolerance is None:
        row.status, row.reason = NOT_EVALUATED, "no tolerance configured for this variant and engine"
        return row
    limits = [key for key in LIMITS if key in tolerance]
    row.metric = "; ".join(LIMITS[key][0] for key in limits)
    row.threshold = "; ".join(("<= " if LIMITS[key][2] else ">= ") + _g(float(tolerance[key])) for key in limits)
    reference_problems = comparison.get("reference_problems") or []
    if aggregate is None:
        if problems:  # the artifact could not even be asked: that is a failure, with the reason
            row.status, row.reason = FAIL, "; ".join(problems[:3])
        elif reference_problems:
            row.status = NOT_EVALUATED
            row.reason = "the reference run is itself broken: " + "; ".join(reference_problems[:3])
        else:
            row.status, row.reason = NOT_EVALUATED, "no prompt of this modality could be compared"
        row.details = json.dumps({"problems": problems, "reference_problems": reference_problems})
        return row
    row.value = "; ".join(_g(aggregate[LIMITS[key][1]]) for key in limits)
    for key in limits:
        name, field, at_most = LIMITS[key]
        value, limit = aggregate[field], float(tolerance[key])
        within = value <= limit if at_most else value >= limit  # NaN fails both ways
        if not within:
            problems.append(f"{name} {_g(value)} {'>' if at_most else '<'} {_g(limit)}")
    if tolerance.get("greedy_equal") and not aggregate["greedy_equal"]:
        diverged = [f"{p['prompt_id']}@{p['first_divergence']}" for p in comparison["prompts"]
                    if p.get("greedy_equal") is False]
        problems.append(f"greedy generation diverges ({', '.join(diverged)})")
    row.status = FAIL if problems else PASS
    row.reason = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    if not problems:
        row.reason = tolerance.get("reason", "")
    if not problems and reference_problems:  # a pass on the prompts a broken reference left is no pass
        row.status = NOT_EVALUATED
        row.reason = f"the reference run is broken for {len(reference_problems)} prompt(s): " + "; ".join(reference_problems[:2])
    row.details = json.dumps({"aggregate": aggregate, "problems": problems, "reference_problems": reference_problems,
                              "tolerance": tolerance})
    return row


# ---------------------------------------------------------------- the gate rows


def inference_rows(model: str, variant: str, runs: dict, tolerances: dict, modalities=(RUN, CHAT)) -> list[GateRow]:
    """F-INF rows. runs: (chain, engine, backend) -> loaded run record; tolerances: engine -> tolerance.

    Each run is judged against the ground truth on its own backend (inference_reference); the
    ground truth's own runs are the references, judged only by F-BACKEND-001."""
    rows = []
    for (chain, engine, backend), record in sorted(runs.items()):
        ref = inference_reference(chain, engine, backend)
        if ref is None:
            continue  # a ground truth itself
        reference = runs.get(ref.key)
        broken_reference = _ground_truth_problem(reference, backend)
        for modality in (m for m in (RUN, CHAT) if m in modalities):
            row = GateRow(INFERENCE_GATES[fmt_of(chain), backend, modality], subject_of(variant, chain, engine),
                          reference=_reference_label(variant, ref), model=model, variant=variant)
            if record.get("skipped"):
                row.status, row.reason = SKIPPED, record["skipped"]
            elif upstream := _upstream_failure(record):
                row.reason = upstream
            elif record.get("error"):
                row.status, row.reason = FAIL, record["error"][:500]
            elif broken_reference:
                row.reason = broken_reference
            elif modality == CHAT and _no_templates(reference, record):
                row.status, row.reason = SKIPPED, NO_TEMPLATES
            else:
                judge(row, compare_runs(reference, record, modality), tolerances.get(engine))
            rows.append(row)
    return rows


NO_TEMPLATES = "neither the source nor the artifact carries a chat template"  # as F-CHAT-001 words it


def _no_templates(reference: dict, record: dict) -> bool:
    """Whether no chat prompt could be rendered on either side for want of a chat template (a base
    model like Gemma-3-270M has none): nothing to compare, a capability absent, not a gap. One
    side rendering them and the other not is compared, and fails."""
    chats = [p for run in (reference, record) for p in run.get("prompts") or [] if p.get("modality") == CHAT]
    return bool(chats) and all(p.get("error") == NO_CHAT_TEMPLATE for p in chats)


def _reference_label(variant: str, ref) -> str:
    """The row's reference column: `native/st/transformers` for the cpu ground truth (the label
    rows always had), with `-gpu` appended for the gpu one."""
    return subject_of(variant, ref.chain, ref.engine) + ("" if ref.backend == "cpu" else f"-{ref.backend}")


def _ground_truth_problem(reference: dict | None, backend: str = "cpu") -> str:
    """Why the ground truth on `backend` cannot judge anything ('' when it can)."""
    if reference is None:
        return f"the ground truth run (transformers, {backend}, on the SafeTensors source) is missing"
    if reference.get("skipped") or reference.get("error"):
        return f"the ground truth run failed: {(reference.get('error') or reference.get('skipped'))[:400]}"
    return ""


def _upstream_failure(record: dict) -> str:
    """The reason to wait, when the run's artifact is a placeholder of a conversion that failed
    before it (its own edge's row fails; this one is not evaluated)."""
    failure = record.get("no_artifact")
    if not failure:
        return ""
    return no_artifact.describe(failure)


def reference_rows(model: str, variant: str, references: dict, runs: dict, tolerances: dict,
                   modalities=(RUN, CHAT), judged_by_owner: dict | None = None) -> list[GateRow]:
    """F-INF-REF rows: every run of an engine with a reference tolerance against the reference
    model of its chain's first hop on the same backend (quantized_reference: a gpu run against a
    cpu reference would measure kernels, not the converter). references: (first-hop chain,
    backend) -> loaded reference record (a bare first hop means cpu); tolerances: engine -> tolerance.
    judged_by_owner: first hops this variant does not quantize and shares with a lossless variant,
    whose bit-exact F-INF rows judge the same run (convqa.workflow.jobs.Jobs.judged_by_owner): no
    row, as no reference model is run for them."""
    references = {(k, "cpu") if isinstance(k, str) else tuple(k): v for k, v in references.items()}
    rows = []
    for (chain, engine, backend), record in sorted(runs.items()):
        ref = quantized_reference(chain, engine, backend, variant, {variant: tolerances})
        if ref is None or ref.chain in (judged_by_owner or {}):
            continue
        hop = ref.chain
        reference = references.get(ref.key)
        for modality in (m for m in (RUN, CHAT) if m in modalities):
            row = GateRow(REFERENCE_GATES[fmt_of(chain), backend, modality], subject_of(variant, chain, engine),
                          reference=f"{label(variant, hop)}/reference" + ("" if backend == "cpu" else f"-{backend}"),
                          model=model, variant=variant)
            if record.get("skipped"):
                row.status, row.reason = SKIPPED, record["skipped"]
            elif upstream := _upstream_failure(record):
                row.reason = upstream
            elif record.get("error"):
                row.status, row.reason = FAIL, record["error"][:500]
            elif reference is None:
                row.reason = f"no reference run for the first hop {hop} on {backend}"
            elif reference.get("skipped"):  # the artifact ran on this backend but its reference could not
                row.reason = f"the reference run for the first hop {hop} was skipped: {reference['skipped']}"
            elif reference.get("error"):  # a correct first hop always has one: its absence is a finding
                row.status, row.reason = FAIL, reference["error"][:500]
            elif modality == CHAT and _no_templates(reference, record):
                row.status, row.reason = SKIPPED, NO_TEMPLATES
            else:
                judge(row, compare_runs(reference, record, modality), tolerances[engine])
            rows.append(row)
    return rows


def engine_rows(model: str, variant: str, runs: dict, tolerances: dict) -> list[GateRow]:
    """F-ENGINE-001 per GGUF chain: llama.cpp against transformers on the same file (cpu, run prompts)."""
    rows = []
    for chain in sorted({c for c, _, _ in runs if fmt_of(c) == "gguf"}):
        row = GateRow(ENGINE_GATE, subject_of(variant, chain, "llama.cpp"),
                      reference=subject_of(variant, chain, "transformers"), model=model, variant=variant)
        llama, torch_run = runs.get((chain, "llama.cpp", "cpu")), runs.get((chain, "transformers", "cpu"))
        if llama is None or torch_run is None:
            row.reason = "both engines must have run on cpu"
        elif llama.get("skipped") or torch_run.get("skipped"):
            row.status, row.reason = SKIPPED, llama.get("skipped") or torch_run.get("skipped")
        elif upstream := _upstream_failure(llama) or _upstream_failure(torch_run):
            row.reason = upstream
        elif llama.get("error"):
            row.status, row.reason = FAIL, llama["error"][:500]
        elif torch_run.get("error"):  # the reference side failed: its own F-INF row says so
            row.reason = f"the transformers run it is compared with failed: {torch_run['error'][:400]}"
        else:
            judge(row, compare_runs(torch_run, llama, RUN), tolerances.get("llama.cpp"))
        rows.append(row)
    return rows


def _visible(text: str) -> str:
    # A server drops the bytes of an incomplete UTF-8 character; a local decode shows U+FFFD.
    return (text or "").replace(REPLACEMENT_CHARACTER, "")


def served_text_matches(served: str, run_text: str) -> bool:
    """Whether llama.cpp's served answer is the `run` answer, as text.

    llama-cpp-python's completion keeps generating past max_tokens while the last three bytes of
    its text hold a UTF-8 lead byte (its "multibyte fix" waits for the character to complete, and
    a byte-level vocabulary can emit a lone lead byte that never completes). After a run that
    ended there (U+FFFD among its last three characters) the served answer is the run's greedy
    text continued, so the run's visible text must be its prefix; anywhere else they must be equal.
    """
    served_visible, run_visible = _visible(served), _visible(run_text)
    if served_visible == run_visible:
        return True
    return REPLACEMENT_CHARACTER in (run_text or "")[-3:] and served_visible.startswith(run_visible)


def serve_rows(model: str, variant: str, runs: dict, serves: dict) -> list[GateRow]:
    """F-SERVE-001 per served (chain, engine): HTTP answers against the cpu run of the same engine."""
    rows = []
    for (chain, engine), served in sorted(serves.items()):
        by_ids = engine == "transformers"
        row = GateRow(SERVE_GATE, subject_of(variant, chain, engine), reference=f"{subject_of(variant, chain, engine)}/run",
                      metric="answers differing from run", threshold="0", model=model, variant=variant)
        run = runs.get((chain, engine, "cpu"))
        if served.get("skipped"):
            row.status, row.reason = SKIPPED, served["skipped"]
            rows.append(row)
            continue
        if upstream := _upstream_failure(served):
            row.reason = upstream
            rows.append(row)
            continue
        if served.get("error"):
            row.status, row.reason = FAIL, f"server failed: {served['error'][-400:]}"
            rows.append(row)
            continue
        unanswered = [a for a in served.get("answers", []) if a.get("error") and a.get("server_died")]
        if unanswered:  # the server died on a request (llama.cpp aborts): a finding whatever the run did
            row.value, row.status = str(len(unanswered)), FAIL
            row.reason = f"server could not answer {len(unanswered)} prompt(s): {unanswered[0]['error'][:400]}"
            row.details = json.dumps({"problems": [f"{a['prompt_id']}: {a['error'][:400]}" for a in unanswered]})
            rows.append(row)
            continue
        if run is None or run.get("skipped") or run.get("error"):
            row.reason = "no cpu run of this engine to compare with"
            rows.append(row)
            continue
        run_prompts = _by_prompt(run)
        compared, problems = 0, []
        for answer in served.get("answers", []):
            local = run_prompts.get(answer["prompt_id"])
            if answer.get("not_sent") or local is None or local.get("ids") is None:
                continue  # not asked, or the run could not render it either (its F-INF row says why)
            compared += 1
            if answer.get("error"):
                problems.append(f"{answer['prompt_id']}: {answer['error'][:200]}")
            elif by_ids and list(answer["token_ids"]) != list(local["generated_ids"]):
                first = compare_greedy(local["generated_ids"], answer["token_ids"]).first_divergence
                problems.append(f"{answer['prompt_id']}: ids differ from token {first}")
            elif not by_ids and not served_text_matches(answer["text"], local.get("text", "")):
                problems.append(f"{answer['prompt_id']}: text {answer['text'][:40]!r} != run {local.get('text', '')[:40]!r}")
        if not compared:
            row.reason = "no prompt could be compared"
        else:
            row.value = str(len(problems))
            row.status = FAIL if problems else PASS
            row.reason = "; ".join(problems[:3]) if problems else (
                f"{compared} answer(s) equal token for token" if by_ids else
                f"{compared} answer(s) equal as text (llama.cpp's server tokenizes the prompt text itself)")
            row.details = json.dumps({"problems": problems, "compared": compared})
        rows.append(row)
    return rows


# ---------------------------------------------------------------- report extras


def throughput(variant: str, runs: dict) -> list[dict]:
    """Prefill and decode tokens/s per (chain, engine, backend) run, summed over its prompts."""
    table = []
    for (chain, engine, backend), record in sorted(runs.items()):
        prompts = [p for p in record.get("prompts", []) if p.get("ids") is not None]
        if record.get("skipped") or record.get("error") or not prompts:
            continue
        prefill_s, decode_s = sum(p.get("prefill_s", 0.0) for p in prompts), sum(p.get("decode_s", 0.0) for p in prompts)
        table.append({
            "format": fmt_of(chain), "engine": engine, "backend": backend, "variant": variant, "chain": chain,
            "prefill_tps": sum(p.get("prefill_tokens", 0) for p in prompts) / prefill_s if prefill_s > 0 else None,
            "decode_tps": sum(p.get("decode_tokens", 0) for p in prompts) / decode_s if decode_s > 0 else None,
        })
    return table


def prompt_details(variant: str, runs: dict) -> dict[str, list[dict]]:
    """Per-prompt parity against the ground truth on the run's backend, by
    `variant/chain/engine-backend` (for the report)."""
    details = {}
    for (chain, engine, backend), record in sorted(runs.items()):
        ref = inference_reference(chain, engine, backend)
        if ref is None or record.get("skipped") or record.get("error"):
            continue
        reference = runs.get(ref.key)
        if _ground_truth_problem(reference, backend):
            continue
        details[f"{subject_of(variant, chain, engine)}-{backend}"] = compare_runs(reference, record)["prompts"]
    return details


def evaluate(model: str, variant: str, runs: dict, serves: dict, tolerances: dict,
             modalities=(RUN, CHAT, "serve"), references: dict | None = None,
             reference_tolerances: dict | None = None,
             judged_by_owner: dict | None = None) -> tuple[list[GateRow], list[dict], dict]:
    """(gate rows, throughput, per-prompt details) of one (model, variant).

    references ((first hop, backend) -> reference run) and reference_tolerances (engine ->
    tolerance) add the F-INF-REF rows; without them there are none. Every row's reference is
    on the row's backend (convqa.workflow.references); when it is missing or broken, the row
    says so.
    """
    rows = inference_rows(model, variant, runs, tolerances, modalities)
    if reference_tolerances:
        rows += reference_rows(model, variant, references or {}, runs, reference_tolerances, modalities, judged_by_owner)
    # A failing transformers row names its first divergent layer (convqa.gates.divergence).
    # Hidden states are compared on cpu only: there the baselines are exact (see gates.divergence).
    cpu_references = {(k if isinstance(k, str) else k[0]): v for k, v in (references or {}).items()
                      if isinstance(k, str) or k[1] == "cpu"}
    annotate_divergence(rows, variant, runs, cpu_references, ground_truth("cpu").key)
    rows += engine_rows(model, variant, runs, tolerances)
    if "serve" in modalities:
        rows += serve_rows(model, variant, runs, serves)
    return rows, throughput(variant, runs), prompt_details(variant, runs)
