# One conversion rule per target format: convert_to_gguf, and the other two `use` it. Each
# converts the parent chain's artifact (st-gguf-apr reads st-gguf/model.gguf) with the configured
# converter command and writes the artifact plus its sidecar. The converter's fingerprint in
# `params:` reruns exactly the edges whose converter changed; `code` the edges whose job code did.
# The input is the parent's sidecar (the artifact may have been deleted after use and is restored
# by the script; convqa.workflow.intermediates), the artifact's path is `params.artifacts`.
# A re-run (`st-gguf.run2`, F-CONV-IDEM-001) also waits for the conversion it repeats
# (`params.repeats`): bytes equal to that artifact's become a hard link to it, one copy on disk.
# Each conversion holds `conversion_slots` (profiles/default provides 2): both when it writes more
# than the source holds, else one (Jobs.conversion_slots), so that with `temp_intermediates` a big
# sibling subtree is not written beside a lineage's next conversion (the deepest ready one,
# Jobs.conversion_priority) while a core is free: disk, not CPU, is the limit there.


rule convert_to_gguf:
    input:
        artifact=J.depends(J.conversion_input),
        repeats=J.repeated_sidecar,
    output:
        artifact=paths.artifact_path("{model}", "{variant}", "{chain}", "gguf"),
        sidecar=paths.sidecar_path("{model}", "{variant}", "{chain}"),
    log:
        paths.step_log("{model}", "{variant}", "{chain}", "convert"),
    benchmark:
        paths.benchmark_path("{model}", "{variant}", "{chain}")
    wildcard_constraints:
        chain=plan.chain_pattern("gguf"),
    priority: J.conversion_priority
    conda:
        "../envs/convert.yaml"
    threads: 1
    resources:
        mem_mb=J.routed_conversion_mem_mb,
        conversion_slots=J.conversion_slots,
    params:
        format=J.converter("format"),
        quant=J.converter("quant"),
        converter=J.converter("converter"),
        env=J.converter("env"),
        command=J.converter("command"),
        json_record=J.converter("json_record"),
        fingerprint=J.converter("fingerprint"),
        code=J.code("convert.py", J.edge_formats),
        artifacts=J.located(J.conversion_input),
        repeats=J.repeated_artifact,
    script:
        "../scripts/convert.py"


use rule convert_to_gguf as convert_to_apr with:
    output:
        artifact=paths.artifact_path("{model}", "{variant}", "{chain}", "apr"),
        sidecar=paths.sidecar_path("{model}", "{variant}", "{chain}"),
    wildcard_constraints:
        chain=plan.chain_pattern("apr"),


use rule convert_to_gguf as convert_to_safetensors with:
    output:
        artifact=directory(
            paths.artifact_path("{model}", "{variant}", "{chain}", "safetensors")
        ),
        sidecar=paths.sidecar_path("{model}", "{variant}", "{chain}"),
    wildcard_constraints:
        chain=plan.chain_pattern("st"),
