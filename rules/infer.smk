# The inference matrix: every artifact of the tier's inference chains under every engine that
# can read it (transformers: all formats; llama.cpp: GGUF) on every backend, the HTTP servers,
# and the inference gate table per (model, variant, tier). The ground truth is transformers on
# cpu over the SafeTensors source, run once per model (not per variant).
#
# results/{model}/source.infer/{engine}-{backend}.json|.npz      the ground truth's runs
# results/{model}/{variant}/{chain}/infer/{engine}-{backend}.json|.npz
# results/{model}/{variant}/{chain}/infer/serve-{engine}.json
# results/{model}/{variant}/reference/{hop}/transformers-cpu.json|.npz   reference-quantized model
# results/{model}/{variant}/gates/{tier}/inference.tsv, inference-extra.json


rule infer:
    input:
        unpack(inferred_artifact),
    output:
        json=inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}"
        ),
        npz=inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}", "npz"
        ),
    log:
        run=inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}", "log"
        ),
        engine=inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}", "engine.log"
        ),
    benchmark:
        inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}", "benchmark.tsv"
        )
    wildcard_constraints:
        chain=CONVERTED_CHAIN,
    conda:
        "../envs/convert.yaml"
    threads: INFERENCE["threads"]
    resources:
        gpu=gpu_count,
    params:
        engine=engine_name,
        max_new_tokens=INFERENCE["max_new_tokens"],
        timeout_s=INFERENCE["timeout_s"],
        fingerprint=INFERENCE_RUN_FINGERPRINT,
    script:
        "../scripts/infer.py"


use rule infer as infer_source with:
    output:
        json=inference_run_path("{model}", "", SOURCE_CHAIN, "{engine}", "{backend}"),
        npz=inference_run_path(
            "{model}", "", SOURCE_CHAIN, "{engine}", "{backend}", "npz"
        ),
    log:
        run=inference_run_path(
            "{model}", "", SOURCE_CHAIN, "{engine}", "{backend}", "log"
        ),
        engine=inference_run_path(
            "{model}", "", SOURCE_CHAIN, "{engine}", "{backend}", "engine.log"
        ),
    benchmark:
        inference_run_path(
            "{model}", "", SOURCE_CHAIN, "{engine}", "{backend}", "benchmark.tsv"
        )


rule infer_reference:
    input:
        unpack(encoded_artifact),
    output:
        json=reference_run_path("{model}", "{variant}", "{hop}"),
        npz=reference_run_path("{model}", "{variant}", "{hop}", "npz"),
    log:
        run=reference_run_path("{model}", "{variant}", "{hop}", "log"),
        engine=reference_run_path("{model}", "{variant}", "{hop}", "engine.log"),
    benchmark:
        reference_run_path("{model}", "{variant}", "{hop}", "benchmark.tsv")
    wildcard_constraints:
        hop="st-(?:st|gguf|apr)",
    conda:
        "../envs/convert.yaml"
    threads: INFERENCE["threads"]
    params:
        max_new_tokens=INFERENCE["max_new_tokens"],
        timeout_s=INFERENCE["timeout_s"],
        fingerprint=INFERENCE_RUN_FINGERPRINT,
    script:
        "../scripts/infer_reference.py"


rule serve_check:
    input:
        unpack(inferred_artifact),
    output:
        json=serve_path("{model}", "{variant}", "{chain}", "{engine}"),
    log:
        serve=serve_path("{model}", "{variant}", "{chain}", "{engine}").replace(
            ".json", ".log"
        ),
        server=serve_path("{model}", "{variant}", "{chain}", "{engine}").replace(
            ".json", ".server.log"
        ),
    benchmark:
        serve_path("{model}", "{variant}", "{chain}", "{engine}").replace(
            ".json", ".benchmark.tsv"
        )
    wildcard_constraints:
        chain=CONVERTED_CHAIN,
    conda:
        "../envs/convert.yaml"
    threads: INFERENCE["threads"]
    params:
        engine=engine_name,
        max_new_tokens=INFERENCE["max_new_tokens"],
        fingerprint=INFERENCE_RUN_FINGERPRINT,
    script:
        "../scripts/serve_check.py"


use rule serve_check as serve_check_source with:
    output:
        json=serve_path("{model}", "", SOURCE_CHAIN, "{engine}"),
    log:
        serve=serve_path("{model}", "", SOURCE_CHAIN, "{engine}").replace(
            ".json", ".log"
        ),
        server=serve_path("{model}", "", SOURCE_CHAIN, "{engine}").replace(
            ".json", ".server.log"
        ),
    benchmark:
        serve_path("{model}", "", SOURCE_CHAIN, "{engine}").replace(
            ".json", ".benchmark.tsv"
        )


rule inference_gates:
    input:
        inference_gate_inputs,
    output:
        gates=inference_gates_path("{model}", "{variant}", "{tier}"),
        extra=inference_extra_path("{model}", "{variant}", "{tier}"),
    log:
        "results/{model}/{variant}/gates/{tier}/inference.log",
    conda:
        "../envs/convert.yaml"
    threads: 1
    params:
        inputs=inference_gate_params,
        tolerances=inference_tolerances,
        reference_tolerances=reference_tolerances,
        modalities=INFERENCE["modalities"],
        fingerprint=INFERENCE_GATES_FINGERPRINT,
    script:
        "../scripts/inference_gates.py"
