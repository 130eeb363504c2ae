"""Tensor-level comparison of two models on the canonical view, with a layout diagnosis.

Two artifacts are compared name by name. Equal encodings are compared byte for byte (a lossless
conversion must be bit-exact); different encodings are compared on float32 values against the
tolerance of the lossier encoding. When values disagree, the diagnosis says what the candidate
*is*: the transpose, the same bytes under reversed dims, llama's Q/K rows permuted, a gemma norm
off by the GGUF +1 offset, experts stacked in another order, all zeros, so a layout bug names
itself instead of showing up as "95% different". The intentional transforms it recognises are the
registry's (convqa.arch.transforms).

MoE experts are compared twice: tensor by tensor, as every reader splits a GGUF stack back into
per-expert tensors, and per layer and role (`expert_orders`), because a converter that stacks the
experts in another order leaves every expert intact but at another index. Which tensors are
experts, and of which layer and role, is the registry's (`registry.expert_of`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from convqa.arch import registry, transforms
from convqa.arch.permute import permute_rows_for_gguf, unpermute_rows_from_gguf
from convqa.compare.blocks import is_quantization, reference_blocks, reference_encode
from convqa.encodings import ENCODING_TOLERANCE
from convqa.model import ModelArtifact, ModelConfig, TokenizerSpec


@dataclass
class TensorComparison:
    name: str
    status: str  # identical | within_tolerance | differ | shape_mismatch | missing_in_candidate | extra_in_candidate
    ref_shape: list | None = None
    cand_shape: list | None = None
    ref_encoding: str | None = None
    cand_encoding: str | None = None
    bit_exact: bool = False
    max_abs: float | None = None
    normalized_max_abs: float | None = None  # max |a-b| / max |a|
    rel_l2: float | None = None
    tolerance: float | None = None
    diagnosis: str = ""
    # F32 -> BF16 only: values that are not the F32 value rounded to nearest even. The only
    # correct BF16 of an F32 is exact, so a truncating converter shows here even where its error
    # stays inside the BF16 tolerance.
    rounding_mismatches: int | None = None
    # A tensor quantized out of a plain-float reference: its stored blocks against the reference
    # quantizer's (convqa.compare.blocks, gate F-QUANT-001). None when no quantization happened.
    reference_blocks: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("identical", "within_tolerance")


@dataclass
class ModelComparison:
    tensors: list[TensorComparison]
    config_differences: dict = field(default_factory=dict)  # field -> [ref, cand]
    tokenizer_differences: dict = field(default_factory=dict)  # field -> summary
    # MoE: one entry per layer and expert role whose experts are the source's in another order
    # (`ExpertOrder`); the per-expert rows of such a group carry the same diagnosis.
    expert_orders: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.tensors) and all(t.ok for t in self.tensors) and not self.config_differences and not self.tokenizer_differences

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "tensors": [asdict(t) for t in self.tensors],
            "config_differences": self.config_differences,
            "tokenizer_differences": self.tokenizer_differences,
            "expert_orders": [asdict(e) for e in self.expert_orders],
            "summary": self.summary(),
        }

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.status] = counts.get(t.status, 0) + 1
        worst = max((t.normalized_max_abs or 0.0 for t in self.tensors), default=0.0)
        summary = {"tensors": len(self.tensors), "by_status": counts, "worst_normalized_max_abs": worst}
        checked = [t for t in self.tensors if t.reference_blocks and t.reference_blocks.get("byte_exact_demanded")]
        if checked:
            summary["reference_quantizer"] = {"tensors": len(checked),
                                              "differing": sum(1 for t in checked if t.reference_blocks.get("differing_blocks") != 0)}
        return summary

    @property
    def reference_mismatches(self) -> list[TensorComparison]:
        """Tensors whose stored blocks are not the reference quantizer's."""
        return [t for t in self.tensors if t.reference_blocks and t.reference_blocks.get("byte_exact_demanded")
                and t.reference_blocks.get("differing_blocks") != 0]


def tolerance_for(ref_encoding: str, cand_encoding: str) -> float:
    return max(ENCODING_TOLERANCE.get(ref_encoding, 0.0), ENCODING_TOLERANCE.get(cand_encoding, 0.0))


def compare_models(ref: ModelArtifact, cand: ModelArtifact, *, tolerance: float | None = None) -> ModelComparison:
    """Compare every tensor, the config and the tokenizer. `tolerance` overrides the per-encoding one."""
    rows = []
    for name, a in ref.tensors.items():
        b = cand.tensors.get(name)
        if b is None:
            rows.append(TensorComparison(name, "missing_in_candidate", ref_shape=list(a.shape), ref_encoding=a.encoding.name,
                                         diagnosis=_missing_diagnosis(name, ref, cand)))
            continue
        rows.append(compare_tensor(a, b, ref.config, tolerance))
    for name, b in cand.tensors.items():
        if name not in ref.tensors:
            rows.append(TensorComparison(name, "extra_in_candidate", cand_shape=list(b.shape), cand_encoding=b.encoding.name))
    orders = expert_orders(ref, cand, rows)
    return ModelComparison(rows, compare_configs(ref.config, cand.config), compare_tokenizers(ref.tokenizer, cand.tokenizer),
                           orders)


@dataclass
class ExpertOrder:
    """One layer's experts of one role, all present, each the source's expert `order[i]` at index
    i for a permutation other than the identity: the experts were stacked in the wrong order."""

    layer: int
    role: str  # the per-expert suffix, "down_proj.weight"
    tensors: str  # the group's names, the expert index as `*`
    order: list[int]
    moved: list[str]  # the per-expert tensors that are not where the source has them
    diagnosis: str


def expert_orders(ref: ModelArtifact, cand: ModelArtifact, rows: list[TensorComparison]) -> list[ExpertOrder]:
    """The expert groups of `ref`'s architecture whose candidate experts are the source's in
    another order; sets that diagnosis on each of the group's differing rows. Groups where every
    expert compared ok cost nothing (no tensor is read again)."""
    try:
        arch = registry.declared(ref.config.architecture)
    except KeyError:
        return []
    if not arch.expert_roles:
        return []
    by_name = {row.name: row for row in rows}
    groups: dict[tuple[int, str], dict[int, str]] = {}
    for name in ref.tensors:
        if (found := registry.expert_of(arch, name)) is not None:
            layer, expert, role = found
            groups.setdefault((layer, role), {})[expert] = name
    found_orders = []
    for (layer, role), members in sorted(groups.items()):
        names = [members[e] for e in sorted(members)]
        if sorted(members) != list(range(len(members))) or all(by_name[n].ok for n in names):
            continue
        if any(not by_name[n].ok and by_name[n].status != "differ" for n in names):
            continue  # a missing or reshaped expert: its own row says so
        # structure, not rounding: quantization noise allowed, as in `_value_diagnosis`
        order = _permutation([ref.tensors[n].to_float32 for n in names], [cand.tensors[n].to_float32 for n in names], 1e-2)
        if order is None:
            continue
        diagnosis = experts_reordered(order)
        moved = [n for i, n in enumerate(names) if order[i] != i]
        for n in moved:
            by_name[n].diagnosis = diagnosis
        found_orders.append(ExpertOrder(layer, role, registry.expert_name(layer, "*", role), order, moved, diagnosis))
    return found_orders


def experts_reordered(order: list[int]) -> str:
    return f"experts stacked in the wrong order (candidate expert i is source expert {order}[i])"


def _missing_diagnosis(name: str, ref: ModelArtifact, cand: ModelArtifact) -> str:
    if name == "lm_head.weight" and cand.config.tie_word_embeddings:
        return "candidate ties lm_head to the embedding; the reference has its own lm_head"
    return ""


def compare_tensor(a, b, config: ModelConfig | None = None, tolerance: float | None = None) -> TensorComparison:
    row = TensorComparison(a.name, "differ", list(a.shape), list(b.shape), a.encoding.name, b.encoding.name)
    row.tolerance = tolerance if tolerance is not None else tolerance_for(a.encoding.name, b.encoding.name)
    if a.shape != b.shape:
        row.status = "shape_mismatch"
        row.diagnosis = _shape_diagnosis(a, b)
        return row
    if a.encoding == b.encoding and np.array_equal(a.raw(), b.raw()):
        row.status, row.bit_exact = "identical", True
        row.max_abs = row.normalized_max_abs = row.rel_l2 = 0.0
        return row
    va = a.to_float32().astype(np.float32, copy=False)
    vb = b.to_float32().astype(np.float32, copy=False)
    _fill_errors(row, va, vb)
    if is_quantization(a.encoding, b.encoding):
        row.reference_blocks = reference_blocks(va, b)
    if a.encoding.name == "F32" and b.encoding.name == "BF16":
        expected = reference_encode(b.encoding, va, tuple(b.shape)).view("<u2")
        row.rounding_mismatches = int(np.count_nonzero(expected != b.raw().view("<u2").reshape(-1)))
        if row.rounding_mismatches:
            row.diagnosis = (f"{row.rounding_mismatches} of {va.size} BF16 values are not the F32 value rounded to "
                             "nearest even (mantissa truncated?)")
            return row
    if row.normalized_max_abs is not None and row.normalized_max_abs <= row.tolerance and np.isfinite(vb).all():
        row.status = "within_tolerance" if row.max_abs > 0 else "identical"
        row.bit_exact = row.max_abs == 0 and a.encoding == b.encoding
        return row
    row.diagnosis = _value_diagnosis(a.name, va, vb, config)
    return row


# Errors are taken in float64 a slice at a time: whole-tensor float64 copies, their difference and
# its absolute value were 4 temporaries of twice the float32 tensor (a 1.5B model's comparison
# peaked at 5.6 GB for its 0.9 GB embedding).
ERROR_SLICE_ELEMENTS = 1 << 18


def _fill_errors(row: TensorComparison, va: np.ndarray, vb: np.ndarray) -> None:
    fa, fb = va.reshape(-1), vb.reshape(-1)
    scale = max_abs = diff_squares = ref_squares = 0.0
    for start in range(0, fa.size, ERROR_SLICE_ELEMENTS):
        a = fa[start : start + ERROR_SLICE_ELEMENTS].astype(np.float64)
        diff = a - fb[start : start + ERROR_SLICE_ELEMENTS]
        np.abs(diff, out=diff)
        # np.max passes a NaN on, Python's max() would drop it (max(0.0, nan) is 0.0): keep it.
        scale = _max_keeping_nan(scale, np.max(np.abs(a)))
        max_abs = _max_keeping_nan(max_abs, np.max(diff))
        diff_squares += np.dot(diff, diff)
        ref_squares += np.dot(a, a)
    row.max_abs = float(max_abs)
    row.normalized_max_abs = row.max_abs / scale if scale > 0 else (0.0 if row.max_abs == 0 else float("inf"))
    norm = float(np.sqrt(ref_squares))
    row.rel_l2 = float(np.sqrt(diff_squares)) / norm if norm > 0 else (0.0 if row.max_abs == 0 else float("inf"))


def _max_keeping_nan(current: float, candidate: float) -> float:
    return candidate if np.isnan(candidate) or candidate > current else current


def _close(x: np.ndarray, y: np.ndarray, tol: float) -> bool:
    if x.shape != y.shape:
        return False
    scale = float(np.max(np.abs(x))) or 1.0
    return float(np.max(np.abs(x.astype(np.float64) - y))) <= max(tol, 1e-7) * scale


def _shape_diagnosis(a, b) -> str:
    if tuple(b.shape) == tuple(reversed(a.shape)):
        va, vb = a.to_float32(), b.to_float32()
        if _close(va.T, vb, tolerance_for(a.encoding.name, b.encoding.name)):
            return "equals the transpose (data transposed and dims swapped)"
        if va.size == vb.size and _close(va.reshape(vb.shape), vb, tolerance_for(a.encoding.name, b.encoding.name)):
            return "equals a reversed-dims reshape (same bytes, GGUF ne not reversed)"
        return "shape is reversed and values are scrambled"
    if np.prod(a.shape) == np.prod(b.shape):
        return f"same element count, shape {list(b.shape)} instead of {list(a.shape)}"
    return f"shape {list(b.shape)} instead of {list(a.shape)}"


def _value_diagnosis(name: str, va: np.ndarray, vb: np.ndarray, config: ModelConfig | None) -> str:
    tol = 1e-2  # diagnoses are about structure, not rounding: allow quantization noise
    if not np.isfinite(vb).all():
        return "candidate has NaN/Inf values"
    if not vb.any() and va.any():
        return "candidate is all zeros"
    if va.ndim == 2:
        if va.shape[0] == va.shape[1] and _close(va.T, vb, tol):
            return "equals the transpose"
        if _close(np.ascontiguousarray(va.T).reshape(va.shape), vb, tol):
            return "equals the transpose's bytes read in the original shape (LAYOUT-002: data transposed)"
    if config is not None and (".q_proj." in name or ".k_proj." in name):
        n_head = config.num_heads if ".q_proj." in name else config.num_kv_heads
        if va.shape[0] % (2 * n_head) == 0:
            if _close(permute_rows_for_gguf(va, n_head), vb, tol):
                return "rows are in GGUF's permuted Q/K order (llama permutation not undone)"
            if _close(unpermute_rows_from_gguf(va, n_head), vb, tol):
                return "rows are un-permuted twice (llama Q/K permutation missing on write)"
    if transforms.is_norm(name):
        one = np.float32(transforms.NORM_OFFSET)
        if _close(va + one, vb, tol):
            return "equals the source + 1 (gemma norm offset applied twice / missing)"
        if _close(va - one, vb, tol):
            return "equals the source - 1 (gemma norm offset undone twice)"
    if va.ndim == 3 and va.shape[0] > 1:
        order = _expert_order(va, vb, tol)
        if order is not None:
            return experts_reordered(order)
    if va.size and np.allclose(vb, -va, atol=0):
        return "sign flipped"
    if va.size > 1 and _close(np.sort(va, axis=None), np.sort(vb, axis=None), tol):
        return "same values in another order (layout scrambled)"
    return "values differ"


def _expert_order(va: np.ndarray, vb: np.ndarray, tol: float) -> list[int] | None:
    """The source expert each candidate expert equals, if the candidate is a reordering of the
    source's experts (axis 0 of a stacked MoE tensor) other than the identity; else None."""
    return _permutation([lambda e=e: e for e in va], [lambda e=e: e for e in vb], tol)


def _permutation(source: list[Callable[[], np.ndarray]], candidate: list[Callable[[], np.ndarray]],
                 tol: float) -> list[int] | None:
    """`order` with candidate[i]'s values equal to source[order[i]]'s for every i, if that is a
    permutation other than the identity; else None. Each side is a list of loaders, so one expert
    is in memory at a time: a cheap probe (first values, scale) picks the source experts worth a
    full comparison. An expert still at its own index matches there first, so duplicate experts do
    not make up a reordering."""
    n = len(source)
    probes = [_probe(load()) for load in source]
    order = []
    for j, load in enumerate(candidate):
        b = load()
        head = _probe(b)[0]
        tried = [j, *(i for i in range(n) if i != j)]
        match = next((i for i in tried if _probe_close(probes[i], head, tol) and _close(source[i](), b, tol)), None)
        if match is None:
            return None
        order.append(match)
    return order if order != list(range(n)) and sorted(order) == list(range(n)) else None


_PROBE_VALUES = 256


def _probe(values: np.ndarray) -> tuple[np.ndarray, float]:
    """The first values and the scale of a tensor: `_close` on the probe is necessary for `_close`
    on the whole tensor (same scale), at a fraction of its cost."""
    flat = values.reshape(-1)
    return flat[:_PROBE_VALUES].astype(np.float64), float(np.max(np.abs(flat))) if flat.size else 0.0


def _probe_close(probe: tuple[np.ndarray, float], head: np.ndarray, tol: float) -> bool:
    values, scale = probe
    return values.shape == head.shape and float(np.max(np.abs(values - head), initial=0.0)) <= max(tol, 1e-7) * (scale or 1.0)


def compare_configs(a: ModelConfig, b: ModelConfig) -> dict:
    da, db = a.as_dict(), b.as_dict()
    return {k: [da[k], db[k]] for k in da if da[k] != db.get(k)}


def compare_tokenizers(a: TokenizerSpec | None, b: TokenizerSpec | None) -> dict:
    if a is None and b is None:
        return {}
    if a is None or b is None:
        return {"tokenizer": ["present" if a else "absent", "present" if b else "absent"]}
    out = {}
    for f in ("model", "pre", "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "add_bos_token", "add_eos_token"):
        if getattr(a, f) != getattr(b, f):
            out[f] = [getattr(a, f), getattr(b, f)]
    if a.tokens != _unpad(b.tokens, len(a.tokens), b.token_types):
        out["tokens"] = _list_summary(a.tokens, b.tokens)
    elif list(a.token_types) != list(b.token_types)[: len(a.token_types)]:
        out["token_types"] = _list_summary(a.token_types, b.token_types)
    if a.merges != b.merges:
        out["merges"] = _list_summary(a.merges, b.merges)
    if (a.chat_template or None) != (b.chat_template or None):
        out["chat_template"] = ["present" if a.chat_template else "absent", "present" if b.chat_template else "absent"]
        if a.chat_template and b.chat_template:
            out["chat_template"] = ["differs", "differs"]
    return out


def _unpad(tokens: list, n: int, types: list) -> list:
    """GGUF pads the vocabulary to the embedding rows with UNUSED `[PAD{i}]` tokens; ignore those."""
    if len(tokens) > n and all(t == 5 for t in list(types)[n:]):
        return tokens[:n]
    return tokens


def _list_summary(a: list, b: list) -> dict:
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"ref_len": len(a), "cand_len": len(b), "first_difference": first}
