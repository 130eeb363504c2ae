"""The qualification plan: which conversion chains to build and which gate checks to run.

Both the Snakefile (to request exactly these artifacts) and the gate evaluation use this one
description, so the DAG and the report cannot drift apart. A chain is named by its hops from
the SafeTensors ground truth, `st-gguf-apr`; an independent re-run of a conversion is the same
chain with a `.runN` suffix (`st-gguf.run2`). The chain `st` is the source itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HOP_FORMAT = {"st": "safetensors", "gguf": "gguf", "apr": "apr"}
EDGE_GATE = {
    ("st", "gguf"): "F-CONV-S-G",
    ("st", "apr"): "F-CONV-S-A",
    ("gguf", "apr"): "F-CONV-G-A",
    ("apr", "gguf"): "F-CONV-A-G",
    ("gguf", "st"): "F-CONV-G-S",
    ("apr", "st"): "F-CONV-A-S",
}
# Chain names as regular expressions (unanchored, for Snakemake's wildcard constraints).
_HOP = "(?:" + "|".join(HOP_FORMAT) + ")"
_RUN = r"(?:\.run[0-9]+)?"
CHAIN_PATTERN = rf"st(?:-{_HOP})*{_RUN}"  # any chain, the source `st` included
CONVERTED_CHAIN_PATTERN = rf"st(?:-{_HOP})+{_RUN}"  # every chain but the source
FIRST_HOP_PATTERN = rf"st-{_HOP}"  # a first hop out of S, no re-run suffix
CHAIN_RE = re.compile(f"^{CHAIN_PATTERN}$")


def chain_pattern(last_hop: str) -> str:
    """Chains whose last hop is `last_hop` (`gguf`: st-gguf, st-apr-gguf.run2, ...)."""
    return rf"st(?:-{_HOP})*-{last_hop}{_RUN}"


@dataclass(frozen=True)
class Check:
    """One comparison the gates need: `gate` compares `subject` against `reference`.

    mode "tensors": canonical tensor/config/tokenizer comparison; "bytes": file hashes equal.
    """

    gate: str
    subject: str
    reference: str
    mode: str = "tensors"


def hops(chain: str) -> list[str]:
    if not CHAIN_RE.match(chain):
        raise ValueError(f"bad chain name {chain!r}: expected st-<fmt>-... with fmt in st, gguf, apr, optional .runN")
    return chain.split(".")[0].split("-")


def parent(chain: str) -> str:
    """The chain this one converts from: `st-gguf-apr` -> `st-gguf`; `st-gguf.run2` -> `st`."""
    h = hops(chain)
    if len(h) == 1:
        raise ValueError("the source chain 'st' has no parent")
    return "-".join(h[:-1])


def repeated_chain(chain: str) -> str | None:
    """The conversion a re-run repeats (`st-gguf-apr.run2` -> `st-gguf-apr`); None for a chain
    that is not a re-run."""
    hops(chain)  # a bad name is an error, not None
    base, _, run = chain.partition(".")
    return base if run else None


def target_format(chain: str) -> str:
    return HOP_FORMAT[hops(chain)[-1]]


def edge(chain: str) -> tuple[str, str]:
    h = hops(chain)
    return h[-2], h[-1]


def is_first_hop(chain: str) -> bool:
    return len(hops(chain)) == 2


def first_hop(chain: str) -> str:
    """The conversion that left SafeTensors: `st-gguf-apr` -> `st-gguf`; `st-apr.run2` -> `st-apr`."""
    h = hops(chain)
    if len(h) == 1:
        raise ValueError("the source chain 'st' has no first hop")
    return "-".join(h[:2])


# Tiers: what each target builds and checks. Each later tier contains the earlier one.
_SMOKE_CHECKS = [
    Check("F-CONV-S-G", "st-gguf", "st"),
    Check("F-CONV-S-A", "st-apr", "st"),
]
_MVP_CHECKS = _SMOKE_CHECKS + [
    Check("F-CONV-G-A", "st-gguf-apr", "st-gguf"),
    Check("F-CONV-A-G", "st-apr-gguf", "st-apr"),
    Check("F-CONV-G-S", "st-gguf-st", "st-gguf"),
    Check("F-CONV-A-S", "st-apr-st", "st-apr"),
    Check("F-CONV-RT-001", "st-apr-gguf-apr", "st-apr"),
    Check("F-CONV-RT-002", "st-gguf-apr-gguf", "st-gguf"),
    Check("F-CONV-RT-003", "st-gguf-st", "st"),
    Check("F-CONV-RT-003", "st-apr-st", "st"),
    Check("F-CONV-IDEM-001", "st-gguf.run2", "st-gguf", "bytes"),
    Check("F-CONV-IDEM-001", "st-apr.run2", "st-apr", "bytes"),
    Check("F-CONV-IDEM-001", "st-gguf-apr.run2", "st-gguf-apr", "bytes"),
    # Fixpoint on content (tensors, encodings, config, tokenizer), not bytes: each file's
    # provenance legitimately records its own hop (e.g. "dequantized Q8_0" only where it happened).
    Check("F-CONV-IDEM-002", "st-apr-gguf-apr-gguf", "st-apr-gguf"),
    Check("F-CONV-IDEM-002", "st-gguf-apr-gguf-apr", "st-gguf-apr"),
    Check("F-CONV-COM-001", "st-gguf-apr", "st-apr"),
    Check("F-CONV-COM-001", "st-gguf-st-apr", "st-gguf-apr"),
]
_FULL_CHECKS = _MVP_CHECKS + [
    Check("F-CONV-IDEM-001", "st-apr-gguf.run2", "st-apr-gguf", "bytes"),
    Check("F-CONV-IDEM-001", "st-gguf-st.run2", "st-gguf-st", "bytes"),
    Check("F-CONV-COM-001", "st-apr-st-gguf", "st-gguf"),
]
# The detection tiers (`snakemake detection`, rules/detection.smk) are not part of the
# smoke < mvp < full ladder: the fewest chains on which the converter mutants show, so the
# detection run qualifies one model per mutant in minutes. `detection`: both first hops and one
# re-run of each (idempotency), for a mutant on a first hop, whose broken output the correct
# converter would refuse to convert further. `detection-downstream` adds the GGUF -> APR edge
# (GH-191 is a GGUF -> APR bug), for a mutant there and for the correct converter.
_DETECTION_CHECKS = _SMOKE_CHECKS + [
    Check("F-CONV-IDEM-001", "st-gguf.run2", "st-gguf", "bytes"),
    Check("F-CONV-IDEM-001", "st-apr.run2", "st-apr", "bytes"),
]
_DETECTION_DOWNSTREAM_CHECKS = _DETECTION_CHECKS + [
    Check("F-CONV-G-A", "st-gguf-apr", "st-gguf"),
]
TIER_CHECKS = {"smoke": _SMOKE_CHECKS, "mvp": _MVP_CHECKS, "full": _FULL_CHECKS, "detection": _DETECTION_CHECKS,
               "detection-downstream": _DETECTION_DOWNSTREAM_CHECKS}


def checks_for(tier: str, variant: str) -> list[Check]:
    """Checks for one variant. Quantized variants lose bit-exactness only on the first hop, so all
    later hops are still held to exact equality by the gates (convqa.gates.edges)."""
    try:
        return list(TIER_CHECKS[tier])
    except KeyError:
        raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIER_CHECKS)}") from None


def chains_for(tier: str, variant: str) -> list[str]:
    """Every artifact chain a tier needs, source first, parents before children."""
    names = {"st"}
    for check in checks_for(tier, variant):
        for chain in (check.subject, check.reference):
            names.add(chain)
            base = chain.split(".")[0]
            h = base.split("-")
            for i in range(1, len(h)):
                names.add("-".join(h[:i]))
    return sorted(names, key=lambda c: (len(hops(c)), c))


def artifact_chains(tier: str, variant: str) -> list[str]:
    """Chains that are conversions (everything but the source)."""
    return [c for c in chains_for(tier, variant) if c != "st"]


# ---------------------------------------------------------------- variants sharing conversions


def variant_quant(variant: str, fmt: str) -> str | None:
    """The quantization a variant applies on the first hop from S to `fmt`.

    None keeps the source dtypes: for `native`, and where the format has no encoding for the
    variant (APR holds no GGML Q8_0 blocks; `apr import` without --quantize keeps F32 too).
    """
    from convqa.encodings import QUANT_TARGETS

    if variant == "native" or fmt not in QUANT_TARGETS[variant]:
        return None
    return variant


def edge_quant(variant: str, chain: str) -> str | None:
    """Quantize on the first hop out of S only; later hops keep what they receive."""
    if is_first_hop(chain):
        return variant_quant(variant, target_format(chain))
    return None


def owning_variant(variant: str, chain: str, variants: list[str]) -> str:
    """The variant whose directory holds `variant`'s conversion of `chain`: the first of
    `variants` (native first) whose first hop out of S applies the same quantization.

    Only the first hop quantizes, and the converter of an edge does not depend on the variant, so
    two variants that agree on the first hop run the same commands on the same bytes all along
    the chain: q8_0 quantizes only S->G, so its whole S->A family (st-apr, st-apr-gguf, ...,
    st-apr.run2) is native's, and is converted, inspected, compared and run once. The rows of
    both variants read the one artifact.
    """
    if chain == "st" or set(variants) <= {variant}:
        return variant
    quant = edge_quant(variant, first_hop(chain))
    for candidate in sorted(variants, key=lambda v: v != "native"):
        if edge_quant(candidate, first_hop(chain)) == quant:
            return candidate
    return variant


def comparison_owner(variant: str, subject: str, reference: str, variants: list[str]) -> str:
    """The variant whose directory holds `variant`'s comparison of `subject` with `reference`:
    the owner of both artifacts when they share one (the same bytes on both sides), else the
    variant itself (S->G->A of q8_0 against S->A, which is native's, is q8_0's own check)."""
    owners = {owning_variant(variant, c, variants) for c in (subject, reference) if c != "st"}
    return owners.pop() if len(owners) == 1 else variant
