# Paths, config access and plan helpers shared by every rule file.
#
# Every path a rule writes or reads comes from one function here, used by the producing rule's
# `output:` and by every consumer's `input:`, so a path that nobody produces is a DAG error at
# dry-run time, never a file discovered (or missed) by globbing.

import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from convqa.convert import converters

from convqa.workflow import plan
from convqa.encodings import QUANT_TARGETS
from convqa.files import path_size
from convqa.workflow.fingerprint import (
    comparison_fingerprint,
    fingerprint,
    inspection_fingerprint,
    source_fingerprint,
)
from convqa.gates.rows import label
from convqa.sources.prepare import input_files, kind_fingerprint_args

validate(config, schema="../config/schema.yaml")

MODELS = list(config["models"])
VARIANTS = list(config["variants"])


def model_variants(model):
    """The model's own `variants:` when it names some, else the config's."""
    return list(config["models"][model].get("variants") or VARIANTS)


# Every variant some model runs: what the wildcards accept and the checks below cover.
ALL_VARIANTS = sorted({v for m in MODELS for v in model_variants(m)})
TIER = config["tier"]
TIERS = list(plan.TIER_CHECKS)
CONVERTER = config["converter"]
try:
    converters.check_routing(
        config,
        {
            converters.edge_name(chain)
            for tier in TIERS
            for chain in plan.artifact_chains(tier, "native")
        },
    )
except converters.ConverterConfigError as exc:
    raise WorkflowError(str(exc))

# The S artifact of a chain is a directory; GGUF and APR artifacts are single files.
from convqa.formats import ARTIFACT_NAME
SOURCE_CHAIN = "st"


def chain_regex(last_hop=None):
    """CHAIN_RE without anchors; with `last_hop`, only chains whose last hop is that format."""
    if last_hop is None:
        return plan.CHAIN_RE.pattern.strip("^$")
    hop = "(?:" + "|".join(plan.HOP_FORMAT) + ")"
    return f"st(?:-{hop})*-{last_hop}(?:\\.run[0-9]+)?"


def variant_quant(variant, fmt):
    """The quantization a variant applies on the first hop from S to `fmt`.

    None keeps the source dtypes: for `native`, and where the format has no encoding for the
    variant (APR holds no GGML Q8_0 blocks; `apr import` without --quantize keeps F32 too).
    """
    if variant == "native" or fmt not in QUANT_TARGETS[variant]:
        return None
    return variant


def _check_variants():
    first_hop_formats = {
        plan.target_format(c)
        for tier in TIERS
        for c in plan.artifact_chains(tier, "native")
        if plan.is_first_hop(c)
    }
    for variant in ALL_VARIANTS:
        if variant == "native":
            continue
        if variant not in QUANT_TARGETS:
            raise WorkflowError(
                f"config: unknown variant {variant!r}; known: native, {', '.join(QUANT_TARGETS)}"
            )
        if not any(f in QUANT_TARGETS[variant] for f in first_hop_formats):
            raise WorkflowError(
                f"config: variant {variant!r} applies to none of the formats the qualification "
                f"converts S to ({', '.join(sorted(first_hop_formats))}); pick another variant"
            )


_check_variants()


wildcard_constraints:
    model="|".join(re.escape(m) for m in MODELS),
    variant="|".join(re.escape(v) for v in ALL_VARIANTS),
    chain=chain_regex(),
    subject=chain_regex(),
    reference=chain_regex(),
    tier="|".join(TIERS),


# ---------------------------------------------------------------- paths


def source_dir(model):
    return f"results/{model}/source"


def source_sidecar_path(model):
    # Beside the directory, never inside it: Snakemake deletes a directory output before a rerun.
    return f"results/{model}/source.sidecar.json"


def source_manifest_path(model):
    return f"results/{model}/source.manifest.json"


def chain_dir(model, variant, chain):
    return f"results/{model}/{variant}/{chain}"


def artifact_path(model, variant, chain, fmt=None):
    """The artifact of a chain; `st` is the shared source directory, for every variant."""
    if chain == SOURCE_CHAIN:
        return source_dir(model)
    return f"{chain_dir(model, variant, chain)}/{ARTIFACT_NAME[fmt or plan.target_format(chain)]}"


def sidecar_path(model, variant, chain):
    if chain == SOURCE_CHAIN:
        return source_sidecar_path(model)
    return f"{chain_dir(model, variant, chain)}/sidecar.json"


def manifest_path(model, variant, chain):
    if chain == SOURCE_CHAIN:
        return source_manifest_path(model)
    return f"{chain_dir(model, variant, chain)}/manifest.json"


def benchmark_path(model, variant, chain):
    return f"{chain_dir(model, variant, chain)}/benchmark.tsv"


def comparison_path(model, variant, subject, reference):
    return f"results/{model}/{variant}/compare/{subject}~{reference}.json"


def gates_path(model, variant, tier):
    return f"results/{model}/{variant}/gates/{tier}/tensor.tsv"


def report_dir(model, tier):
    return f"results/{model}/report/{tier}"


def report_path(model, tier, name):
    return f"{report_dir(model, tier)}/{name}"


def summary_path(tier, name):
    return f"results/summary/{tier}/{name}"


def log_path(model, variant, chain, step):
    if chain == SOURCE_CHAIN:
        return f"results/{model}/logs/{step}-source.log"
    return f"{chain_dir(model, variant, chain)}/{step}.log"


# ---------------------------------------------------------------- the plan, per (model, variant, tier)


def comparison_pairs(tier, variant):
    """(subject, reference) of every tensor comparison: one per tensors-mode check, plus each
    converted artifact against its parent (the report's per-edge tensor errors; the contract
    gates compare manifest statistics). Sorted, no duplicates.
    """
    pairs = {
        (c.subject, c.reference)
        for c in plan.checks_for(tier, variant)
        if c.mode == "tensors"
    }
    pairs |= {(c, plan.parent(c)) for c in plan.artifact_chains(tier, variant)}
    return sorted(pairs)


def gate_input_map(model, variant, tier):
    """What the gates script reads, by chain or pair; the same paths are the rule's inputs."""
    chains = plan.chains_for(tier, variant)
    return {
        "manifests": {c: manifest_path(model, variant, c) for c in chains},
        "sidecars": {c: sidecar_path(model, variant, c) for c in chains},
        "comparisons": {
            f"{s}~{r}": comparison_path(model, variant, s, r)
            for s, r in comparison_pairs(tier, variant)
        },
    }


def report_input_map(model, tier):
    """Report inputs keyed by the labels the gate rows use (`variant/chain`)."""
    maps = {"gate_tsvs": [], "manifests": {}, "sidecars": {}, "comparisons": {}}
    for variant in model_variants(model):
        gates = gate_input_map(model, variant, tier)
        maps["gate_tsvs"].append(gates_path(model, variant, tier))
        for kind in ("manifests", "sidecars", "comparisons"):
            for key, path in gates[kind].items():
                maps[kind][label(variant, key)] = path
    add_side_by_side_report_inputs(maps, model, tier)  # rules/xconv.smk
    return maps


def _flatten(mapping):
    paths = []
    for value in mapping.values():
        paths.extend(value.values() if isinstance(value, dict) else value)
    return sorted(set(paths))


def tier_targets(tier):
    reports = [
        report_path(m, tier, name)
        for m in MODELS
        for name in ("qualification.json", "report.md", "report.html", "junit.xml")
    ]
    return reports + [
        summary_path(tier, "summary.json"),
        summary_path(tier, "summary.md"),
    ]


# ---------------------------------------------------------------- input functions


def conversion_input(wildcards):
    """The parent chain's artifact (for `st-gguf-apr`: `st-gguf/model.gguf`)."""
    parent = plan.parent(wildcards.chain)
    return artifact_path(wildcards.model, wildcards.variant, parent)


def inspected_artifact(wildcards):
    return artifact_path(wildcards.model, wildcards.variant, wildcards.chain)


def compared_artifacts(wildcards):
    return {
        "subject": artifact_path(wildcards.model, wildcards.variant, wildcards.subject),
        "reference": artifact_path(
            wildcards.model, wildcards.variant, wildcards.reference
        ),
    }


def gate_inputs(wildcards):
    return _flatten(gate_input_map(wildcards.model, wildcards.variant, wildcards.tier))


def gate_params(wildcards):
    return gate_input_map(wildcards.model, wildcards.variant, wildcards.tier)


def report_inputs(wildcards):
    return _flatten(report_input_map(wildcards.model, wildcards.tier))


def report_params(wildcards):
    return report_input_map(wildcards.model, wildcards.tier)


# ---------------------------------------------------------------- params: converter and fingerprints


def source_inputs(wildcards):
    return input_files(config["models"][wildcards.model]["source"])


def source_spec(wildcards):
    return dict(config["models"][wildcards.model]["source"])


def source_code_fingerprint(wildcards):
    formats, exclude = kind_fingerprint_args(
        config["models"][wildcards.model]["source"]["kind"]
    )
    return source_fingerprint(formats, exclude)


def primary_converter(wildcards):
    """The converter routed first to the chain's edge (convqa.convert.converters)."""
    return converters.primary_converter(config, wildcards.model, wildcards.chain)


def converter_entry(wildcards):
    return config["converters"][primary_converter(wildcards)]


def converter_command(wildcards):
    # A function, so Snakemake does not format the template's {input}/{output} itself.
    return converter_entry(wildcards)["command"]


def converter_json_record(wildcards):
    return converter_entry(wildcards).get("json_record", False)


def converter_env(wildcards):
    return dict(converter_entry(wildcards).get("env") or {})


def converter_fingerprint(wildcards):
    """Content hash of the convqa code the edge runs, for the built-in converter; for an
    external tool, its declared version and the hash of its version probe."""
    source_hop, target_hop = plan.edge(wildcards.chain)
    return converters.converter_fingerprint(
        primary_converter(wildcards),
        converter_entry(wildcards),
        plan.HOP_FORMAT[source_hop],
        plan.HOP_FORMAT[target_hop],
    )


def conversion_quant(wildcards):
    """Quantize on the first hop out of S only; later hops keep what they receive."""
    if plan.is_first_hop(wildcards.chain):
        return variant_quant(wildcards.variant, plan.target_format(wildcards.chain))
    return None


# Gate evaluation and report rendering read only JSON and TSV: no format modules.
GATES_FINGERPRINT = fingerprint(("convqa.gates.tensor_table",), ())
REPORT_FINGERPRINT = fingerprint(("convqa.report.build", "convqa.report.summary"), ())


def artifact_format(chain):
    return plan.target_format(chain) if chain != SOURCE_CHAIN else "safetensors"


def inspection_code_fingerprint(wildcards):
    return inspection_fingerprint(artifact_format(wildcards.chain))


def comparison_code_fingerprint(wildcards):
    return comparison_fingerprint(
        artifact_format(wildcards.subject), artifact_format(wildcards.reference)
    )


# ---------------------------------------------------------------- resources


def path_size_mb(path):
    return path_size(path) / 2**20


def conversion_mem_mb(wildcards, input, attempt):
    # One tensor in memory at a time plus the interpreter; 3x the input covers a
    # dequantized copy of the largest tensor with room to spare. Doubles on retry.
    return int((3 * path_size_mb(input.artifact) + 500) * attempt)


def comparison_mem_mb(wildcards, input, attempt):
    size = path_size_mb(input.subject) + path_size_mb(input.reference)
    return int((2 * size + 500) * attempt)


def maybe_temp(path):
    """Converted artifacts are intermediates when `temp_intermediates` is on: the gates need
    only their manifests, comparisons and sidecars (which hold the sha256)."""
    return temp(path) if config["temp_intermediates"] else path
