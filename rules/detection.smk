# The detection matrix (convqa.detection.matrix): every converter mutant qualified on its own model at
# a detection tier, plus the correct converter per preset; which gate catches which mutant.
#
# results/detection/output-path/{mutant}.json    output-path contract rows (correct + mutant)
# results/detection/matrix.json, matrix.md, matrix.html


rule detection:
    input:
        paths.detection_path("matrix.json"),
        paths.detection_path("matrix.md"),
        paths.detection_path("matrix.html"),


rule detection_output_path:
    input:
        artifact=J.depends(J.output_path_input),
    output:
        json=paths.detection_output_path_path("{mutant}"),
    log:
        paths.log_beside(paths.detection_output_path_path("{mutant}")),
    conda:
        "../envs/convert.yaml"
    threads: 1
    params:
        quant=J.output_path_quant,
        artifacts=J.located(J.output_path_input),
        fingerprint=J.code("detection_output_path.py", J.output_path_formats),
    script:
        "../scripts/detection_output_path.py"


rule detection_matrix:
    input:
        J.detection_matrix_inputs,
    output:
        json=report(
            paths.detection_path("matrix.json"),
            category="Detection",
            labels={"file": "matrix (JSON)"},
        ),
        markdown=paths.detection_path("matrix.md"),
        html=report(
            paths.detection_path("matrix.html"),
            category="Detection",
            labels={"file": "matrix (HTML)"},
        ),
    log:
        paths.log_beside(paths.detection_path("matrix.json")),
    localrule: True
    conda:
        "../envs/report.yaml"
    threads: 1
    params:
        section=J.detection,
        reports=J.detection_reports,
        output_paths=J.detection_output_paths(),
        logits=J.detection_logits,
        fingerprint=J.code("detection_matrix.py"),
    script:
        "../scripts/detection_matrix.py"
