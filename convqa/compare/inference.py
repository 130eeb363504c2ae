"""Inference parity: logits and greedy generations of a candidate against a reference.

Pure numpy. Logit metrics are computed per position over the whole vocabulary:
- max |dlogit| and the same divided by max |reference logit| (scale-free across models);
- KL(reference || candidate) from float64 log-softmax: the information lost by the candidate's
  distribution, small and smooth under quantization noise, large under a layout bug;
- the KL's distribution over positions: mean, median, p99 and max (a mean hides one position
  that goes badly wrong: p99 and p99/mean show it, the statistics mlx-kld reports);
- top-1 agreement, with the disagreeing positions (argmax alone flips on near-ties, so it is
  reported with the KL, never instead of it), and top-5 agreement: the share of positions whose
  reference argmax is among the candidate's five most likely tokens (a near-tie flips the top-1
  but keeps the token in the top-5; a layout bug loses it).
Non-finite candidate logits make every distance infinite, so a threshold check can never pass
on NaN (NaN compares false both ways).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

REPLACEMENT_CHARACTER = "\ufffd"
# GGUF vocabularies are padded with `[PAD123]` tokens; text made of them means ids went astray.
PAD_TOKEN_TEXT = re.compile(r"\[PAD\d*\]?")
# A generation this long that is one token throughout is a stuck model, not an answer.
MIN_REPEAT_RUN = 4
# Above this share of junk characters the text is garbage.
MAX_JUNK_FRACTION = 0.5


@dataclass(frozen=True)
class LogitParity:
    n_positions: int
    vocab_size: int
    all_finite: bool
    max_abs_dlogit: float
    max_rel_dlogit: float  # max |dlogit| / max |reference logit|
    mean_kl: float
    max_kl: float
    kl_per_position: list[float]
    top1_agreement: float  # fraction of positions with the same argmax
    disagreeing_positions: list[int]
    median_kl: float = 0.0
    p99_kl: float = 0.0
    top5_agreement: float = 1.0  # fraction of positions whose reference argmax is in the candidate's top 5

    def as_row(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GreedyParity:
    n_reference: int
    n_candidate: int
    ids_equal: bool
    first_divergence: int | None  # first index where the sequences differ (or the shorter one ends)
    common_prefix: int

    def as_row(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GarbageVerdict:
    is_garbage: bool
    reasons: list[str]

    def as_row(self) -> dict:
        return dataclasses.asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (max-shifted, so large logits do not overflow)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_per_position(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(candidate)) at each position, float64, >= 0."""
    log_p = log_softmax(reference)
    log_q = log_softmax(candidate)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    # Rounding can leave -1e-17 where the distributions are equal.
    return np.maximum(kl, 0.0)


TOP_K = 5
KL_PERCENTILE = 99


def kl_statistics(kl) -> dict[str, float]:
    """mean, median, p99 and max of per-position KL values (inf when any is inf or NaN).

    The p99 is numpy's linear-interpolation percentile: over 40 positions it lies between the
    largest and second-largest value, so it moves with the worst few positions, not one alone.
    """
    kl = np.asarray(kl, dtype=np.float64)
    if kl.size == 0:
        raise ValueError("no KL values")
    if not np.isfinite(kl).all():
        inf = float("inf")
        return {"mean_kl": inf, "median_kl": inf, "p99_kl": inf, "max_kl": inf}
    return {"mean_kl": float(kl.mean()), "median_kl": float(np.median(kl)),
            "p99_kl": float(np.percentile(kl, KL_PERCENTILE)), "max_kl": float(kl.max())}


def top_k_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Per position: whether the reference's argmax is among the candidate's k largest logits.

    Ties at the k-th value count as inside (the rank is the number of strictly larger logits), so
    the answer does not depend on how argpartition breaks them.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    target = reference.argmax(axis=-1)
    value = np.take_along_axis(candidate, target[:, None], axis=-1)
    rank = (candidate > value).sum(axis=-1)
    return rank < k


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> LogitParity:
    """Distances between two (n_positions, vocab) logit arrays for the same token ids."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.ndim != 2 or reference.shape != candidate.shape:
        raise ValueError(
            f"logits must be two arrays of the same (n_positions, vocab) shape, got {reference.shape} and {candidate.shape}"
        )
    n_positions, vocab = reference.shape
    if n_positions == 0 or vocab == 0:
        raise ValueError(f"no logits to compare (shape {reference.shape})")
    if not np.isfinite(reference).all():
        raise ValueError("the reference logits hold NaN or Inf; a reference must be finite")
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    agree = reference.argmax(axis=-1) == candidate.argmax(axis=-1)
    disagreeing = [int(i) for i in np.flatnonzero(~agree)]
    if not np.isfinite(candidate).all():
        inf = float("inf")
        # NaN logits rank nowhere: a position with any non-finite logit is outside the top 5.
        top5 = top_k_agreement(reference, candidate) & np.isfinite(candidate).all(axis=-1)
        return LogitParity(
            n_positions, vocab, False, inf, inf, inf, inf, [inf] * n_positions, float(agree.mean()), disagreeing,
            median_kl=inf, p99_kl=inf, top5_agreement=float(top5.mean()),
        )
    max_abs = float(np.abs(reference - candidate).max())
    scale = float(np.abs(reference).max())
    kl = kl_per_position(reference, candidate)
    return LogitParity(
        n_positions=n_positions,
        vocab_size=vocab,
        all_finite=True,
        max_abs_dlogit=max_abs,
        max_rel_dlogit=max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
        kl_per_position=[float(v) for v in kl],
        top1_agreement=float(agree.mean()),
        disagreeing_positions=disagreeing,
        top5_agreement=float(top_k_agreement(reference, candidate).mean()),
        **kl_statistics(kl),
    )


def compare_greedy(reference: list[int], candidate: list[int]) -> GreedyParity:
    """Token-by-token comparison of two greedy generations."""
    reference, candidate = [int(i) for i in reference], [int(i) for i in candidate]
    common = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        common += 1
    equal = reference == candidate
    return GreedyParity(
        n_reference=len(reference),
        n_candidate=len(candidate),
        ids_equal=equal,
        first_divergence=None if equal else common,
        common_prefix=common,
    )


def detect_garbage(ids: list[int], text: str | None = None) -> GarbageVerdict:
    """Whether a generation is obviously broken: empty, stuck on one token, or junk characters.

    `text` is the decoded generation, when there is one; the id checks work without it.
    """
    reasons = []
    if len(ids) == 0:
        reasons.append("empty output: no tokens generated")
    elif len(ids) >= MIN_REPEAT_RUN and len(set(ids)) == 1:
        reasons.append(f"token {ids[0]} repeated for the whole generation ({len(ids)} tokens)")
    if text is not None and ids:
        if not text.strip():
            reasons.append("decoded text is empty or whitespace only")
        else:
            junk = text.count(REPLACEMENT_CHARACTER) + sum(len(m) for m in PAD_TOKEN_TEXT.findall(text))
            fraction = junk / len(text)
            if fraction > MAX_JUNK_FRACTION:
                reasons.append(f"{fraction:.0%} of the text is replacement characters or [PAD] tokens")
    return GarbageVerdict(is_garbage=bool(reasons), reasons=reasons)
