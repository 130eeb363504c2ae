"""Every path the workflow writes or reads: results, logs and benchmarks.

A rule's `output:` and every consumer's `input:` call the same function here, so a path that
nobody produces is a DAG error at dry-run time, never a file discovered (or missed) by globbing.
The functions are plain string builders: the rules pass wildcard placeholders (`"{model}"`), the
input functions pass values.

results/{model}/source/                          S ground truth (config, tokenizer, *.safetensors)
results/{model}/{variant}/{chain}/model.{ext}    one conversion artifact per chain
results/{model}/{variant}/{chain}/sidecar.json, manifest.json, {step}.log, benchmark.tsv
results/{model}/{variant}/compare/{subject}~{reference}.json
results/{model}/{variant}/xconv/{converter}/{chain}/...       a side-by-side converter
results/{model}/{variant}/gates/{tier}/tensor.tsv, inference.tsv, xconv.tsv
results/{model}/report/{tier}/qualification.json, report.md, report.html, junit.xml
results/summary/{tier}/summary.json, summary.md
results/detection/matrix.json, output-path/{mutant}.json

Logs: a job with one result file logs beside it (`x.json` -> `x.log`, `log_beside`); a job in a
chain's directory logs there by step (`{chain}/convert.log`, `step_log`); the source's and the
report's jobs log under `results/{model}/logs/`.
"""

from __future__ import annotations

from convqa.formats import ARTIFACT_NAME
from convqa.workflow import plan

SOURCE_CHAIN = "st"


def log_beside(path: str, suffix: str = ".log") -> str:
    """The log of the job whose result is `path`: `tensor.tsv` -> `tensor.log`; `suffix`
    `.benchmark.tsv` names the benchmark, `.server.log` a second log."""
    stem, dot, _ext = path.rpartition(".")
    return f"{stem}{suffix}" if dot and "/" not in _ext else f"{path}{suffix}"


# ---------------------------------------------------------------- source and chains


def source_dir(model):
    return f"results/{model}/source"


def source_sidecar_path(model):
    # Beside the directory, never inside it: Snakemake deletes a directory output before a rerun.
    return f"results/{model}/source.sidecar.json"


def source_manifest_path(model):
    return f"results/{model}/source.manifest.json"


def model_log(model, name):
    """Logs of the jobs per model (the source's, the report's): results/{model}/logs/{name}."""
    return f"results/{model}/logs/{name}"


def chain_dir(model, variant, chain):
    return f"results/{model}/{variant}/{chain}"


def artifact_path(model, variant, chain, fmt=None):
    """The artifact of a chain; `st` is the shared source directory, for every variant."""
    if chain == SOURCE_CHAIN:
        return source_dir(model)
    return f"{chain_dir(model, variant, chain)}/{ARTIFACT_NAME[fmt or plan.target_format(chain)]}"


def artifact_format(chain):
    return plan.target_format(chain) if chain != SOURCE_CHAIN else "safetensors"


def sidecar_path(model, variant, chain):
    if chain == SOURCE_CHAIN:
        return source_sidecar_path(model)
    return f"{chain_dir(model, variant, chain)}/sidecar.json"


def dependency_path(model, variant, chain):
    """What a job that reads a chain's artifact declares as its input: the source directory for
    `st`, else the chain's sidecar, which changes exactly when the conversion reruns (the artifact
    itself may be deleted after use and restored; convqa.workflow.intermediates)."""
    return artifact_path(model, variant, chain) if chain == SOURCE_CHAIN else sidecar_path(model, variant, chain)


def dependency_of(artifact):
    """`dependency_path` from an artifact path: a converted artifact's sidecar, else the path."""
    head, _, name = artifact.rpartition("/")
    return f"{head}/sidecar.json" if name in ARTIFACT_NAME.values() else artifact


def artifact_of(dependency):
    """The artifact a `dependency_path` stands for (the sidecar's chain directory's artifact)."""
    head, _, name = dependency.rpartition("/")
    if name != "sidecar.json" or "/xconv/" in dependency:  # a side converter's sidecar: not one
        return dependency
    chain = head.rpartition("/")[2]
    return f"{head}/{ARTIFACT_NAME[plan.target_format(chain)]}"


def release_path(model, variant, chain, tier):
    """The record of deleting a chain's artifact after the tier's last job that reads it."""
    return f"{chain_dir(model, variant, chain)}/released-{tier}.json"


def release_log_path(model, variant, chain, tier):
    return f"{chain_dir(model, variant, chain)}/released-{tier}.log"


def manifest_path(model, variant, chain):
    if chain == SOURCE_CHAIN:
        return source_manifest_path(model)
    return f"{chain_dir(model, variant, chain)}/manifest.json"


def step_log(model, variant, chain, step):
    """The log of one step on a chain (`convert`, `inspect`); the source's go under logs/."""
    if chain == SOURCE_CHAIN:
        return model_log(model, f"{step}-source.log")
    return f"{chain_dir(model, variant, chain)}/{step}.log"


def benchmark_path(model, variant, chain):
    return f"{chain_dir(model, variant, chain)}/benchmark.tsv"


def comparison_path(model, variant, subject, reference):
    return f"results/{model}/{variant}/compare/{subject}~{reference}.json"


# ---------------------------------------------------------------- gates, reports, summary


def gates_dir(model, variant, tier):
    return f"results/{model}/{variant}/gates/{tier}"


def gates_path(model, variant, tier):
    return f"{gates_dir(model, variant, tier)}/tensor.tsv"


def inference_gates_path(model, variant, tier):
    return f"{gates_dir(model, variant, tier)}/inference.tsv"


def inference_extra_path(model, variant, tier):
    return f"{gates_dir(model, variant, tier)}/inference-extra.json"


def xconv_gates_path(model, variant, tier):
    return f"{gates_dir(model, variant, tier)}/xconv.tsv"


def report_dir(model, tier):
    return f"results/{model}/report/{tier}"


def report_path(model, tier, name):
    return f"{report_dir(model, tier)}/{name}"


REPORT_FILES = ("qualification.json", "report.md", "report.html", "junit.xml")


def summary_path(tier, name):
    return f"results/summary/{tier}/{name}"


def tier_targets(models, tier):
    """What `snakemake <tier>` builds: every model's report files and the summary."""
    reports = [report_path(m, tier, name) for m in models for name in REPORT_FILES]
    return reports + [summary_path(tier, "summary.json"), summary_path(tier, "summary.md")]


# ---------------------------------------------------------------- inference


def inference_dir(model, variant, chain):
    if chain == SOURCE_CHAIN:
        return f"results/{model}/source.infer"
    return f"{chain_dir(model, variant, chain)}/infer"


def inference_run_path(model, variant, chain, engine, backend, ext="json"):
    """`engine` is the engine's file name (llamacpp), so no wildcard holds a dot."""
    return f"{inference_dir(model, variant, chain)}/{engine}-{backend}.{ext}"


def reference_run_path(model, variant, hop, ext="json", backend="cpu"):
    """The reference-quantized model's run (convqa.infer.reference_model) for one first hop, on
    one backend (a gpu artifact is judged against a gpu reference: convqa.workflow.references)."""
    return f"results/{model}/{variant}/reference/{hop}/transformers-{backend}.{ext}"


def serve_path(model, variant, chain, engine):
    return f"{inference_dir(model, variant, chain)}/serve-{engine}.json"


def parity_path(model, variant, chain):
    """Tokenizer and chat-template parity of one artifact (convqa.infer.parity)."""
    return f"{inference_dir(model, variant, chain)}/parity.json"


# ---------------------------------------------------------------- side-by-side converters


def side_dir(model, variant, converter, chain):
    return f"results/{model}/{variant}/xconv/{converter}/{chain}"


def side_artifact_dir(model, variant, converter, chain):
    return f"{side_dir(model, variant, converter, chain)}/artifact"


def side_sidecar_path(model, variant, converter, chain):
    return f"{side_dir(model, variant, converter, chain)}/sidecar.json"


def side_manifest_path(model, variant, converter, chain):
    return f"{side_dir(model, variant, converter, chain)}/manifest.json"


def side_comparison_path(model, variant, converter, chain, against):
    return f"{side_dir(model, variant, converter, chain)}/compare/{against}.json"


def side_benchmark_path(model, variant, converter, chain):
    return f"{side_dir(model, variant, converter, chain)}/benchmark.tsv"


def side_log(model, variant, converter, chain, step):
    return f"{side_dir(model, variant, converter, chain)}/{step}.log"


# ---------------------------------------------------------------- detection


def detection_path(name):
    return f"results/detection/{name}"


def detection_output_path_path(mutant):
    return detection_path(f"output-path/{mutant}.json")
