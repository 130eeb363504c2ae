"""The report's logit evidence and first-divergence curves, on hand-made evidence."""

from __future__ import annotations

import numpy as np
import pytest

from convqa.report.logits import divergences, logit_summary
from convqa.report.plots import divergence_png


def test_logit_summary_pools_every_position_of_every_prompt():
    details = [{"label": "q8_0/st-gguf/llama.cpp-cpu", "prompts": [
        {"prompt_id": "a", "kl_per_position": [0.1, 0.2], "top1_agreement": 0.5, "top5_agreement": 1.0, "max_abs_dlogit": 0.3},
        {"prompt_id": "b", "kl_per_position": [0.0, 0.0, 0.0, 0.9], "top1_agreement": 0.75, "top5_agreement": 0.75,
         "max_abs_dlogit": 2.0},
        {"prompt_id": "c", "error": "no chat template"},  # not compared: left out, not counted as 0
    ]}]
    (row,) = logit_summary(details)
    pooled = np.array([0.1, 0.2, 0.0, 0.0, 0.0, 0.9])
    assert row["positions"] == 6 and row["worst_prompt"] == "b" and row["max_abs_dlogit"] == 2.0
    assert row["mean_kl"] == pytest.approx(pooled.mean()) and row["median_kl"] == pytest.approx(0.05)
    assert row["p99_kl"] == pytest.approx(np.percentile(pooled, 99)) and row["max_kl"] == 0.9
    assert row["p99_over_mean"] == pytest.approx(np.percentile(pooled, 99) / pooled.mean())
    assert row["top1_agreement"] == pytest.approx((0.5 * 2 + 0.75 * 4) / 6)
    assert row["top5_agreement"] == pytest.approx((1.0 * 2 + 0.75 * 4) / 6)


def test_divergences_come_from_failing_rows_once_per_subject_and_draw_a_png():
    curve = {"baseline": "native/st/transformers", "tolerance": 0.0, "prompt_id": "p", "first": 2,
             "diagnosis": "diverges at layer 0, self_attn output",
             "points": [{"module": "e", "layer": None, "sublayer": "embedding"},
                        {"module": "l0.n", "layer": 0, "sublayer": "input_layernorm"},
                        {"module": "l0.a", "layer": 0, "sublayer": "self_attn"},
                        {"module": "lm_head", "layer": None, "sublayer": "logits"}],
             "values": [0.0, 0.0, 0.01, float("inf")]}
    row = {"family": "F-INF", "subject": "native/st-gguf/transformers", "details": {"divergence": curve}}
    evidence = {"gates": [{**row, "gate": "F-INF-gguf-cpu-run", "status": "fail"},
                          {**row, "gate": "F-INF-gguf-cpu-chat", "status": "fail"},  # the same capture
                          {**row, "gate": "F-INF-apr-cpu-run", "status": "pass", "subject": "native/st-apr/transformers"}]}
    (found,) = divergences(evidence)
    assert found["gate"] == "F-INF-gguf-cpu-run" and found["diagnosis"].startswith("diverges at layer 0")
    assert divergence_png(found).startswith(b"\x89PNG\r\n\x1a\n")
    assert divergence_png({"points": [], "values": []}) is None
