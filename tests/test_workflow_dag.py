"""The workflow's DAG, checked by dry runs (nothing is converted): one job per planned edge,
shared nodes built once, paths that nobody produces caught at DAG build, lint and format clean,
the cluster profile resolvable offline.

Each test runs Snakemake in a temporary copy of the workflow (`--directory`, `--workflow-profile
none`), so nothing here touches the repository's results/ or .snakemake/.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from convqa.workflow import plan
from workflow_copy import REPO, SNAKEMAKE, copy_workflow

SYNTHETIC = "config/examples/synthetic-only.yaml"
CONVERT_RULES = {"convert_to_gguf", "convert_to_apr", "convert_to_safetensors"}


def snakemake(workdir: Path, *args: str, profile: str = "none", check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "--directory", str(workdir), "--workflow-profile", profile, "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dry_run_jobs(workdir: Path, *args: str, profile: str = "none") -> list[dict]:
    """Jobs of a dry run: [{rule, wildcards: {...}, resources: {...}}] from its job listing."""
    proc = snakemake(workdir, "--dry-run", *args, profile=profile)
    jobs, job = [], None
    for line in proc.stdout.splitlines():
        header = re.match(r"^(?:local)?rule (\w+):$", line)
        if header:
            job = {"rule": header.group(1), "wildcards": {}, "resources": {}}
            jobs.append(job)
        elif job is not None and line.startswith("    wildcards: "):
            job["wildcards"] = dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split(", "))
        elif job is not None and line.startswith("    resources: "):
            job["resources"] = dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split(", "))
    return jobs


def synthetic_config() -> dict:
    return yaml.safe_load((REPO / SYNTHETIC).read_text())


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("workflow"))


@pytest.mark.parametrize("tier", ["smoke", "mvp", "full"])
def test_one_job_per_planned_edge(workflow, tier):
    config = synthetic_config()
    models, variants = list(config["models"]), config["variants"]
    jobs = dry_run_jobs(workflow, tier, "--configfile", SYNTHETIC, "--replace-workflow-config")
    by_rule = Counter(j["rule"] for j in jobs)

    conversions = [(j["wildcards"]["model"], j["wildcards"]["variant"], j["wildcards"]["chain"]) for j in jobs if j["rule"] in CONVERT_RULES]
    # A conversion two variants share (q8_0 quantizes only S->G: its S->A family is native's)
    # is one job, in its owner's directory.
    expected = {(m, plan.owning_variant(v, c, variants), c) for m in models for v in variants for c in plan.artifact_chains(tier, v)}
    assert len(conversions) == len(set(conversions)), "a conversion is scheduled twice"
    assert set(conversions) == expected
    if "q8_0" in variants and "native" in variants:
        assert not [c for m, v, c in conversions if v == "q8_0" and c.startswith("st-apr")]
        assert len(expected) < sum(len(plan.artifact_chains(tier, v)) for v in variants) * len(models)

    for j in jobs:
        if j["rule"] in CONVERT_RULES:
            assert plan.target_format(j["wildcards"]["chain"]) == j["rule"].removeprefix("convert_to_")

    # The source (chain `st`) is one node per model, shared by every variant.
    assert by_rule["prepare_source"] == len(models)
    assert by_rule["inspect_source"] == len(models)
    assert by_rule["inspect_artifact"] == len(expected)

    comparisons = {(j["wildcards"]["model"], j["wildcards"]["variant"], j["wildcards"]["subject"], j["wildcards"]["reference"])
                   for j in jobs if j["rule"] == "compare_tensors"}
    want = set()
    for m in models:
        for v in variants:
            pairs = {(c.subject, c.reference) for c in plan.checks_for(tier, v) if c.mode == "tensors"}
            pairs |= {(c, plan.parent(c)) for c in plan.artifact_chains(tier, v)}
            want |= {(m, plan.comparison_owner(v, s, r, variants), s, r) for s, r in pairs}
    assert by_rule["compare_tensors"] == len(comparisons) == len(want)
    assert comparisons == want
    assert by_rule["tensor_gates"] == len(models) * len(variants)
    assert by_rule["report"] == len(models)
    assert by_rule["summary"] == 1
    assert {j["wildcards"].get("tier") for j in jobs if j["rule"] in ("tensor_gates", "report", "summary")} == {tier}


def test_the_plan_estimate_counts_the_jobs_the_workflow_plans(workflow, tmp_path):
    """`convqa plan` prices each kind of job; its counts must be the dry run's, or its CPU minutes
    are fiction (they once left out the reference models, the servers and the parity jobs)."""
    from convqa.workflow.estimate import estimate

    config = synthetic_config()
    model = next(iter(config["models"]))
    config = config | {"tier": "mvp", "variants": ["native", "q8_0"], "models": {model: config["models"][model]}}
    config["inference"] = (config.get("inference") or {}) | {"backends": ["cpu"]}
    path = tmp_path / "one-model.yaml"
    path.write_text(yaml.safe_dump(config))
    by_rule = Counter(j["rule"] for j in dry_run_jobs(workflow, "mvp", "--configfile", str(path), "--replace-workflow-config"))
    inference = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["inference"]
    served = [tuple(cell.split(":")) for cell in inference["serve"]["mvp"]]
    e = estimate(10**9, 10**8, "mvp", ["native", "q8_0"], inference["chains"]["mvp"], served=served)
    assert e["jobs_by_kind"] == {
        "conversion": sum(by_rule[r] for r in CONVERT_RULES),
        "inspection": by_rule["inspect_artifact"],
        "comparison": by_rule["compare_tensors"],
        "inference": by_rule["infer"] + by_rule["infer_source"],
        "reference": by_rule["infer_reference"],
        "serve": by_rule["serve_check"],
        "parity": by_rule["parity"] + by_rule["parity_source"],
    }


def test_default_target_is_the_configured_tier(workflow, tmp_path):
    config = synthetic_config() | {"tier": "smoke"}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = dry_run_jobs(workflow, "--configfile", str(path), "--replace-workflow-config")
    chains = {j["wildcards"]["chain"] for j in jobs if j["rule"] in CONVERT_RULES}
    assert chains == set(plan.artifact_chains("smoke", "native"))
    assert any(j["rule"] == "all" for j in jobs)


def test_default_config_plans_the_bundled_and_synthetic_models(workflow):
    jobs = dry_run_jobs(workflow, "smoke")
    models = {j["wildcards"]["model"] for j in jobs if j["rule"] == "prepare_source"}
    assert models == {"smollm2", "qwen2-tiny", "qwen2.5-tiny-bf16"}
    variants = {j["wildcards"]["variant"] for j in jobs if j["rule"] in CONVERT_RULES}
    assert variants == {"native", "q8_0"}


def test_unproduced_input_is_a_dag_error(tmp_path):
    wd = copy_workflow(tmp_path)
    # A consumer whose input path has a typo (.ggfu): no rule makes it, and nothing exists there.
    with open(wd / "Snakefile", "a") as fh:
        fh.write(
            "\n\nrule broken_consumer:\n"
            "    input:\n"
            '        paths.artifact_path("qwen2-tiny", "native", "st-gguf").replace(".gguf", ".ggfu"),\n'
            "    output:\n"
            '        "results/broken.txt",\n'
            "    log:\n"
            '        "results/broken.log",\n'
            "    shell:\n"
            '        "touch {output}"\n'
        )
    proc = snakemake(wd, "--dry-run", "results/broken.txt", "--configfile", SYNTHETIC, "--replace-workflow-config", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "MissingInputException" in out
    assert "results/qwen2-tiny/native/st-gguf/model.ggfu" in out


def test_unproducible_target_is_a_dag_error(workflow):
    proc = snakemake(workflow, "--dry-run", "results/qwen2-tiny/native/st-gguf/model.apr",
                     "--configfile", SYNTHETIC, "--replace-workflow-config", check=False)
    assert proc.returncode != 0
    assert "MissingRuleException" in proc.stdout + proc.stderr


def test_unknown_model_is_not_matched(workflow):
    # Wildcard constraints come from the configured names: an unconfigured model has no producer.
    proc = snakemake(workflow, "--dry-run", "results/nope/native/st-gguf/model.gguf",
                     "--configfile", SYNTHETIC, "--replace-workflow-config", check=False)
    assert proc.returncode != 0
    assert "MissingRuleException" in proc.stdout + proc.stderr


def test_lint_is_clean():
    proc = subprocess.run([str(SNAKEMAKE), "--lint", "--cores", "1", "--workflow-profile", "none"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr


def test_snakefmt_is_clean():
    snakefmt = Path(sys.executable).parent / "snakefmt"
    proc = subprocess.run([str(snakefmt), "--check", "Snakefile", "rules"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_slurm_profile_resolves_offline(workflow):
    jobs = dry_run_jobs(workflow, "smoke", "--configfile", SYNTHETIC, "--replace-workflow-config", profile="profiles/slurm")
    convert = [j for j in jobs if j["rule"] == "convert_to_gguf"]
    assert convert, "no conversion jobs in the SLURM dry run"
    for j in convert:
        assert "mem_mb" in j["resources"] and "runtime" in j["resources"], j
    source = next(j for j in jobs if j["rule"] == "prepare_source")
    # A synthetic source has no input files: the profile's floor (tests/test_slurm.py checks the
    # expressions' scaling and units, and runs the profile on a real cluster).
    assert source["resources"]["mem_mb"] == "8000" and source["resources"]["runtime"] == "120"
    infer = [j for j in jobs if j["rule"] in ("infer", "infer_source", "serve_check")]
    assert infer and all({"mem_mb", "runtime"} <= set(j["resources"]) for j in infer), infer
    # No GPU partition configured (CONVQA_SLURM_GPU_PARTITION): gpu-backend runs ask for no GPU.
    assert all(j["resources"].get("gpu", "0") == "0" for j in infer)
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert "nvidia_gpu" not in (REPO / "profiles/slurm/config.yaml").read_text()
