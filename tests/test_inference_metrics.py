"""Inference parity metrics on hand-made logits and generations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from convqa.compare.inference import (
    compare_greedy,
    compare_logits,
    detect_garbage,
    kl_per_position,
    log_softmax,
)

RNG = np.random.default_rng(0)
REFERENCE = RNG.normal(0.0, 3.0, size=(6, 50)).astype(np.float32)


def test_identical_logits_give_zero_distance_and_full_agreement():
    parity = compare_logits(REFERENCE, REFERENCE.copy())
    assert parity.max_abs_dlogit == 0.0 and parity.max_rel_dlogit == 0.0
    assert parity.mean_kl == 0.0 and parity.max_kl == 0.0 and parity.kl_per_position == [0.0] * 6
    assert parity.top1_agreement == 1.0 and parity.disagreeing_positions == []
    assert parity.all_finite and parity.n_positions == 6 and parity.vocab_size == 50


def test_a_constant_shift_changes_logits_but_not_the_distribution():
    parity = compare_logits(REFERENCE, REFERENCE + 5.0)
    assert parity.max_abs_dlogit == pytest.approx(5.0, rel=1e-6)
    assert parity.max_rel_dlogit == pytest.approx(5.0 / np.abs(REFERENCE).max(), rel=1e-6)
    assert parity.max_kl < 1e-12 and parity.top1_agreement == 1.0


def test_a_permuted_vocabulary_is_far_away():
    permuted = REFERENCE[:, RNG.permutation(50)]
    parity = compare_logits(REFERENCE, permuted)
    assert parity.mean_kl > 1.0
    assert parity.top1_agreement < 0.5
    assert parity.disagreeing_positions == [i for i in range(6) if REFERENCE[i].argmax() != permuted[i].argmax()]


def test_small_noise_gives_small_kl_and_reports_the_flipped_position():
    candidate = REFERENCE + RNG.normal(0.0, 1e-3, size=REFERENCE.shape).astype(np.float32)
    top = REFERENCE[2].argmax()
    candidate[2, top] = REFERENCE[2].max() - 100.0  # position 2 loses its argmax
    parity = compare_logits(REFERENCE, candidate)
    assert parity.disagreeing_positions == [2] and parity.top1_agreement == pytest.approx(5 / 6)
    assert max(parity.kl_per_position[:2] + parity.kl_per_position[3:]) < 1e-5
    assert parity.kl_per_position[2] == parity.max_kl > 1e-3


def test_kl_matches_the_definition_and_is_asymmetric():
    p_logits = np.array([[2.0, 0.0, -1.0]])
    q_logits = np.array([[0.0, 0.0, 0.0]])
    p = np.exp(p_logits) / np.exp(p_logits).sum()
    expected = float((p * np.log(p / (1 / 3))).sum())
    assert kl_per_position(p_logits, q_logits)[0] == pytest.approx(expected, rel=1e-12)
    assert kl_per_position(q_logits, p_logits)[0] != pytest.approx(expected, rel=1e-3)
    # Large logits must not overflow the softmax.
    big = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
    assert np.isfinite(log_softmax(big)).all()
    assert kl_per_position(big, big)[0] == 0.0


def test_non_finite_candidate_fails_every_threshold():
    candidate = REFERENCE.copy()
    candidate[3, 7] = np.nan
    parity = compare_logits(REFERENCE, candidate)
    assert not parity.all_finite
    assert math.isinf(parity.max_abs_dlogit) and math.isinf(parity.max_kl) and math.isinf(parity.mean_kl)
    assert not parity.max_kl <= 1e9  # a "<= tolerance" gate cannot pass


def test_shapes_must_match_and_be_non_empty():
    with pytest.raises(ValueError, match="same"):
        compare_logits(REFERENCE, REFERENCE[:, :49])
    with pytest.raises(ValueError, match="same"):
        compare_logits(REFERENCE[0], REFERENCE[0])
    with pytest.raises(ValueError, match="no logits"):
        compare_logits(np.zeros((0, 50)), np.zeros((0, 50)))
    bad = REFERENCE.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="reference"):
        compare_logits(bad, REFERENCE)


def test_rows_are_json_serialisable():
    row = compare_logits(REFERENCE, REFERENCE * 1.01).as_row()
    assert json.loads(json.dumps(row))["n_positions"] == 6
    assert json.loads(json.dumps(compare_greedy([1, 2], [1, 3]).as_row()))["first_divergence"] == 1
    assert json.loads(json.dumps(detect_garbage([]).as_row()))["is_garbage"] is True


def test_greedy_comparison():
    same = compare_greedy([5, 6, 7], [5, 6, 7])
    assert same.ids_equal and same.first_divergence is None and same.common_prefix == 3
    diverged = compare_greedy([5, 6, 7, 8], [5, 6, 9, 8])
    assert not diverged.ids_equal and diverged.first_divergence == 2 and diverged.common_prefix == 2
    shorter = compare_greedy([5, 6, 7], [5, 6])  # stopped early: diverges where it ends
    assert not shorter.ids_equal and shorter.first_divergence == 2 and shorter.n_candidate == 2
    assert compare_greedy([], []).ids_equal


@pytest.mark.parametrize(
    "ids, text, reason",
    [
        ([], None, "empty output"),
        ([], "", "empty output"),
        ([42] * 8, None, "token 42 repeated for the whole generation (8 tokens)"),
        ([1, 2, 3], "   \n", "whitespace only"),
        ([1, 2, 3, 4], "\ufffd\ufffd\ufffda", "replacement characters"),
        ([9, 9, 7], "[PAD9][PAD9]ok", "[PAD] tokens"),
    ],
)
def test_garbage_is_detected(ids, text, reason):
    verdict = detect_garbage(ids, text)
    assert verdict.is_garbage
    assert any(reason in r for r in verdict.reasons), verdict.reasons


@pytest.mark.parametrize(
    "ids, text",
    [
        ([504, 3575, 282, 4649, 314, 7042, 30, 2], "The capital of France is Paris."),
        ([7, 7, 7], "..."),  # too short to call a repetition
        ([1, 2, 3, 4], "caf\ufffd au lait"),  # one stray replacement character is not garbage
    ],
)
def test_normal_output_is_not_garbage(ids, text):
    verdict = detect_garbage(ids, text)
    assert not verdict.is_garbage and verdict.reasons == []


# ---------------------------------------------------------------- KL distribution and top-5

def boosted_kl(vocab: int, a: float) -> float:
    """KL(uniform || softmax with one logit raised by a), in closed form:
    q = e^a / Z at the raised token and 1 / Z elsewhere, Z = vocab - 1 + e^a, so
    KL = sum_i (1/V) log((1/V) / q_i) = log Z - log V - a / V."""
    return math.log(vocab - 1 + math.exp(a)) - math.log(vocab) - a / vocab


def test_kl_mean_median_p99_and_max_match_the_closed_form():
    vocab, raises = 40, np.linspace(0.0, 6.0, 100)
    reference = np.zeros((100, vocab))
    candidate = np.zeros((100, vocab))
    candidate[np.arange(100), 7] = raises  # position i: token 7 raised by raises[i]
    expected = np.array([boosted_kl(vocab, a) for a in raises])
    parity = compare_logits(reference, candidate)
    assert parity.kl_per_position == pytest.approx(list(expected), rel=1e-9, abs=1e-15)
    assert parity.mean_kl == pytest.approx(expected.mean(), rel=1e-9)
    # Even count: the median is the mean of the two middle values; KL grows with the raise.
    assert parity.median_kl == pytest.approx((expected[49] + expected[50]) / 2, rel=1e-9)
    # Linear interpolation at rank 0.99 * 99 = 98.01: between the two largest values.
    assert parity.p99_kl == pytest.approx(expected[98] + 0.01 * (expected[99] - expected[98]), rel=1e-9)
    assert parity.max_kl == pytest.approx(boosted_kl(vocab, 6.0), rel=1e-9)
    assert parity.median_kl < parity.mean_kl < parity.p99_kl < parity.max_kl


def test_a_few_bad_positions_show_in_p99_where_the_mean_averages_them_away():
    vocab = 40
    reference, candidate = np.zeros((1000, vocab)), np.zeros((1000, vocab))
    candidate[:, 3] = 0.1
    candidate[-20:, 3] = 8.0  # 2% of the positions go badly wrong
    parity = compare_logits(reference, candidate)
    small, large = boosted_kl(vocab, 0.1), boosted_kl(vocab, 8.0)
    assert parity.median_kl == pytest.approx(small, rel=1e-9)
    assert parity.mean_kl == pytest.approx((980 * small + 20 * large) / 1000, rel=1e-9)
    assert parity.p99_kl == pytest.approx(large, rel=1e-9)  # rank 989.01 lies among the bad 20
    assert parity.p99_kl / parity.mean_kl > 40 and parity.max_kl == pytest.approx(large, rel=1e-9)


@pytest.mark.parametrize("rank, top1, top5", [(0, 1.0, 1.0), (2, 0.0, 1.0), (4, 0.0, 1.0), (5, 0.0, 0.0), (20, 0.0, 0.0)])
def test_top5_counts_the_reference_argmax_within_the_candidates_five_largest(rank, top1, top5):
    vocab = 30
    reference = np.zeros((1, vocab))
    reference[0, 0] = 10.0  # the reference's argmax is token 0
    candidate = np.zeros((1, vocab))
    candidate[0, 1:] = -np.arange(1, vocab)  # tokens 1, 2, ... in decreasing order
    candidate[0, 0] = -rank - 0.5  # exactly `rank` tokens above token 0
    parity = compare_logits(reference, candidate)
    assert (parity.top1_agreement, parity.top5_agreement) == (top1, top5)


def test_non_finite_candidate_makes_every_kl_statistic_infinite():
    candidate = REFERENCE.copy()
    candidate[2, 5] = np.nan
    parity = compare_logits(REFERENCE, candidate)
    assert parity.median_kl == parity.p99_kl == parity.mean_kl == parity.max_kl == float("inf")
    assert parity.top5_agreement == pytest.approx(5 / 6)  # the NaN position ranks nowhere
