"""Rule report: a model's qualification.json, report.md, report.html and junit.xml."""

import json
from pathlib import Path

from convqa.report.build import write_report
from convqa.report.disk import disk_usage, on_disk
from convqa.workflow import paths
from convqa.workflow.joblog import job_log

inputs = snakemake.params.inputs
inference = snakemake.params.inference


def inference_extra(paths):
    """The inference extras of every variant, merged (their labels name the variant)."""
    merged = {"throughput": [], "inference_details": {}}
    for path in paths:
        with open(path) as fh:
            extra = json.load(fh)
        merged["throughput"] += extra["throughput"]
        merged["inference_details"].update(extra["inference_details"])
    return merged


with job_log(snakemake.log[0]) as log:
    outputs = write_report(
        snakemake.wildcards.model,
        inputs["gate_tsvs"] + inference["gate_tsvs"],
        inputs["manifests"],
        inputs["sidecars"],
        inputs["comparisons"],
        Path(snakemake.output.evidence).parent,
        extra={"tier": snakemake.wildcards.tier, **inference_extra(inference["extras"]),
               "disk": {**disk_usage(inputs["sidecars"]), **on_disk(Path(paths.source_dir(snakemake.wildcards.model)).parent)}},
    )
    for name, path in outputs.items():
        print(f"{name}: {path}", file=log)
