"""The per-artifact gates: each artifact on its own, from its manifest (no tensor is read again).

- G0-INTEGRITY (`integrity`): the config agrees with the tensor shapes.
- G0-VALIDATE (`validity`): no NaN/Inf and no degenerate tensor.
- F-LAYOUT-001 (`gguf_layout`): every GGUF ne is the reversed canonical shape.
- F-LAYOUT-003 (`gguf_f32_tensors`): every GGUF 1-D tensor and norm is F32.
- F-LAYOUT-002 (`apr_layout`): APR row-major flags and [vocab, hidden] embedding and lm_head.
"""

from __future__ import annotations

from convqa import arch
from convqa.arch import registry

from convqa.formats import no_artifact
from convqa.model import ModelConfig
from convqa.convert.builtin import gguf_wants_f32
from convqa.gates.rows import GateRow, label, verdict
from convqa.workflow.plan import hops


def artifact_rows(manifest: dict | None, chain: str, model: str, variant: str) -> list[GateRow]:
    subject = label(variant, chain)
    fmt = manifest.get("format") if manifest else None
    rows = [integrity(manifest, subject), validity(manifest, subject)]
    if fmt == "gguf" or (manifest is None and hops(chain)[-1] == "gguf"):
        rows.append(gguf_layout(manifest, subject))
        rows.append(gguf_f32_tensors(manifest, subject))
    if fmt == "apr" or (manifest is None and hops(chain)[-1] == "apr"):
        rows.append(apr_layout(manifest, subject))
    for r in rows:
        r.model, r.variant = model, variant
    return rows


def no_tensors(manifest: dict | None) -> str:
    """Why a manifest has no tensors to judge ('' when it has)."""
    if manifest is None:
        return "no manifest (artifact missing or unreadable)"
    if manifest.get("no_artifact"):  # a failed conversion: its edge's row fails, this one waits on it
        return no_artifact.describe(manifest["no_artifact"])
    if manifest.get("read_error"):
        return f"artifact unreadable: {manifest['read_error']}"
    if not manifest.get("tensors"):
        return "artifact has no tensors"
    return ""


def _config_of(manifest: dict) -> ModelConfig:
    return ModelConfig(**manifest["config"])


def integrity(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("G0-INTEGRITY", subject, metric="tensors disagreeing with config", threshold="0")
    if manifest is not None and manifest.get("read_error") and not manifest.get("no_artifact"):
        # The strict reader refused the file: every reader and engine downstream will too.
        return verdict(row, 1, [f"artifact unreadable: {manifest['read_error']}"])
    if reason := no_tensors(manifest):
        row.reason = reason
        return row
    expected = arch.expected_tensors(_config_of(manifest))
    actual = {t["name"]: tuple(t["shape"]) for t in manifest["tensors"]}
    problems = [f"missing {n}" for n in expected if n not in actual]
    problems += [f"{n} is {list(actual[n])}, config implies {list(s)}" for n, s in expected.items() if n in actual and actual[n] != s]
    problems += [f"unexpected {n}" for n in actual if n not in expected]
    tok = manifest.get("tokenizer")
    if tok and tok["n_tokens"] > manifest["config"]["vocab_size"]:
        problems.append(f"tokenizer has {tok['n_tokens']} tokens, vocab_size is {manifest['config']['vocab_size']}")
    return verdict(row, len(problems), problems)


def validity(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("G0-VALIDATE", subject, metric="degenerate tensors", threshold="0")
    if reason := no_tensors(manifest):
        row.reason = reason
        return row
    problems = []
    for t in manifest["tensors"]:
        s = t.get("stats")
        if not s:
            problems.append(f"{t['name']}: no statistics")
            continue
        name = t["name"]
        if s["nan"] or s["inf"]:
            problems.append(f"{name}: {s['nan']} NaN, {s['inf']} Inf")
            continue
        zero_limit = 0.5 if "embed_tokens" in name else 0.8
        if s["zero_fraction"] is not None and s["zero_fraction"] >= zero_limit:
            problems.append(f"{name}: {s['zero_fraction']:.0%} zeros (limit {zero_limit:.0%})")
        elif s["l2"] is not None and s["l2"] <= 1e-6:
            problems.append(f"{name}: L2 norm {s['l2']:.3g} <= 1e-6")
        elif len(t["shape"]) == 2 and s["std"] == 0:
            problems.append(f"{name}: all values equal")
    return verdict(row, len(problems), problems)


def gguf_layout(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("F-LAYOUT-001", subject, metric="tensors whose ne is not the reversed canonical shape", threshold="0")
    if reason := no_tensors(manifest):
        row.reason = reason
        return row
    config = _config_of(manifest)
    expected = arch.expected_tensors(config)
    moe = registry.declared(config.architecture)
    problems = []
    for t in manifest["tensors"]:
        want = expected.get(t["name"])
        if want is None:
            continue
        ne = list(reversed(want))
        if registry.expert_of(moe, t["name"]) is not None:
            ne.append(int(config.params["num_experts"]))  # stored in its layer's [n_expert, rows, cols] stack
        if list(t["stored_shape"]) != ne:
            problems.append(f"{t['name']}: ne {t['stored_shape']}, expected {ne}")
    return verdict(row, len(problems), problems)


def gguf_f32_tensors(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("F-LAYOUT-003", subject, metric="1-D tensors or norms not in F32", threshold="0")
    if reason := no_tensors(manifest):
        row.reason = reason
        return row
    problems = [f"{t['name']} is {t['encoding']}" for t in manifest["tensors"]
                if gguf_wants_f32(t["name"], t["shape"]) and t["encoding"] != "F32"]
    return verdict(row, len(problems), problems)


def apr_layout(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("F-LAYOUT-002", subject, metric="layout violations", threshold="0")
    if reason := no_tensors(manifest):
        row.reason = reason
        return row
    problems = []
    header = manifest.get("metadata", {}).get("apr_header", {})
    flags = header.get("flags")
    if flags is None:
        problems.append("APR header flags not recorded")
    else:
        if not flags & 0x0400:
            problems.append(f"flags 0x{flags:04x}: LAYOUT_ROW_MAJOR not set")
        if flags & 0x0800:
            problems.append(f"flags 0x{flags:04x}: LAYOUT_COLUMN_MAJOR set")
    cfg = manifest["config"]
    shapes = {t["name"]: t["shape"] for t in manifest["tensors"]}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in shapes and list(shapes[name]) != [cfg["vocab_size"], cfg["hidden_size"]]:
            problems.append(f"{name} is {shapes[name]}, expected [vocab={cfg['vocab_size']}, hidden={cfg['hidden_size']}]")
    return verdict(row, len(problems), problems)
