"""Before a run: roughly how much disk and CPU time a tier needs for a model, from its size.

`convqa plan MODEL_DIR --tier mvp` prints it. Disk: every chain's artifact is the model's
parameters in the encoding that chain stores (the source's dtype; Q8_0 blocks on a quantized
GGUF hop; F32 where a format cannot hold the blocks and the hop dequantizes), summed over the
tier's chains and variants, each conversion once (a chain two variants share is counted for
its owner: plan.owning_variant); with `temp_intermediates` the peak is at least the source plus
the largest conversion's input and output (exact checks are decided from the manifests and hold
nothing; which other artifacts are alive at the peak depends on the order the jobs run in).
Time: CPU seconds per job plus seconds per GB of the job's input, per kind of job, from the
measurements in bench/scale.py (README "Models of real size"); wall time on N cores is at best
CPU time / N.
"""

from __future__ import annotations

import os

from convqa.encodings import QUANT_TARGETS
from convqa.gates.edges import expected_exact
from convqa.workflow import plan

GB = 1e9
DEFAULT_SERVED = (("st-apr", "transformers"), ("st-gguf", "llama.cpp"))  # config/schema.yaml's mvp
Q8_0_BYTES_PER_PARAM = 34 / 32  # a block: 32 int8 values and one F16 scale
F32_BYTES = 4
# CPU seconds (user + system, from Snakemake's benchmark files; contention does not inflate them)
# per job and per GB of the job's input, fitted through two runs of bench/scale.py (README "Models
# of real size"): the per-job seconds from the small geometry (0.123 GB BF16: conversion 1.9,
# inspection 2.3, comparison 1.7, run 12, reference 6.3, serve 8.3, parity 2.9 s per job), the
# per-GB seconds from the 1.5B geometry at 6df9d01 (3.09 GB BF16, mvp, native + q8_0, idle
# machine, inference at 1 thread: conversion 11.3 and inspection 13.5 s per job for 4.1 GB
# artifacts on average, a lossy comparison 13.3 s (source and subject), run 59.9, reference 103,
# serve 34.9, parity 3.8; 1189 CPU s in all). An exact comparison is decided from the two
# manifests: 0.4 s whatever the model's size.
CPU_S_PER_JOB = {"conversion": 1.9, "inspection": 2.3, "comparison": 1.7, "inference": 12.0,
                 "reference": 6.3, "serve": 8.3, "parity": 2.9}
CPU_S_MANIFEST_COMPARISON = 0.4
CPU_S_PER_GB = {"conversion": 2.28, "inspection": 2.73, "comparison": 1.88, "inference": 15.5,
                "reference": 31.3, "serve": 8.6, "parity": 0.3}


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
             engines: int = 2, cores: int = 2, tied_embedding_params: int = 0,
             served: list[tuple[str, str]] = DEFAULT_SERVED) -> dict:
    """Disk and CPU-time estimate of one model through `tier` (see the module doc).
    `tied_embedding_params`: the embedding's size when the head is tied (APR stores a copy);
    `served`: the (chain, engine) pairs served per variant (config inference.serve)."""
    per_param = source_bytes / max(parameters, 1)
    artifacts, deepest_path, n_compare, n_lossy_compare = [], 0.0, 0, 0

    def own(variant: str, chain: str) -> bool:  # a conversion two variants share runs once (plan.owning_variant)
        return plan.owning_variant(variant, chain, variants) == variant

    for variant in variants:
        chains = [c for c in plan.artifact_chains(tier, variant) if own(variant, c)]
        sizes = {c: chain_bytes_per_param(c, variant, per_param)
                 * (parameters + (tied_embedding_params if plan.target_format(c) == "apr" else 0)) for c in chains}
        artifacts += sizes.values()
        # A conversion holds its input and its output at once (the source is counted below).
        deepest_path = max([deepest_path] + [sizes[c] + sizes.get(plan.parent(c), 0.0) for c in chains])
        # What convqa.workflow.jobs.Jobs.comparison_pairs compares: tensors-mode checks and every edge.
        pairs = {(c.subject, c.reference) for c in plan.checks_for(tier, variant) if c.mode == "tensors"}
        pairs |= {(c, plan.parent(c)) for c in plan.artifact_chains(tier, variant)}
        mine = [(s, r) for s, r in pairs if plan.comparison_owner(variant, s, r, variants) == variant]
        n_compare += len(mine)
        n_lossy_compare += sum(not expected_exact(s, r, variant) for s, r in mine)
    written = sum(artifacts)
    n_conv = len(artifacts)
    # transformers on every chain, llama.cpp on the GGUF ones; the ground truth once per model.
    converted = [c for c in inference_chains if c != "st"]
    n_infer = 1 + sum(1 + (engines > 1 and plan.target_format(c) == "gguf")
                      for v in variants for c in converted if own(v, c))
    # F-INF-REF: per lossy variant, one reference-quantized model per first hop of the inference chains.
    # A first hop shared with native needs none (native's bit-exact rows judge its runs: Jobs.judged_by_owner),
    # one shared by lossy variants runs once (its path is the hop's owner's).
    owners = {(plan.owning_variant(v, hop, variants), hop)
              for v in variants if v != "native" for hop in {plan.first_hop(c) for c in converted}}
    n_reference = sum(1 for owner, _hop in owners if owner != "native")
    n_serve = sum(1 for v in variants for c, _engine in served if own(v, c))
    n_parity = 1 + sum(1 for v in variants for c in converted if own(v, c))
    source_gb = source_bytes / GB

    def jobs(kind: str, n: int, gb: float) -> float:
        return n * (CPU_S_PER_JOB[kind] + CPU_S_PER_GB[kind] * gb)

    cpu = {
        "conversion": jobs("conversion", n_conv, written / n_conv / GB) if n_conv else 0,
        "inspection": jobs("inspection", n_conv, written / n_conv / GB) if n_conv else 0,
        # An exact comparison is decided from the two manifests (convqa.compare.manifests): no tensor read.
        "comparison": jobs("comparison", n_lossy_compare, 2 * source_gb) + (n_compare - n_lossy_compare) * CPU_S_MANIFEST_COMPARISON,
        "inference": jobs("inference", n_infer, source_gb),
        "reference": jobs("reference", n_reference, source_gb),
        "serve": jobs("serve", n_serve, source_gb),
        "parity": jobs("parity", n_parity, source_gb),
    }
    return {
        "tier": tier,
        "variants": variants,
        "source_bytes": source_bytes,
        "parameters": parameters,
        "artifacts": n_conv,
        "written_bytes": int(written),
        # A lower bound: the source, and the largest conversion's input and output. Measured at 1.5B:
        # 23.3 GB with profiles/default's conversion_slots (a conversion that writes F32 from a BF16
        # source runs alone), where this says 16.4 GB (q8_0's F32 st-gguf-apr -> st-gguf-apr-gguf);
        # 38.7 GB with two conversions at once whatever they write.
        "peak_bytes_with_deletion": int(source_bytes + deepest_path),
        "inference_jobs": n_infer + n_reference + n_serve,
        "jobs_by_kind": {"conversion": n_conv, "inspection": n_conv, "comparison": n_compare, "inference": n_infer,
                         "reference": n_reference, "serve": n_serve, "parity": n_parity},
        "cpu_seconds": round(sum(cpu.values())),
        "cpu_seconds_by_kind": {k: round(v) for k, v in cpu.items()},
        "wall_seconds_at_best": round(sum(cpu.values()) / cores),
        "cores": cores,
    }


def estimate_model(path: str | os.PathLike, tier: str, variants: list[str], inference_chains: list[str],
                   engines: int = 2, cores: int = 2, served: list[tuple[str, str]] = DEFAULT_SERVED) -> dict:
    """`estimate` for the model at `path` (any format convqa reads), from its header. The source
    the workflow converts from is what prepare_source makes of it: a quantized GGUF or APR is
    imported with its quantized tensors dequantized to F32 (SmolLM2's 0.10 GB Q4_1 GGUF is a
    0.54 GB ground truth), so those tensors count at 4 bytes per value."""
    from convqa.infer.memory import artifact_shape

    from convqa.formats import open_model

    shape = artifact_shape(path)
    with open_model(path) as artifact:
        embedding = artifact.tensors.get("model.embed_tokens.weight")
        tied = artifact.config.tie_word_embeddings and embedding is not None
        tied_params = int(embedding.shape[0] * embedding.shape[1]) if tied else 0
        dequantized_growth = sum(t.n_elements * F32_BYTES - t.nbytes
                                 for t in artifact.tensors.values() if t.encoding.is_quantized)
    return estimate(shape.file_bytes + dequantized_growth, shape.parameters, tier, variants, inference_chains,
                    engines, cores, tied_params, served=served)


def format_estimate(e: dict) -> str:
    def gb(n):
        return f"{n / GB:.2f} GB"

    return "\n".join([
        f"tier {e['tier']}, variants {', '.join(e['variants'])}: {e['artifacts']} artifacts, "
        f"{e['inference_jobs']} inference jobs (runs, reference models, servers)",
        f"source: {gb(e['source_bytes'])} ({e['parameters'] / 1e9:.2f}B parameters)",
        f"disk: {gb(e['written_bytes'])} written by conversions (the peak without temp_intermediates); "
        f"at least {gb(e['peak_bytes_with_deletion'])} at peak with temp_intermediates: true "
        f"(what the checks keep alive; jobs run late can keep more), the source's {gb(e['source_bytes'])} "
        f"included: a local or hub checkpoint on the filesystem of results/ is hard-linked, not copied, "
        f"and then needs no more",
        f"time: about {e['cpu_seconds'] / 60:.0f} CPU minutes "
        f"({', '.join(f'{k} {v / 60:.0f}' for k, v in e['cpu_seconds_by_kind'].items())}); "
        f"at best {e['wall_seconds_at_best'] / 60:.0f} min wall on {e['cores']} cores",
    ])
