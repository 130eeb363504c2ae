# Per model: qualification.json (the evidence) and report.md, report.html, junit.xml rendered
# from it. Across models: the summary. Every output is attached to `snakemake --report` with a
# caption (rules/captions/; the workflow description is rules/captions/workflow.rst).


rule report:
    input:
        J.report_inputs,
        J.inference_report_inputs,
    output:
        evidence=report(
            paths.report_path("{model}", "{tier}", "qualification.json"),
            caption="captions/evidence.rst",
            category="Qualification",
            subcategory="{model}",
            labels={"model": "{model}", "tier": "{tier}", "file": "evidence (JSON)"},
        ),
        markdown=report(
            paths.report_path("{model}", "{tier}", "report.md"),
            caption="captions/report_md.rst",
            category="Qualification",
            subcategory="{model}",
            labels={"model": "{model}", "tier": "{tier}", "file": "report (Markdown)"},
        ),
        html=report(
            paths.report_path("{model}", "{tier}", "report.html"),
            caption="captions/report_html.rst",
            category="Qualification",
            subcategory="{model}",
            labels={"model": "{model}", "tier": "{tier}", "file": "report (HTML)"},
        ),
        junit=report(
            paths.report_path("{model}", "{tier}", "junit.xml"),
            caption="captions/junit.rst",
            category="Qualification",
            subcategory="{model}",
            labels={"model": "{model}", "tier": "{tier}", "file": "JUnit XML"},
        ),
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
            caption="captions/summary.rst",
            category="Summary",
            labels={"tier": "{tier}", "file": "summary (JSON)"},
        ),
        markdown=report(
            paths.summary_path("{tier}", "summary.md"),
            caption="captions/summary.rst",
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
