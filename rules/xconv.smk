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


rule xconv_convert:
    input:
        artifact=J.depends(J.conversion_input),
    output:
        artifact=maybe_temp(
            directory(
                paths.side_artifact_dir(
                    "{model}", "{variant}", "{converter}", "{chain}"
                )
            )
        ),
        sidecar=paths.side_sidecar_path(
            "{model}", "{variant}", "{converter}", "{chain}"
        ),
    log:
        paths.side_log("{model}", "{variant}", "{converter}", "{chain}", "convert"),
    benchmark:
        paths.side_benchmark_path("{model}", "{variant}", "{converter}", "{chain}")
    priority: J.conversion_priority
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=jobs.conversion_mem_mb,
        conversion_slots=J.conversion_slots,
    params:
        format=J.converter("format"),
        quant=J.converter("quant"),
        command=J.converter("command"),
        json_record=J.converter("json_record"),
        env=J.converter("env"),
        fingerprint=J.converter("fingerprint"),
        code=J.code("xconv_convert.py", J.edge_formats),
        artifacts=J.located(J.conversion_input),
    script:
        "../scripts/xconv_convert.py"


rule xconv_inspect:
    input:
        artifact=paths.side_artifact_dir(
            "{model}", "{variant}", "{converter}", "{chain}"
        ),
        sidecar=paths.side_sidecar_path(
            "{model}", "{variant}", "{converter}", "{chain}"
        ),
    output:
        manifest=paths.side_manifest_path(
            "{model}", "{variant}", "{converter}", "{chain}"
        ),
    log:
        paths.side_log("{model}", "{variant}", "{converter}", "{chain}", "inspect"),
    priority: jobs.READER_PRIORITY
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        fingerprint=J.code("xconv_inspect.py", J.chain_formats),
    script:
        "../scripts/xconv_inspect.py"


rule xconv_compare:
    input:
        unpack(J.depends(J.side_compared)),
    output:
        comparison=paths.side_comparison_path(
            "{model}", "{variant}", "{converter}", "{chain}", "{against}"
        ),
    log:
        paths.log_beside(
            paths.side_comparison_path(
                "{model}", "{variant}", "{converter}", "{chain}", "{against}"
            )
        ),
    priority: jobs.READER_PRIORITY
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        fingerprint=J.code("xconv_compare.py", J.side_compared_formats),
        artifacts=J.side_compared,
    script:
        "../scripts/xconv_compare.py"


rule xconv_gates:
    input:
        J.xconv_gate_inputs,
    output:
        gates=paths.xconv_gates_path("{model}", "{variant}", "{tier}"),
    log:
        paths.log_beside(paths.xconv_gates_path("{model}", "{variant}", "{tier}")),
    conda:
        "../envs/convert.yaml"
    threads: 1
    params:
        slots=J.xconv_gate_params,
        fingerprint=J.code("xconv_gates.py"),
    script:
        "../scripts/xconv_gates.py"
