# Side-by-side qualification of converters (F-XCONV-001). When an edge is routed to several
# converters (`route: {st-gguf: [llama-cpp, convqa]}`), the first is the primary and builds the
# chain's default path; each further one converts the same input under its own directory, and
# its output is compared tensor by tensor with the primary's and with the input.
#
# results/{model}/{variant}/xconv/{converter}/{chain}/artifact/model.{gguf,apr}|model/
# results/{model}/{variant}/xconv/{converter}/{chain}/sidecar.json, manifest.json
# results/{model}/{variant}/xconv/{converter}/{chain}/compare/{primary,parent}.json
# results/{model}/{variant}/gates/{tier}/xconv.tsv
#
# The artifact is a directory so that a side converter that exits non-zero can end its job
# cleanly with an empty directory and a sidecar saying why: its gates are then `fail` rows
# with the stderr tail, and the rest of the qualification still runs. Writing to the wrong
# place is a job error, as on the primary path (convqa.convert.runner's output-path contract).


include: "xconv_common.smk"


rule xconv_convert:
    input:
        artifact=side_conversion_input,
    output:
        artifact=maybe_temp(
            directory(
                side_artifact_dir("{model}", "{variant}", "{converter}", "{chain}")
            )
        ),
        sidecar=side_sidecar_path("{model}", "{variant}", "{converter}", "{chain}"),
    log:
        f"{side_dir('{model}', '{variant}', '{converter}', '{chain}')}/convert.log",
    benchmark:
        f"{side_dir('{model}', '{variant}', '{converter}', '{chain}')}/benchmark.tsv"
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=conversion_mem_mb,
    params:
        format=side_format,
        quant=conversion_quant,
        command=side_command,
        json_record=side_json_record,
        env=side_env,
        fingerprint=side_fingerprint,
    script:
        "../scripts/xconv_convert.py"


rule xconv_inspect:
    input:
        artifact=side_artifact_dir("{model}", "{variant}", "{converter}", "{chain}"),
        sidecar=side_sidecar_path("{model}", "{variant}", "{converter}", "{chain}"),
    output:
        manifest=side_manifest_path("{model}", "{variant}", "{converter}", "{chain}"),
    log:
        f"{side_dir('{model}', '{variant}', '{converter}', '{chain}')}/inspect.log",
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        fingerprint=inspection_code_fingerprint,
    script:
        "../scripts/xconv_inspect.py"


rule xconv_compare:
    input:
        unpack(side_compared),
    output:
        comparison=side_comparison_path(
            "{model}", "{variant}", "{converter}", "{chain}", "{against}"
        ),
    log:
        f"{side_dir('{model}', '{variant}', '{converter}', '{chain}')}/compare/{{against}}.log",
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        fingerprint=side_comparison_fingerprint,
    script:
        "../scripts/xconv_compare.py"


rule xconv_gates:
    input:
        xconv_gate_inputs,
    output:
        gates=xconv_gates_path("{model}", "{variant}", "{tier}"),
    log:
        "results/{model}/{variant}/gates/{tier}/xconv.log",
    conda:
        "../envs/convert.yaml"
    threads: 1
    params:
        slots=xconv_gate_params,
        fingerprint=XCONV_GATES_FINGERPRINT,
    script:
        "../scripts/xconv_gates.py"
