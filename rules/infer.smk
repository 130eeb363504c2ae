# The inference matrix: every artifact of the tier's inference chains under every engine that
# can read it (transformers: all formats; llama.cpp: GGUF) on every backend, the HTTP servers,
# and the inference gate table per (model, variant, tier). The ground truth is transformers over
# the SafeTensors source, run once per model (not per variant) on every backend: each backend's
# runs are judged against its own (convqa.workflow.references; F-BACKEND-001 compares the two).
#
# results/{model}/source.infer/{engine}-{backend}.json|.npz      the ground truth's runs
# results/{model}/{variant}/{chain}/infer/{engine}-{backend}.json|.npz
# results/{model}/{variant}/{chain}/infer/serve-{engine}.json
# results/{model}/{variant}/reference/{hop}/transformers-{backend}.json|.npz   reference-quantized model
# results/{model}/{variant}/{chain}/infer/parity.json     tokenizer and chat-template parity
#   (results/{model}/source.infer/parity.json for the source)
# results/{model}/{variant}/gates/{tier}/inference.tsv, inference-extra.json


rule infer:
    input:
        unpack(J.depends(J.inferred_artifact)),
    output:
        json=paths.inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}"
        ),
        npz=paths.inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}", "npz"
        ),
    log:
        run=paths.inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}", "log"
        ),
        engine=paths.inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}", "engine.log"
        ),
    benchmark:
        paths.inference_run_path(
            "{model}", "{variant}", "{chain}", "{engine}", "{backend}", "benchmark.tsv"
        )
    wildcard_constraints:
        chain=plan.CONVERTED_CHAIN_PATTERN,
    priority: jobs.READER_PRIORITY
    conda:
        "../envs/convert.yaml"
    threads: INFERENCE["threads"]
    resources:
        gpu=jobs.gpu_count,
        mem_mb=jobs.inference_mem_mb,
    params:
        engine=jobs.engine_name,
        max_new_tokens=INFERENCE["max_new_tokens"],
        timeout_s=INFERENCE["timeout_s"],
        fingerprint=J.code("infer.py", J.inferred_formats),
        artifacts=J.inferred_artifact,
    script:
        "../scripts/infer.py"


use rule infer as infer_source with:
    output:
        json=paths.inference_run_path(
            "{model}", "", SOURCE_CHAIN, "{engine}", "{backend}"
        ),
        npz=paths.inference_run_path(
            "{model}", "", SOURCE_CHAIN, "{engine}", "{backend}", "npz"
        ),
    log:
        run=paths.inference_run_path(
            "{model}", "", SOURCE_CHAIN, "{engine}", "{backend}", "log"
        ),
        engine=paths.inference_run_path(
            "{model}", "", SOURCE_CHAIN, "{engine}", "{backend}", "engine.log"
        ),
    benchmark:
        paths.inference_run_path(
            "{model}", "", SOURCE_CHAIN, "{engine}", "{backend}", "benchmark.tsv"
        )


rule infer_reference:
    input:
        unpack(J.depends(J.encoded_artifact)),
    output:
        json=paths.reference_run_path(
            "{model}", "{variant}", "{hop}", backend="{backend}"
        ),
        npz=paths.reference_run_path(
            "{model}", "{variant}", "{hop}", "npz", backend="{backend}"
        ),
    log:
        run=paths.reference_run_path(
            "{model}", "{variant}", "{hop}", "log", backend="{backend}"
        ),
        engine=paths.reference_run_path(
            "{model}", "{variant}", "{hop}", "engine.log", backend="{backend}"
        ),
    benchmark:
        paths.reference_run_path(
            "{model}", "{variant}", "{hop}", "benchmark.tsv", backend="{backend}"
        )
    wildcard_constraints:
        hop=plan.FIRST_HOP_PATTERN,
    priority: jobs.READER_PRIORITY
    conda:
        "../envs/convert.yaml"
    threads: INFERENCE["threads"]
    resources:
        gpu=jobs.gpu_count,
        mem_mb=jobs.reference_mem_mb,
    params:
        max_new_tokens=INFERENCE["max_new_tokens"],
        timeout_s=INFERENCE["timeout_s"],
        fingerprint=J.code("infer_reference.py", J.reference_formats),
        artifacts=J.encoded_artifact,
    script:
        "../scripts/infer_reference.py"


rule serve_check:
    input:
        unpack(J.depends(J.inferred_artifact)),
    output:
        json=paths.serve_path("{model}", "{variant}", "{chain}", "{engine}"),
    log:
        serve=paths.log_beside(
            paths.serve_path("{model}", "{variant}", "{chain}", "{engine}")
        ),
        server=paths.log_beside(
            paths.serve_path("{model}", "{variant}", "{chain}", "{engine}"),
            ".server.log",
        ),
    benchmark:
        paths.log_beside(
            paths.serve_path("{model}", "{variant}", "{chain}", "{engine}"),
            ".benchmark.tsv",
        )
    wildcard_constraints:
        chain=plan.CONVERTED_CHAIN_PATTERN,
    priority: jobs.READER_PRIORITY
    conda:
        "../envs/convert.yaml"
    threads: INFERENCE["threads"]
    resources:
        mem_mb=jobs.inference_mem_mb,
    params:
        engine=jobs.engine_name,
        max_new_tokens=INFERENCE["max_new_tokens"],
        fingerprint=J.code("serve_check.py", J.inferred_formats),
        artifacts=J.inferred_artifact,
    script:
        "../scripts/serve_check.py"


use rule serve_check as serve_check_source with:
    output:
        json=paths.serve_path("{model}", "", SOURCE_CHAIN, "{engine}"),
    log:
        serve=paths.log_beside(
            paths.serve_path("{model}", "", SOURCE_CHAIN, "{engine}")
        ),
        server=paths.log_beside(
            paths.serve_path("{model}", "", SOURCE_CHAIN, "{engine}"), ".server.log"
        ),
    benchmark:
        paths.log_beside(
            paths.serve_path("{model}", "", SOURCE_CHAIN, "{engine}"), ".benchmark.tsv"
        )


rule parity:
    input:
        unpack(J.depends(J.inferred_artifact)),
    output:
        json=paths.parity_path("{model}", "{variant}", "{chain}"),
    log:
        run=paths.log_beside(paths.parity_path("{model}", "{variant}", "{chain}")),
        engine=paths.log_beside(
            paths.parity_path("{model}", "{variant}", "{chain}"), ".engine.log"
        ),
    benchmark:
        paths.log_beside(
            paths.parity_path("{model}", "{variant}", "{chain}"), ".benchmark.tsv"
        )
    wildcard_constraints:
        chain=plan.CONVERTED_CHAIN_PATTERN,
    priority: jobs.READER_PRIORITY
    conda:
        "../envs/convert.yaml"
    threads: 1
    params:
        timeout_s=INFERENCE["timeout_s"],
        fingerprint=J.code("parity.py", J.inferred_formats),
        artifacts=J.inferred_artifact,
    script:
        "../scripts/parity.py"


use rule parity as parity_source with:
    output:
        json=paths.parity_path("{model}", "", SOURCE_CHAIN),
    log:
        run=paths.log_beside(paths.parity_path("{model}", "", SOURCE_CHAIN)),
        engine=paths.log_beside(
            paths.parity_path("{model}", "", SOURCE_CHAIN), ".engine.log"
        ),
    benchmark:
        paths.log_beside(
            paths.parity_path("{model}", "", SOURCE_CHAIN), ".benchmark.tsv"
        )


rule inference_gates:
    input:
        J.inference_gate_inputs,
    output:
        gates=paths.inference_gates_path("{model}", "{variant}", "{tier}"),
        extra=paths.inference_extra_path("{model}", "{variant}", "{tier}"),
    log:
        paths.log_beside(paths.inference_gates_path("{model}", "{variant}", "{tier}")),
    conda:
        "../envs/convert.yaml"
    threads: 1
    params:
        inputs=J.inference_gate_params,
        tolerances=J.inference_tolerances,
        reference_tolerances=J.reference_tolerances,
        backend_tolerances=J.backend_tolerances(),
        modalities=INFERENCE["modalities"],
        fingerprint=J.code("inference_gates.py"),
    script:
        "../scripts/inference_gates.py"
