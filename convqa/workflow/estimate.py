"""Before a run: roughly how much disk and CPU time a tier needs for a model, from its size.

`convqa plan MODEL_DIR --tier mvp` prints it. Disk: every chain's artifact is the model's
parameters in the encoding that chain stores (the source's dtype; Q8_0 blocks on a quantized
GGUF hop; F32 where a format cannot hold the blocks and the hop dequantizes), summed over the
tier's chains and variants; with `temp_intermediates` the peak is the source plus the artifacts
that must coexist (every parent until its children are converted and checked, plus one per
core in flight). Time: CPU seconds per job plus seconds per GB of the job's input, per kind of
job, from the measurements in bench/scale.py (README "Models of real size"); wall time on N
cores is at best CPU time / N.
"""

from __future__ import annotations

import os

from convqa.encodings import QUANT_TARGETS
from convqa.workflow import plan

GB = 1e9
Q8_0_BYTES_PER_PARAM = 34 / 32  # a block: 32 int8 values and one F16 scale
F32_BYTES = 4
# CPU seconds (user + system, from Snakemake's benchmark files; contention does not inflate them)
# per job, measured by bench/scale.py --geometry small (a 0.12 GB BF16 model: conversion 1.9,
# inspection 2.3, comparison 1.7, inference 12 per job), and per GB of the job's input, from
# issue 13's 1.5B measurements (S->G 3.8-8.4 s, S->A 9.7 s for 3.1 GB) and the F32 forward cost
# of a transformers run; the 1.5B geometry has not been measured through the bench yet.
CPU_S_PER_JOB = {"conversion": 1.9, "inspection": 2.3, "comparison": 1.7, "inference": 12.0}
CPU_S_PER_GB = {"conversion": 3.0, "inspection": 4.0, "comparison": 4.0, "inference": 40.0}


def chain_bytes_per_param(chain: str, variant: str, source_bytes_per_param: float) -> float:
    """Bytes per parameter the chain's artifact stores, following what convqa's converter does
    (measured on a BF16 source, bench/scale.py): every format holds the source's dtype while the
    values are the source's; a quantized first hop to GGUF holds the blocks, and every later hop
    holds them dequantized, in F32. (APR also stores a tied embedding twice: `estimate` adds it.)"""
    state = "source"  # the values are the source's, exactly
    per_param = source_bytes_per_param
    for i, hop in enumerate(plan.hops(chain)[1:], start=1):
        fmt = plan.HOP_FORMAT[hop]
        target = QUANT_TARGETS.get(variant, {}).get(fmt) if i == 1 and variant != "native" else None
        if target is not None and target.startswith("Q"):
            state, per_param = "blocks", Q8_0_BYTES_PER_PARAM
        elif target is not None:
            state, per_param = "source", {"F32": 4, "F16": 2, "BF16": 2}.get(target, per_param)
            source_bytes_per_param = per_param
        elif state == "blocks":
            state, per_param = "dequantized", F32_BYTES
        elif state == "dequantized":
            per_param = F32_BYTES
        else:
            per_param = source_bytes_per_param
    return per_param


def estimate(source_bytes: int, parameters: int, tier: str, variants: list[str], inference_chains: list[str],
             engines: int = 2, cores: int = 2, tied_embedding_params: int = 0) -> dict:
    """Disk and CPU-time estimate of one model through `tier` (see the module doc).
    `tied_embedding_params`: the embedding's size when the head is tied (APR stores a copy)."""
    per_param = source_bytes / max(parameters, 1)
    artifacts, parents, largest, n_compare = [], 0, 0, 0
    for variant in variants:
        chains = plan.artifact_chains(tier, variant)
        sizes = {c: chain_bytes_per_param(c, variant, per_param)
                 * (parameters + (tied_embedding_params if plan.target_format(c) == "apr" else 0)) for c in chains}
        artifacts += sizes.values()
        parents += len({plan.parent(c) for c in chains} - {"st"})
        largest = max([largest, *sizes.values()])
        # What convqa.workflow.jobs.Jobs.comparison_pairs compares: tensors-mode checks and every edge.
        pairs = {(c.subject, c.reference) for c in plan.checks_for(tier, variant) if c.mode == "tensors"}
        n_compare += len(pairs | {(c, plan.parent(c)) for c in chains})
    written = sum(artifacts)
    n_conv = len(artifacts)
    # transformers on every chain, llama.cpp on the GGUF ones; the ground truth once per model.
    converted = [c for c in inference_chains if c != "st"]
    n_infer = 1 + len(variants) * sum(1 + (engines > 1 and plan.target_format(c) == "gguf") for c in converted)
    cpu = {
        "conversion": n_conv * (CPU_S_PER_JOB["conversion"] + CPU_S_PER_GB["conversion"] * written / n_conv / GB) if n_conv else 0,
        "inspection": n_conv * CPU_S_PER_JOB["inspection"] + CPU_S_PER_GB["inspection"] * written / GB,
        "comparison": n_compare * (CPU_S_PER_JOB["comparison"] + CPU_S_PER_GB["comparison"] * 2 * source_bytes / GB),
        "inference": n_infer * (CPU_S_PER_JOB["inference"] + CPU_S_PER_GB["inference"] * source_bytes / GB),
    }
    return {
        "tier": tier,
        "variants": variants,
        "source_bytes": source_bytes,
        "parameters": parameters,
        "artifacts": n_conv,
        "written_bytes": int(written),
        "peak_bytes_with_deletion": int(source_bytes + min(written, (parents + cores) * largest)),
        "inference_jobs": n_infer,
        "cpu_seconds": round(sum(cpu.values())),
        "cpu_seconds_by_kind": {k: round(v) for k, v in cpu.items()},
        "wall_seconds_at_best": round(sum(cpu.values()) / cores),
        "cores": cores,
    }


def estimate_model(path: str | os.PathLike, tier: str, variants: list[str], inference_chains: list[str],
                   engines: int = 2, cores: int = 2) -> dict:
    """`estimate` for the model at `path` (any format convqa reads), from its header."""
    from convqa.infer.memory import artifact_shape

    from convqa.formats import open_model

    shape = artifact_shape(path)
    with open_model(path) as artifact:
        embedding = artifact.tensors.get("model.embed_tokens.weight")
        tied = artifact.config.tie_word_embeddings and embedding is not None
        tied_params = int(embedding.shape[0] * embedding.shape[1]) if tied else 0
    return estimate(shape.file_bytes, shape.parameters, tier, variants, inference_chains, engines, cores, tied_params)


def format_estimate(e: dict) -> str:
    def gb(n):
        return f"{n / GB:.2f} GB"

    return "\n".join([
        f"tier {e['tier']}, variants {', '.join(e['variants'])}: {e['artifacts']} artifacts, {e['inference_jobs']} inference runs",
        f"source: {gb(e['source_bytes'])} ({e['parameters'] / 1e9:.2f}B parameters)",
        f"disk: {gb(e['written_bytes'])} written by conversions (the peak without temp_intermediates); "
        f"about {gb(e['peak_bytes_with_deletion'])} at peak with temp_intermediates: true",
        f"time: about {e['cpu_seconds'] / 60:.0f} CPU minutes "
        f"({', '.join(f'{k} {v / 60:.0f}' for k, v in e['cpu_seconds_by_kind'].items())}); "
        f"at best {e['wall_seconds_at_best'] / 60:.0f} min wall on {e['cores']} cores",
    ])
