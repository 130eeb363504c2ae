"""First divergent layer: where a candidate's forward pass departs from its baseline's.

Pure numpy over two hidden-state captures (convqa.infer.engines.transformers_engine
.capture_hidden_states, stored by convqa.infer.run in the run's .npz): for one prompt, the state
after the embedding, after each decoder layer's sub-layers (its norms, self_attn, mlp, in the
order the forward pass called them) and the layer itself, and after the final norm. The distance
at a point is max |candidate - baseline| / max |baseline| (scale-free, the same normalisation as
the tensor checks); the logits of the same prompt are the last point. The first point above the
tolerance names the layer and sub-layer where the candidate diverges: the curve after it only
shows the error propagating.

The tolerance must be honest. A lossless artifact under the same engine reproduces every hidden
state bit for bit, and so does a lossy artifact against the reference-quantized model of its
encodings (F-INF-REF): both are held to 0. Against the F32 ground truth a lossy artifact moves
every layer a little, so no layer is named there (the curve alone is reported).
"""

from __future__ import annotations

import numpy as np

LOGITS_POINT = {"module": "lm_head", "layer": None, "sublayer": "logits"}
EXACT = 0.0


def capture_of(record: dict, prefix: str = "hidden.") -> tuple[str, list[dict], dict[str, np.ndarray]] | None:
    """(prompt id, points, arrays) of a loaded run record's capture, or None when it has none.

    The arrays are record["hidden"] (convqa.infer.run.load_run), or the prefixed keys of
    record["logits"] when the record holds run_prompts' arrays as they came back.
    """
    meta = record.get("hidden_states") or {}
    points = meta.get("points")
    if not points:
        return None
    arrays = record.get("hidden") or {
        key[len(prefix):]: value for key, value in (record.get("logits") or {}).items() if key.startswith(prefix)
    }
    if not arrays:
        return None
    return meta["prompt_id"], points, arrays


def describe(point: dict) -> str:
    """'layer 0, self_attn output', 'embedding output (model.embed_tokens)', 'logits (lm_head)'."""
    if point.get("sublayer") == "logits":
        return "the logits (lm_head)"
    if point.get("layer") is None:
        return f"{point['sublayer']} output ({point['module']})"
    return f"layer {point['layer']}, {point['sublayer']} output"


def distance(baseline, candidate) -> tuple[float, str]:
    """(max |candidate - baseline| / max |baseline|, problem): inf with the problem when the
    candidate is missing, misshapen or not finite (NaN would compare false against any limit)."""
    if candidate is None:
        return float("inf"), "missing from the candidate's capture"
    baseline, candidate = np.asarray(baseline, np.float64), np.asarray(candidate, np.float64)
    if baseline.shape != candidate.shape:
        return float("inf"), f"shape {list(candidate.shape)}, the baseline's is {list(baseline.shape)}"
    if not np.isfinite(candidate).all():
        return float("inf"), "holds NaN or Inf"
    diff = float(np.abs(candidate - baseline).max()) if baseline.size else 0.0
    scale = float(np.abs(baseline).max()) if baseline.size else 0.0
    if diff == 0.0:
        return 0.0, ""
    return (diff / scale if scale > 0 else float("inf")), ""


def layer_curve(baseline: dict, candidate: dict) -> dict:
    """Distances at every capture point of `baseline`, in its forward order, then the logits.

    Both are loaded run records. Returns {"prompt_id", "points": [...], "values": [...],
    "problems": {index: why}} or {"error": why} when there is nothing to compare.
    """
    base, cand = capture_of(baseline), capture_of(candidate)
    if base is None:
        return {"error": "the baseline run has no hidden-state capture"}
    if cand is None:
        why = (candidate.get("hidden_states") or {}).get("error")
        return {"error": f"the candidate run has no hidden-state capture{f' ({why})' if why else ''}"}
    prompt_id, base_points, base_arrays = base
    cand_prompt, cand_points, cand_arrays = cand
    if cand_prompt != prompt_id:
        return {"error": f"the captures are of different prompts ({cand_prompt} against {prompt_id})"}
    by_module = {p["module"]: cand_arrays.get(p["key"]) for p in cand_points}
    points, values, problems = [], [], {}
    for point in base_points:
        value, why = distance(base_arrays[point["key"]], by_module.get(point["module"]))
        points.append({k: point[k] for k in ("module", "layer", "sublayer")})
        values.append(value)
        if why:
            problems[len(values) - 1] = why
    base_logits = (baseline.get("logits") or {}).get(prompt_id)
    cand_logits = (candidate.get("logits") or {}).get(prompt_id)
    if base_logits is not None:
        value, why = distance(base_logits, cand_logits)
        points.append(dict(LOGITS_POINT))
        values.append(value)
        if why:
            problems[len(values) - 1] = why
    return {"prompt_id": prompt_id, "points": points, "values": values, "problems": problems}


def first_divergence(curve: dict, tolerance: float | None) -> int | None:
    """Index of the first point whose distance exceeds `tolerance` (None: no tolerance, none named)."""
    if tolerance is None or "values" not in curve:
        return None
    return next((i for i, v in enumerate(curve["values"]) if not v <= tolerance), None)


def locate(baseline: dict, candidate: dict, baseline_label: str, tolerance: float | None) -> dict:
    """The divergence evidence of a failing row: {"baseline", "tolerance", "prompt_id", "points",
    "values", "first", "diagnosis"} ("first" is the index of the first divergent point or None).

    `tolerance` None means the baseline cannot be matched exactly (a lossy artifact against the
    F32 ground truth) and no layer is named: the curve is the evidence.
    """
    curve = layer_curve(baseline, candidate)
    result = {"baseline": baseline_label, "tolerance": tolerance, **curve}
    if "error" in curve:
        result["first"] = None
        result["diagnosis"] = f"no first divergent layer: {curve['error']}"
        return result
    first = first_divergence(curve, tolerance)
    result["first"] = first
    prompt = curve["prompt_id"]
    if tolerance is None:
        worst = int(np.argmax(np.nan_to_num(curve["values"], posinf=np.finfo(float).max)))
        result["diagnosis"] = (
            f"no layer named: a lossy artifact departs from {baseline_label} at every layer "
            f"(largest at {describe(curve['points'][worst])}, {curve['values'][worst]:.3g}; prompt {prompt})")
    elif first is None:
        result["diagnosis"] = (
            f"every layer and the logits of prompt {prompt} match {baseline_label} within {tolerance:g}: the "
            "difference is in another prompt or in the generation, not in the forward pass of this one")
    else:
        point, value = curve["points"][first], curve["values"][first]
        why = curve["problems"].get(first) or f"max |d| / max |ref| {value:.3g} > {tolerance:g}"
        result["diagnosis"] = f"diverges at {describe(point)} ({why}, against {baseline_label}, prompt {prompt})"
    return result
