# The S ground truth of each model: hub download, local directory, GGUF import, bundled model
# or synthetic model, published atomically with a provenance sidecar.


rule prepare_source:
    input:
        J.source_inputs,
    output:
        model=directory(paths.source_dir("{model}")),
        sidecar=paths.source_sidecar_path("{model}"),
    log:
        paths.model_log("{model}", "prepare-source.log"),
    benchmark:
        paths.model_log("{model}", "prepare-source.benchmark.tsv")
    conda:
        "../envs/sources.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    params:
        spec=J.source_spec,
        fingerprint=J.code("prepare_source.py", J.source_formats, J.source_exclude),
    script:
        "../scripts/prepare_source.py"
