"""An exact tensor comparison decided from the two artifacts' manifests, without the artifacts.

compare_models reads every tensor of both artifacts, so an artifact (3-6 GB for a 1.5B model)
has to stay on disk until the last comparison that involves it has run. Most comparisons of the
workflow are lossless hops whose values are equal, and their result is fully determined by what
the manifests (convqa.inspect.manifest) already record: per tensor the name, shape, encoding and
the sha256 of the decoded float32 values; the config; digests of the tokenizer's lists. When the
manifests prove that every tensor's values are equal, compare_from_manifests gives the dict that
`compare_models(ref, cand).as_dict()` would give, plus `"decided_from": "manifests"`; the
artifacts can then be deleted as soon as their manifests exist.

Anything it cannot prove gives None, and the caller runs the full comparison: a fallback is always
safe, only slower. So it only decides the case where every row is "identical": same tensor names
and shapes, equal float32 values (same bytes), all finite (compare_tensor marks a NaN or Inf that
is not bit-exact as differing), no quantizing hop (the full path then checks the stored blocks
against the reference quantizer, F-QUANT-001), equal configs and tokenizers. For such a row
compare_tensor gives the same fields whichever branch it takes: equal encodings are bit-exact
whether the stored bytes are equal (its first branch) or only the decoded values are (a block
format storing the same values twice); different encodings are identical but not bit-exact. With
every row ok no MoE expert group is examined, so `expert_orders` is empty.
"""

from __future__ import annotations

from convqa.compare.blocks import is_quantization
from convqa.compare.tensors import ModelComparison, TensorComparison, tolerance_for
from convqa.encodings import BY_NAME

TOKENIZER_SCALARS = ("model", "pre", "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id",
                     "add_bos_token", "add_eos_token", "chat_template_sha256")


def compare_from_manifests(ref_manifest: dict, cand_manifest: dict) -> dict | None:
    """compare_models(ref, cand).as_dict() plus {"decided_from": "manifests"} where the manifests
    prove every tensor identical and config and tokenizer equal; else None."""
    if not (_readable(ref_manifest) and _readable(cand_manifest)):
        return None
    cand = {t["name"]: t for t in cand_manifest["tensors"]}
    if {t["name"] for t in ref_manifest["tensors"]} != cand.keys():
        return None
    rows = []
    for a in ref_manifest["tensors"]:
        row = _identical_row(a, cand[a["name"]])
        if row is None:
            return None
        rows.append(row)
    if not _configs_equal(ref_manifest["config"], cand_manifest["config"]):
        return None
    if not _tokenizers_equal(ref_manifest["tokenizer"], cand_manifest["tokenizer"]):
        return None
    return {**ModelComparison(rows).as_dict(), "decided_from": "manifests"}


def _readable(manifest: dict) -> bool:
    """A manifest of an artifact that was read, with every value's digest and statistics."""
    return ("read_error" not in manifest and not manifest.get("no_artifact") and manifest.get("config") is not None
            and all("values_sha256" in t and t.get("stats") for t in manifest["tensors"]))


def _identical_row(a: dict, b: dict) -> TensorComparison | None:
    """The row compare_tensor gives for two tensors of equal finite values; None if not provable."""
    ea, eb = BY_NAME.get(a["encoding"]), BY_NAME.get(b["encoding"])
    if (ea is None or eb is None or a["shape"] != b["shape"] or a["values_sha256"] != b["values_sha256"]
            or any(t["stats"]["nan"] or t["stats"]["inf"] for t in (a, b)) or is_quantization(ea, eb)):
        return None
    return TensorComparison(
        a["name"], "identical", list(a["shape"]), list(b["shape"]), ea.name, eb.name,
        bit_exact=ea == eb, max_abs=0.0, normalized_max_abs=0.0, rel_l2=0.0, tolerance=tolerance_for(ea.name, eb.name),
        # compare_tensor counts F32 -> BF16 rounding mismatches: none where the values are equal
        # (unreached today: F32 -> BF16 is a quantization, decided by the full path).
        rounding_mismatches=0 if (ea.name, eb.name) == ("F32", "BF16") else None,
    )


def _configs_equal(a: dict, b: dict) -> bool:
    """compare_configs(...) == {} on the configs these dicts are the as_dict() of."""
    return all(a[k] == b.get(k) for k in a)


def _tokenizers_equal(a: dict | None, b: dict | None) -> bool:
    """compare_tokenizers(ref, cand) == {} for the tokenizers these are the summaries of."""
    if a is None or b is None:
        return a is None and b is None
    if any(s.get("tokens_sha256") is None or s.get("n_token_types") != s.get("n_tokens") for s in (a, b)):
        return False  # an old summary, or types not one per token: not provable
    if any(a.get(f) != b.get(f) for f in TOKENIZER_SCALARS) or a["merges_sha256"] != b["merges_sha256"]:
        return False
    if a["tokens_sha256"] == b["tokens_sha256"]:
        return a["token_types_sha256"] == b["token_types_sha256"]
    # compare_tokenizers drops the candidate's tokens past the reference's length when all are UNUSED.
    unpadded = b.get("unpadded")
    return (unpadded is not None and b["n_tokens"] > a["n_tokens"] == unpadded["n_tokens"]
            and unpadded["tokens_sha256"] == a["tokens_sha256"] and unpadded["token_types_sha256"] == a["token_types_sha256"])
