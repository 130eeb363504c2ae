"""F-BACKEND-001: does the gpu backend agree with the cpu backend? Judged from recorded runs.

Per engine, the same input run on both backends (convqa.workflow.references.backend_pairs):
transformers on the SafeTensors source (the ground truth of each backend), llama.cpp on each
GGUF it runs on both. The logits are held to `inference.backend_tolerances[engine]`: different
kernels sum in a different order, so bit-exactness is not expected, but a backend that drifts
past float32 reduction noise (TF32 left on, a broken CUDA kernel, a wrong offload) shows here.

This gate judges the machine, never the conversion. Every conversion row (F-INF, F-INF-REF) is
judged on one backend against that backend's own ground truth, so a backend difference can
neither fail a perfect conversion nor excuse a broken one; the registry marks this gate
`verdict=False` and the report counts its rows apart (convqa.report.evidence.summarize).
"""

from __future__ import annotations

from convqa.gates.inference import _upstream_failure, compare_runs, judge, subject_of
from convqa.gates.rows import FAIL, SKIPPED, GateRow
from convqa.infer.prompts import RUN
from convqa.workflow.references import backend_pairs

BACKEND_GATE = "F-BACKEND-001"


def backend_rows(model: str, variant: str, runs: dict, tolerances: dict) -> list[GateRow]:
    """F-BACKEND-001 rows: one per (engine, input) run on both backends, run prompts (the chat
    prompts add nothing about kernels). runs: (chain, engine, backend) -> loaded run record;
    tolerances: engine -> tolerance (no entry: not evaluated)."""
    rows = []
    for gpu, cpu in backend_pairs(runs):
        row = GateRow(BACKEND_GATE, f"{subject_of(variant, gpu.chain, gpu.engine)}-gpu",
                      reference=f"{subject_of(variant, cpu.chain, cpu.engine)}-cpu", model=model, variant=variant)
        on_gpu, on_cpu = runs[gpu.key], runs[cpu.key]
        if on_gpu.get("skipped"):
            row.status, row.reason = SKIPPED, on_gpu["skipped"]
        elif upstream := _upstream_failure(on_gpu) or _upstream_failure(on_cpu):
            row.reason = upstream
        elif on_cpu.get("skipped") or on_cpu.get("error"):
            row.reason = f"the cpu run it is compared with did not run: {(on_cpu.get('error') or on_cpu['skipped'])[:400]}"
        elif on_gpu.get("error"):
            row.status, row.reason = FAIL, f"the gpu run failed: {on_gpu['error'][:480]}"
        else:
            judge(row, compare_runs(on_cpu, on_gpu, RUN), tolerances.get(gpu.engine))
            if row.status == "not_evaluated" and gpu.engine not in tolerances:
                row.reason = f"no backend tolerance configured for {gpu.engine} (inference.backend_tolerances)"
        rows.append(row)
    return rows
