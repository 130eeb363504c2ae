# One rule per target format. Each converts the parent chain's artifact (st-gguf-apr reads
# st-gguf/model.gguf) with the configured converter command and writes the artifact plus its
# sidecar. The converter's code fingerprint in `params:` reruns exactly the edges whose code
# changed.


rule convert_to_gguf:
    input:
        artifact=conversion_input,
    output:
        artifact=maybe_temp(artifact_path("{model}", "{variant}", "{chain}", "gguf")),
        sidecar=sidecar_path("{model}", "{variant}", "{chain}"),
    log:
        log_path("{model}", "{variant}", "{chain}", "convert"),
    benchmark:
        benchmark_path("{model}", "{variant}", "{chain}")
    wildcard_constraints:
        chain=chain_regex("gguf"),
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=conversion_mem_mb,
    params:
        format="gguf",
        quant=conversion_quant,
        converter=primary_converter,
        env=converter_env,
        command=converter_command,
        json_record=converter_json_record,
        fingerprint=converter_fingerprint,
    script:
        "../scripts/convert.py"


rule convert_to_apr:
    input:
        artifact=conversion_input,
    output:
        artifact=maybe_temp(artifact_path("{model}", "{variant}", "{chain}", "apr")),
        sidecar=sidecar_path("{model}", "{variant}", "{chain}"),
    log:
        log_path("{model}", "{variant}", "{chain}", "convert"),
    benchmark:
        benchmark_path("{model}", "{variant}", "{chain}")
    wildcard_constraints:
        chain=chain_regex("apr"),
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=conversion_mem_mb,
    params:
        format="apr",
        quant=conversion_quant,
        converter=primary_converter,
        env=converter_env,
        command=converter_command,
        json_record=converter_json_record,
        fingerprint=converter_fingerprint,
    script:
        "../scripts/convert.py"


rule convert_to_safetensors:
    input:
        artifact=conversion_input,
    output:
        artifact=maybe_temp(
            directory(artifact_path("{model}", "{variant}", "{chain}", "safetensors"))
        ),
        sidecar=sidecar_path("{model}", "{variant}", "{chain}"),
    log:
        log_path("{model}", "{variant}", "{chain}", "convert"),
    benchmark:
        benchmark_path("{model}", "{variant}", "{chain}")
    wildcard_constraints:
        chain=chain_regex("st"),
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=conversion_mem_mb,
    params:
        format="safetensors",
        quant=conversion_quant,
        converter=primary_converter,
        env=converter_env,
        command=converter_command,
        json_record=converter_json_record,
        fingerprint=converter_fingerprint,
    script:
        "../scripts/convert.py"
