# Paths, the inference matrix and input functions of rules/infer.smk (helpers only, like common.smk).

INFERENCE = config["inference"]
INFERENCE_ENGINE_FILE = {"transformers": "transformers", "llama.cpp": "llamacpp"}
INFERENCE_ENGINE_NAME = {v: k for k, v in INFERENCE_ENGINE_FILE.items()}
CONVERTED_CHAIN = "st(?:-(?:st|gguf|apr))+(?:\\.run[0-9]+)?"
# Gate evaluation reads JSON and .npz only; runs and servers execute the engines.
INFERENCE_GATES_FINGERPRINT = fingerprint(
    (
        "convqa.gates.inference_table",
        "convqa.gates.inference",
        "convqa.compare.inference",
    ),
    (),
)
INFERENCE_RUN_FINGERPRINT = fingerprint(
    (
        "convqa.infer.run",
        "convqa.infer.isolated",
        "convqa.infer.prompts",
        "convqa.infer.engines.base",
        "convqa.infer.engines.transformers_engine",
        "convqa.infer.engines.llamacpp_engine",
        "convqa.infer.server.__main__",
    ),
    (),
)


wildcard_constraints:
    engine="|".join(INFERENCE_ENGINE_FILE.values()),
    backend="cpu|gpu",


# ---------------------------------------------------------------- paths


def inference_dir(model, variant, chain):
    if chain == SOURCE_CHAIN:
        return f"results/{model}/source.infer"
    return f"{chain_dir(model, variant, chain)}/infer"


def inference_run_path(model, variant, chain, engine, backend, ext="json"):
    """`engine` is the engine's file name (llamacpp), so no wildcard holds a dot."""
    return f"{inference_dir(model, variant, chain)}/{engine}-{backend}.{ext}"


def reference_run_path(model, variant, hop, ext="json"):
    """The reference-quantized model's run (convqa.infer.reference_model) for one first hop."""
    return f"results/{model}/{variant}/reference/{hop}/transformers-cpu.{ext}"


def serve_path(model, variant, chain, engine):
    return f"{inference_dir(model, variant, chain)}/serve-{engine}.json"


def inference_gates_path(model, variant, tier):
    return f"results/{model}/{variant}/gates/{tier}/inference.tsv"


def inference_extra_path(model, variant, tier):
    return f"results/{model}/{variant}/gates/{tier}/inference-extra.json"


# ---------------------------------------------------------------- the matrix


def inference_engines(chain):
    """Engines that read the chain's artifact: llama.cpp only reads GGUF."""
    fmt = artifact_format(chain)
    return [e for e in INFERENCE["engines"] if e == "transformers" or fmt == "gguf"]


def inference_cells(tier):
    """(chain, engine, backend) of every run: the ground truth plus the tier's chains."""
    cells = {(SOURCE_CHAIN, "transformers", "cpu")}
    for chain in INFERENCE["chains"][tier]:
        for engine in inference_engines(chain):
            for backend in INFERENCE["backends"]:
                cells.add((chain, engine, backend))
    return sorted(cells)


def reference_hops(variant, tier):
    """First hops whose reference-quantized model runs: those of the tier's inference chains, for
    a variant with reference tolerances (config inference.reference_tolerances)."""
    if variant not in INFERENCE["reference_tolerances"]:
        return []
    chains = [c for c in INFERENCE["chains"][tier] if c != SOURCE_CHAIN]
    return sorted({plan.first_hop(c) for c in chains})


def served_cells(tier):
    """(chain, engine) pairs served over HTTP in `tier` (config inference.serve)."""
    if "serve" not in INFERENCE["modalities"]:
        return []
    every = {
        (chain, engine)
        for chain in INFERENCE["chains"][tier]
        for engine in inference_engines(chain)
    }
    wanted = INFERENCE["serve"][tier]
    if "all" in wanted:
        return sorted(every)
    pairs = {tuple(item.split(":", 1)) for item in wanted}
    unknown = sorted(f"{c}:{e}" for c, e in pairs - every)
    if unknown:
        raise WorkflowError(
            f"config: inference.serve.{tier} names {', '.join(unknown)}, which the tier does not run "
            f"(its inference chains are {', '.join(INFERENCE['chains'][tier])}; llama.cpp reads only GGUF)"
        )
    return sorted(pairs)


def inference_input_map(model, variant, tier):
    """What the inference gates read, keyed `chain|engine|backend` and `chain|engine`."""
    return {
        "runs": {
            f"{c}|{e}|{b}": {
                "json": inference_run_path(
                    model, variant, c, INFERENCE_ENGINE_FILE[e], b
                ),
                "npz": inference_run_path(
                    model, variant, c, INFERENCE_ENGINE_FILE[e], b, "npz"
                ),
            }
            for c, e, b in inference_cells(tier)
        },
        "serves": {
            f"{c}|{e}": serve_path(model, variant, c, INFERENCE_ENGINE_FILE[e])
            for c, e in served_cells(tier)
        },
        "references": {
            hop: {
                "json": reference_run_path(model, variant, hop),
                "npz": reference_run_path(model, variant, hop, "npz"),
            }
            for hop in reference_hops(variant, tier)
        },
    }


def inference_gate_inputs(wildcards):
    inputs = inference_input_map(wildcards.model, wildcards.variant, wildcards.tier)
    runs = list(inputs["runs"].values()) + list(inputs["references"].values())
    paths = [p for run in runs for p in run.values()]
    # The source's manifest says its dtypes, which pick the tolerances (select_tolerances).
    return sorted(paths + list(inputs["serves"].values())) + [
        source_manifest_path(wildcards.model)
    ]


def inference_gate_params(wildcards):
    return {
        **inference_input_map(wildcards.model, wildcards.variant, wildcards.tier),
        "source_manifest": source_manifest_path(wildcards.model),
    }


def inference_tolerances(wildcards):
    """The variant's tolerances and its per-source-dtype refinements (`native@bf16`, ...);
    convqa.gates.inference.select_tolerances picks with the source manifest."""
    return {
        key: value
        for key, value in INFERENCE["tolerances"].items()
        if key == wildcards.variant or key.startswith(wildcards.variant + "@")
    }


def reference_tolerances(wildcards):
    return INFERENCE["reference_tolerances"].get(wildcards.variant, {})


def encoded_artifact(wildcards):
    """The source, and the first-hop artifact whose encodings the reference reproduces."""
    return {
        "source": source_dir(wildcards.model),
        "encoded": artifact_path(wildcards.model, wildcards.variant, wildcards.hop),
    }


def inference_report_inputs(wildcards):
    return [
        path
        for variant in model_variants(wildcards.model)
        for path in (
            inference_gates_path(wildcards.model, variant, wildcards.tier),
            inference_extra_path(wildcards.model, variant, wildcards.tier),
        )
    ]


def inference_report_params(wildcards):
    return {
        "gate_tsvs": [
            inference_gates_path(wildcards.model, v, wildcards.tier)
            for v in model_variants(wildcards.model)
        ],
        "extras": [
            inference_extra_path(wildcards.model, v, wildcards.tier)
            for v in model_variants(wildcards.model)
        ],
    }


def inferred_artifact(wildcards):
    chain = getattr(wildcards, "chain", SOURCE_CHAIN)
    return {
        "artifact": artifact_path(
            wildcards.model, getattr(wildcards, "variant", ""), chain
        ),
        "source": source_dir(wildcards.model),
    }


def gpu_count(wildcards):
    return 1 if wildcards.backend == "gpu" else 0


def engine_name(wildcards):
    return INFERENCE_ENGINE_NAME[wildcards.engine]
