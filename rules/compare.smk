# Tensor comparisons (one per tensors-mode check of the plan and one per converted artifact
# against its parent) and the gate table per (model, variant, tier). Bytes-mode checks
# (idempotency) compare the sidecars' sha256 inside the gates script.


rule compare_tensors:
    input:
        unpack(compared_artifacts),
    output:
        comparison=comparison_path("{model}", "{variant}", "{subject}", "{reference}"),
    log:
        "results/{model}/{variant}/compare/{subject}~{reference}.log",
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=comparison_mem_mb,
    params:
        fingerprint=comparison_code_fingerprint,
    script:
        "../scripts/compare.py"


rule tensor_gates:
    input:
        gate_inputs,
    output:
        gates=gates_path("{model}", "{variant}", "{tier}"),
    log:
        "results/{model}/{variant}/gates/{tier}/tensor.log",
    conda:
        "../envs/convert.yaml"
    threads: 1
    params:
        inputs=gate_params,
        fingerprint=GATES_FINGERPRINT,
    script:
        "../scripts/gates.py"
