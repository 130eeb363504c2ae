# Per model: qualification.json (the evidence) and report.md, report.html, junit.xml rendered
# from it. Across models: the summary.


rule report:
    input:
        J.report_inputs,
        J.inference_report_inputs,
    output:
        evidence=report(
            paths.report_path("{model}", "{tier}", "qualification.json"),
            category="Qualification",
            subcategory="{model}",
            labels={"model": "{model}", "tier": "{tier}", "file": "evidence (JSON)"},
        ),
        markdown=paths.report_path("{model}", "{tier}", "report.md"),
        html=report(
            paths.report_path("{model}", "{tier}", "report.html"),
            category="Qualification",
            subcategory="{model}",
            labels={"model": "{model}", "tier": "{tier}", "file": "report (HTML)"},
        ),
        junit=paths.report_path("{model}", "{tier}", "junit.xml"),
    log:
        paths.model_log("{model}", "report-{tier}.log"),
    localrule: True
    conda:
        "../envs/report.yaml"
    threads: 1
    params:
        inputs=J.report_params,
        inference=J.inference_report_params,
        fingerprint=J.code("report.py"),
    script:
        "../scripts/report.py"


rule summary:
    input:
        evidence=J.summary_inputs(),
    output:
        json=report(
            paths.summary_path("{tier}", "summary.json"),
            category="Summary",
            labels={"tier": "{tier}", "file": "summary (JSON)"},
        ),
        markdown=report(
            paths.summary_path("{tier}", "summary.md"),
            category="Summary",
            labels={"tier": "{tier}", "file": "summary (Markdown)"},
        ),
    log:
        paths.log_beside(paths.summary_path("{tier}", "summary.json")),
    localrule: True
    conda:
        "../envs/report.yaml"
    threads: 1
    params:
        fingerprint=J.code("summary.py"),
    script:
        "../scripts/summary.py"
