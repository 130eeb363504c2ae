"""Rule inference_gates: F-INF, F-INF-REF, F-ENGINE-001 and F-SERVE-001 rows of one (model, variant, tier),
plus the throughput table and per-prompt details the report shows."""

import json
import traceback
from collections import Counter

from convqa import gates
from convqa.gates.inference import evaluate, select_tolerances
from convqa.infer.run import load_run
from convqa.files import write_json

model, variant = snakemake.wildcards.model, snakemake.wildcards.variant
inputs = snakemake.params.inputs
with open(snakemake.log[0], "w") as log:
    try:
        runs = {tuple(key.split("|")): load_run(paths["json"], paths["npz"]) for key, paths in inputs["runs"].items()}
        serves = {}
        for key, path in inputs["serves"].items():
            with open(path) as fh:
                serves[tuple(key.split("|"))] = json.load(fh)
        references = {hop: load_run(paths["json"], paths["npz"]) for hop, paths in inputs["references"].items()}
        with open(inputs["source_manifest"]) as fh:
            key, tolerances = select_tolerances(variant, dict(snakemake.params.tolerances), json.load(fh))
        print(f"tolerances: inference.tolerances.{key}", file=log)
        rows, throughput, details = evaluate(
            model, variant, runs, serves, tolerances, tuple(snakemake.params.modalities),
            references=references, reference_tolerances=dict(snakemake.params.reference_tolerances),
        )
        gates.write_rows_tsv(rows, snakemake.output.gates)
        write_json(snakemake.output.extra, {"throughput": throughput, "inference_details": details})
        statuses = dict(Counter(row.status for row in rows))
        print(f"{model} {variant}: {len(rows)} inference gate rows {statuses}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
