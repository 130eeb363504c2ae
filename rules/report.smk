# Per model: qualification.json (the evidence) and report.md, report.html, junit.xml rendered
# from it. Across models: the summary.


rule report:
    input:
        report_inputs,
        inference_report_inputs,
    output:
        evidence=report(
            report_path("{model}", "{tier}", "qualification.json"),
            category="Qualification",
            subcategory="{model}",
            labels={"model": "{model}", "tier": "{tier}", "file": "evidence (JSON)"},
        ),
        markdown=report_path("{model}", "{tier}", "report.md"),
        html=report(
            report_path("{model}", "{tier}", "report.html"),
            category="Qualification",
            subcategory="{model}",
            labels={"model": "{model}", "tier": "{tier}", "file": "report (HTML)"},
        ),
        junit=report_path("{model}", "{tier}", "junit.xml"),
    log:
        "results/{model}/logs/report-{tier}.log",
    localrule: True
    conda:
        "../envs/report.yaml"
    threads: 1
    params:
        inputs=report_params,
        inference=inference_report_params,
        fingerprint=REPORT_FINGERPRINT,
    script:
        "../scripts/report.py"


rule summary:
    input:
        evidence=expand(
            report_path("{model}", "{{tier}}", "qualification.json"), model=MODELS
        ),
    output:
        json=report(
            summary_path("{tier}", "summary.json"),
            category="Summary",
            labels={"tier": "{tier}", "file": "summary (JSON)"},
        ),
        markdown=report(
            summary_path("{tier}", "summary.md"),
            category="Summary",
            labels={"tier": "{tier}", "file": "summary (Markdown)"},
        ),
    log:
        "results/summary/{tier}/summary.log",
    localrule: True
    conda:
        "../envs/report.yaml"
    threads: 1
    script:
        "../scripts/summary.py"
