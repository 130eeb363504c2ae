# One manifest per artifact: tensors (canonical name, shape, encoding, sha256, stats), config,
# tokenizer summary and format metadata, as the strict readers see them.


rule inspect_source:
    input:
        artifact=paths.source_dir("{model}"),
    output:
        manifest=paths.source_manifest_path("{model}"),
    log:
        paths.step_log("{model}", "", SOURCE_CHAIN, "inspect"),
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        fingerprint=J.code("inspect.py", ["safetensors"]),
        artifacts=lambda wildcards: {"artifact": paths.source_dir(wildcards.model)},
    script:
        "../scripts/inspect.py"


rule inspect_artifact:
    input:
        artifact=J.depends(J.inspected_artifact),
    output:
        manifest=paths.manifest_path("{model}", "{variant}", "{chain}"),
    log:
        paths.step_log("{model}", "{variant}", "{chain}", "inspect"),
    benchmark:
        paths.log_beside(
            paths.manifest_path("{model}", "{variant}", "{chain}"), ".benchmark.tsv"
        )
    priority: jobs.READER_PRIORITY
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        fingerprint=J.code("inspect.py", J.chain_formats),
        artifacts=J.located(J.inspected_artifact),
    script:
        "../scripts/inspect.py"
