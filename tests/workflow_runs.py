"""Snakemake runs that several test files assert on, so that each is run once per session.

`qwen2_mvp` (conftest.py): qwen2-tiny in q8_0 through the mvp tier, the run test_workflow_run.py
asserts on (sidecars, reruns, failing converters) and that test_workflow_infer.py extends to the
smoke tier's full inference matrix in a clone, reusing its source, ground truth and q8_0 first hops.
"""

from __future__ import annotations

MODEL, VARIANT = "qwen2-tiny", "q8_0"
CONVQA_COMMAND = "convqa convert {input} {output} --to {format} {quant_arg} --json"
# Both engines on the tier's inference chains (a failed edge must leave their rows not evaluated),
# on cpu only and without servers: test_workflow_run.py asserts on neither, test_workflow_infer.py
# does (in its own run). Each gpu job still starts torch to find no device, and each server start
# loads the model again.
RUN_INFERENCE = {"backends": ["cpu"], "serve": {"mvp": []}}


def run_config(converter: str = "convqa", extra_converters: dict | None = None) -> dict:
    converters = {"convqa": {"command": CONVQA_COMMAND, "json_record": True}, **(extra_converters or {})}
    return {
        "tier": "mvp",
        "variants": [VARIANT],
        "converter": converter,
        "converters": converters,
        "inference": RUN_INFERENCE,
        "models": {MODEL: {"source": {"kind": "synthetic", "preset": "qwen2-tiny", "seed": 0}}},
    }
