# The S ground truth of each model: hub download, local directory, GGUF import, bundled model
# or synthetic model, published atomically with a provenance sidecar.


rule prepare_source:
    input:
        source_inputs,
    output:
        model=directory(source_dir("{model}")),
        sidecar=source_sidecar_path("{model}"),
    log:
        "results/{model}/logs/prepare-source.log",
    benchmark:
        "results/{model}/logs/prepare-source.benchmark.tsv"
    conda:
        "../envs/sources.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    params:
        spec=source_spec,
        fingerprint=source_code_fingerprint,
    script:
        "../scripts/prepare_source.py"
