# Tensor comparisons (one per tensors-mode check of the plan and one per converted artifact
# against its parent) and the gate table per (model, variant, tier). Bytes-mode checks
# (idempotency) compare the sidecars' sha256 inside the gates script. A comparison reads both
# manifests first: equal values are decided from them, without the artifacts (which may then be
# deleted before it runs: Jobs.artifact_consumers).


rule compare_tensors:
    input:
        unpack(J.compare_inputs),
    output:
        comparison=paths.comparison_path(
            "{model}", "{variant}", "{subject}", "{reference}"
        ),
    log:
        paths.log_beside(
            paths.comparison_path("{model}", "{variant}", "{subject}", "{reference}")
        ),
    benchmark:
        paths.log_beside(
            paths.comparison_path("{model}", "{variant}", "{subject}", "{reference}"),
            ".benchmark.tsv",
        )
    priority: jobs.READER_PRIORITY
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=J.comparison_mem_mb,
    params:
        fingerprint=J.code("compare.py", J.compared_formats),
        artifacts=J.compared_artifacts,
        exact=J.comparison_expected_exact,
    script:
        "../scripts/compare.py"


rule tensor_gates:
    input:
        J.gate_inputs,
    output:
        gates=paths.gates_path("{model}", "{variant}", "{tier}"),
    log:
        paths.log_beside(paths.gates_path("{model}", "{variant}", "{tier}")),
    conda:
        "../envs/convert.yaml"
    threads: 1
    params:
        inputs=J.gate_params,
        fingerprint=J.code("gates.py"),
    script:
        "../scripts/gates.py"
