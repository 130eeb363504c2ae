# The detection matrix (convqa.detection.matrix): every converter mutant qualified on its own model at
# a detection tier, plus the correct converter per preset; which gate catches which mutant.
#
# results/detection/output-path/{mutant}.json    output-path contract rows (correct + mutant)
# results/detection/matrix.json, matrix.md, matrix.html


rule detection:
    input:
        detection_path("matrix.json"),
        detection_path("matrix.md"),
        detection_path("matrix.html"),


rule detection_output_path:
    input:
        artifact=output_path_input,
    output:
        json=detection_output_path_path("{mutant}"),
    log:
        detection_path("output-path/{mutant}.log"),
    conda:
        "../envs/convert.yaml"
    threads: 1
    params:
        quant=output_path_quant,
        fingerprint=DETECTION_FINGERPRINT,
    script:
        "../scripts/detection_output_path.py"


rule detection_matrix:
    input:
        detection_matrix_inputs,
    output:
        json=report(
            detection_path("matrix.json"),
            category="Detection",
            labels={"file": "matrix (JSON)"},
        ),
        markdown=detection_path("matrix.md"),
        html=report(
            detection_path("matrix.html"),
            category="Detection",
            labels={"file": "matrix (HTML)"},
        ),
    log:
        detection_path("matrix.log"),
    localrule: True
    conda:
        "../envs/report.yaml"
    threads: 1
    params:
        section=DETECTION,
        reports=lambda wildcards: detection_reports(),
        output_paths={m: detection_output_path_path(m) for m in OUTPUT_PATH_ENTRIES},
        logits=lambda wildcards: detection_logits(),
        fingerprint=DETECTION_FINGERPRINT,
    script:
        "../scripts/detection_matrix.py"
