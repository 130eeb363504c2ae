# One manifest per artifact: tensors (canonical name, shape, encoding, sha256, stats), config,
# tokenizer summary and format metadata, as the strict readers see them.


rule inspect_source:
    input:
        artifact=source_dir("{model}"),
    output:
        manifest=source_manifest_path("{model}"),
    log:
        "results/{model}/logs/inspect-source.log",
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        fingerprint=inspection_fingerprint("safetensors"),
    script:
        "../scripts/inspect.py"


rule inspect_artifact:
    input:
        artifact=inspected_artifact,
    output:
        manifest=manifest_path("{model}", "{variant}", "{chain}"),
    log:
        log_path("{model}", "{variant}", "{chain}", "inspect"),
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        fingerprint=inspection_code_fingerprint,
    script:
        "../scripts/inspect.py"
