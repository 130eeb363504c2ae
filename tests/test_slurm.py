"""profiles/slurm against a real SLURM cluster, and the profile's resource expressions.

The cluster tests run the real workflow (smoke tier, one tiny synthetic model) with
`snakemake --profile profiles/slurm` exactly as a user on a login node does, through the pinned
snakemake-executor-plugin-slurm, against whatever cluster `sinfo` reaches; in CI that is the
one-node cluster of `scripts/slurm_local.sh up` (.ci/run). They skip, with the reason, where no
cluster is reachable. While the run goes, the test cancels (scancel) the running job of
prepare_source (a directory output) and of one conversion: the profile promises a resubmission
with doubled resources, and that nothing the killed job left is trusted.

The expression tests need no cluster: they evaluate every set-resources expression of the
profile with Snakemake's own evaluator for a 3 GB model and check units and magnitudes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from workflow_copy import REPO, SNAKEMAKE, Workflow

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
MODEL = "qwen2-tiny"
CONFIG = {
    "tier": "smoke",
    "variants": ["native"],
    "models": {MODEL: {"source": {"kind": "synthetic", "preset": "qwen2-tiny", "seed": 0}}},
}
# S->G goes through a stand-in converter that writes its output in two halves, non-atomically,
# and between them waits while the file CONVQA_TEST_HOLD exists: the test kills its job with
# half a GGUF at the declared output path. Everything else is convqa's own converter.
HALFWRITE = """\
import os, pathlib, subprocess, sys, tempfile, time
src, out = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    whole = pathlib.Path(tmp) / "model.gguf"
    convqa = pathlib.Path(sys.executable).with_name("convqa")
    subprocess.run([str(convqa), "convert", src, str(whole), "--to", "gguf"], check=True, stdout=sys.stderr)
    data = whole.read_bytes()
with open(out, "wb") as fh:
    fh.write(data[: len(data) // 2])
    fh.flush()
    hold, deadline = os.environ.get("CONVQA_TEST_HOLD"), time.monotonic() + 300
    while hold and os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.2)
    fh.write(data[len(data) // 2 :])
"""
CLUSTER_CONFIG = {
    **CONFIG,
    "converter": "convqa",
    "converters": {
        "convqa": {"command": "convqa convert {input} {output} --to {format} {quant_arg} --json", "json_record": True},
        "halfwrite": {"command": "{python} bin/halfwrite.py {input} {output}", "edges": ["st-gguf"],
                      "probe": {"files": ["bin/halfwrite.py"]}},
    },
    "route": {"st-gguf": "halfwrite"},
}
GGUF = f"results/{MODEL}/native/st-gguf/model.gguf"
# A SLURM run that does not finish in this time is killed (Ctrl-C: the plugin scancels its jobs).
RUN_TIMEOUT_S = 600
# The plugin waits 40 s before the first status query and up to 180 s between them: right for a
# site, idle time here. This changes only the polling, nothing the jobs get.
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "5")
CANCEL = ("prepare_source", "convert_to_gguf")
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) ")


# ---------------------------------------------------------------- the profile's expressions


def profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def workflow_rules() -> dict[str, bool]:
    """{rule name: whether it runs as a cluster job} for every rule of rules/*.smk.

    Local rules and rules without an action (targets) never reach sbatch.
    """
    rules = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        blocks = re.split(r"^(?=rule \w+:|use rule )", smk.read_text(), flags=re.M)
        for block in blocks:
            header = re.match(r"rule (\w+):|use rule (\w+) as (\w+)", block)
            if not header:
                continue
            if header.group(1):
                name, body = header.group(1), block
                acts = bool(re.search(r"^    (script|shell|run|wrapper|notebook):", body, re.M))
            else:
                name, body = header.group(3), block
                acts = rules[header.group(2)]
            rules[name] = acts and not re.search(r"^    localrule: True", body, re.M)
    return rules


def evaluate(expression: str, inputs: dict[str, Path], attempt: int = 1, **wildcards: str):
    """The value Snakemake computes for a profile resource expression, with its own evaluator."""
    from snakemake.common import async_run
    from snakemake.iocontainers import InputFiles, Wildcards
    from snakemake.resources import Resource

    return Resource.cli_evaluator(
        "x", expression, wildcards=Wildcards(fromdict=wildcards),
        input=InputFiles(fromdict={k: str(v) for k, v in inputs.items()}),
        attempt=attempt, async_run=async_run,
    )


@pytest.fixture(scope="module")
def model_3gb(tmp_path_factory) -> dict[str, Path]:
    """A 3 GB model as files of that size (sparse: no disk used): an HF directory and a GGUF."""
    root = tmp_path_factory.mktemp("sizes")
    source = root / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    with open(source / "model.safetensors", "wb") as fh:
        fh.truncate(3 * 10**9)
    with open(root / "model.gguf", "wb") as fh:
        fh.truncate(3 * 10**9)
    return {"dir": source, "gguf": root / "model.gguf"}


def inputs_of(rule: str, model: dict[str, Path]) -> dict[str, Path]:
    """Representative inputs of a rule for the model: the largest the rule reads."""
    if rule == "prepare_source":
        return {"gguf": model["gguf"]}  # a GGUF import
    if rule in {"infer", "infer_source", "infer_reference", "serve_check", "serve_check_source"}:
        return {"artifact": model["gguf"], "source": model["dir"]}
    if rule in {"compare_tensors", "xconv_compare"}:
        return {"subject": model["gguf"], "reference": model["dir"]}
    return {"artifact": model["dir"]}  # conversions and inspections of the S directory


def test_every_cluster_rule_has_memory_and_runtime():
    rules = workflow_rules()
    assert {"infer", "infer_source", "infer_reference", "serve_check", "serve_check_source",
            "inference_gates", "convert_to_gguf", "convert_to_apr", "convert_to_safetensors"} <= set(rules)
    assert not rules["report"] and not rules["summary"], "report and summary are localrules"
    set_resources = profile()["set-resources"]
    missing = [r for r, remote in rules.items() if remote and not {"mem_mb", "runtime"} <= set(set_resources.get(r, {}))]
    assert not missing, f"rules submitted to SLURM without mem_mb and runtime in profiles/slurm: {missing}"
    unknown = set(set_resources) - set(rules)
    assert not unknown, f"set-resources for rules that do not exist: {unknown}"


def test_resources_scale_with_a_3gb_model_in_mb_and_minutes(model_3gb, tmp_path):
    model_mb = 3 * 10**9 / 2**20
    for rule, resources in profile()["set-resources"].items():
        inputs = inputs_of(rule, model_3gb)
        mem = evaluate(resources["mem_mb"], inputs)
        runtime = evaluate(resources["runtime"], inputs)
        assert isinstance(mem, int) and isinstance(runtime, int), (rule, mem, runtime)
        # mem_mb is megabytes: a few GB for a 3 GB model, never the GB count or the bytes.
        assert 1500 <= mem <= 64000, f"{rule}: mem_mb={mem} for a 3 GB model is not in MB"
        # runtime is minutes: at least 10 minutes, at most a day (not seconds, not hours).
        assert 10 <= runtime <= 24 * 60, f"{rule}: runtime={runtime} for a 3 GB model is not in minutes"
        assert evaluate(resources["mem_mb"], inputs, 2) >= 2 * mem - 1, f"{rule}: memory does not double on retry"
        assert evaluate(resources["runtime"], inputs, 2) >= 2 * runtime - 1, f"{rule}: runtime does not double on retry"
    rules = profile()["set-resources"]
    big = inputs_of("convert_to_gguf", model_3gb)
    empty = tmp_path / "empty"
    empty.mkdir()
    # Scaling with the model, counting the files inside a directory input (Snakemake's
    # input.size_mb sees a directory as 4 KiB).
    for rule in ("convert_to_gguf", "inspect_source", "infer", "serve_check", "compare_tensors"):
        large = evaluate(rules[rule]["mem_mb"], inputs_of(rule, model_3gb))
        small = evaluate(rules[rule]["mem_mb"], {k: empty for k in inputs_of(rule, model_3gb)})
        assert large - small >= int(model_mb), f"{rule}: {small} MB for nothing, {large} MB for 3 GB"
    conversion = evaluate(rules["convert_to_gguf"]["mem_mb"], big)
    assert conversion >= 3 * model_mb, "a conversion holds a dequantized copy of the largest tensor"
    inference = evaluate(rules["infer"]["mem_mb"], inputs_of("infer", model_3gb))
    assert inference >= 2 * model_mb + 1000, "inference holds the F32 weights, the engine and the logits"


def test_site_settings_come_from_the_environment(monkeypatch):
    defaults, infer = profile()["default-resources"], profile()["set-resources"]["infer"]
    for name in ("CONVQA_SLURM_ACCOUNT", "CONVQA_SLURM_PARTITION", "CONVQA_SLURM_GPU_PARTITION"):
        monkeypatch.delenv(name, raising=False)
    # Unset: no -A (the plugin leaves the account to SLURM), the cluster's default partition,
    # and the gpu backend's jobs stay on CPU nodes (their rows are skipped "no CUDA device").
    assert evaluate(defaults["slurm_account"], {}) == ""
    assert evaluate(defaults["slurm_partition"], {}) == ""
    assert evaluate(infer["gpu"], {}, backend="gpu") == 0
    assert evaluate(infer["slurm_partition"], {}, backend="gpu") == ""
    monkeypatch.setenv("CONVQA_SLURM_ACCOUNT", "proj42")
    monkeypatch.setenv("CONVQA_SLURM_PARTITION", "batch")
    monkeypatch.setenv("CONVQA_SLURM_GPU_PARTITION", "a100")
    assert evaluate(defaults["slurm_account"], {}) == "proj42"
    assert evaluate(defaults["slurm_partition"], {}) == "batch"
    assert evaluate(infer["gpu"], {}, backend="gpu") == 1
    assert evaluate(infer["slurm_partition"], {}, backend="gpu") == "a100"
    assert evaluate(infer["gpu"], {}, backend="cpu") == 0
    assert evaluate(infer["slurm_partition"], {}, backend="cpu") == "batch"
    text = PROFILE.read_text()
    assert "nvidia_gpu" not in text and "slurm_account: " not in text.split("default-resources:")[0]


def test_status_is_queried_with_squeue():
    # sacct fails on clusters without slurmdbd accounting, and the plugin then loses its jobs.
    assert profile()["slurm-status-command"] == "squeue"
    pinned = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("snakemake-executor-plugin-slurm==")]
    assert pinned == ["snakemake-executor-plugin-slurm==2.8.0"]


# ---------------------------------------------------------------- a real cluster


def no_cluster_reason() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM cluster: sinfo/sbatch not on PATH (scripts/slurm_local.sh up starts a one-node one)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no SLURM cluster reachable: sinfo timed out"
    if proc.returncode != 0:
        return f"no SLURM cluster reachable: {'; '.join(proc.stderr.split(chr(10)))[:240]}"
    if not re.search(r"^(idle|mixed|allocated|completing)", proc.stdout, re.M):
        return f"no SLURM node up: sinfo says {proc.stdout.split()}"
    return None


def squeue(run_id: str) -> list[dict]:
    """Every job of a run, running or finished (until MinJobAge), as squeue lists it."""
    out = subprocess.run(["squeue", "--states=all", "-h", "--name", run_id, "-o", "%i|%T|%k|%P"],
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(("id", "state", "comment", "partition"), line.split("|"))) for line in out.splitlines() if line]


def scontrol_job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def snakemake_slurm(wf: Workflow, *args: str, log: Path, **env: str) -> subprocess.Popen:
    cmd = [str(SNAKEMAKE), "--profile", "profiles/slurm", "--configfile", "test-config.yaml",
           "--replace-workflow-config", *FAST_POLLING, *args]
    return subprocess.Popen(cmd, cwd=wf.workdir, env=wf.env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT)


STALL_S = 90


def wait(proc: subprocess.Popen, timeout: float, log: Path, run_id: str | None = None) -> int:
    """The exit status of a SLURM run; it fails if the run hangs: nothing of it queued or
    running in SLURM and nothing logged for STALL_S seconds (the plugin lost track of its jobs,
    as it does when its status queries fail), or no end within `timeout`."""
    deadline, last_size, last_change = time.monotonic() + timeout, -1, time.monotonic()
    problem = None
    while proc.poll() is None:
        now = time.monotonic()
        size = log.stat().st_size
        if size != last_size:
            last_size, last_change = size, now
        elif run_id and now - last_change > STALL_S and not [j for j in squeue(run_id) if j["state"] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")]:
            problem = f"hung: nothing queued or running in SLURM and nothing logged for {STALL_S} s"
        if now > deadline:
            problem = f"not finished after {timeout} s"
        if problem:
            proc.send_signal(2)  # Ctrl-C: the plugin cancels its SLURM jobs
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise AssertionError(f"SLURM run {problem}:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return proc.returncode


def run_id_of(log: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"SLURM run ID: (\S+)", log.read_text())
        if found:
            return found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no SLURM run ID in the log:\n{log.read_text()[-3000:]}")


def cancel_while_running(run_id: str, proc: subprocess.Popen, wf: Workflow, hold: Path, cancelled: dict) -> None:
    """scancel prepare_source as soon as SLURM runs it, then convert_to_gguf once it has
    written half its output; then let the retry through (remove the hold file)."""
    def running(rule: str) -> str | None:
        jobs = [j for j in squeue(run_id) if j["comment"].startswith(f"rule_{rule}_") and j["state"] == "RUNNING"]
        return jobs[0]["id"] if jobs else None

    while proc.poll() is None and "prepare_source" not in cancelled:
        if job := running("prepare_source"):
            subprocess.run(["scancel", job], check=True)
            cancelled["prepare_source"] = job
        time.sleep(0.2)
    while proc.poll() is None and "convert_to_gguf" not in cancelled:
        job = running("convert_to_gguf")
        if job and wf.path(GGUF).exists() and wf.path(GGUF).stat().st_size > 0:
            cancelled["half_written_bytes"] = wf.path(GGUF).stat().st_size
            subprocess.run(["scancel", job], check=True)
            cancelled["convert_to_gguf"] = job
        time.sleep(0.2)
    while proc.poll() is None and any(j["state"] != "CANCELLED" for j in squeue(run_id) if j["id"] == cancelled.get("convert_to_gguf")):
        time.sleep(0.2)
    time.sleep(6)  # KillWait (5 s): the killed converter's processes are gone
    hold.unlink(missing_ok=True)


class SlurmRun:
    def __init__(self, wf: Workflow, local: Workflow, log: str, returncode: int, wall_s: float, run_id: str, cancelled: dict):
        self.wf, self.local, self.log, self.returncode = wf, local, log, returncode
        self.wall_s, self.run_id, self.cancelled = wall_s, run_id, cancelled

    def submissions(self) -> list[tuple[str, str]]:
        """(Snakemake job id, SLURM job id) of every sbatch, from the run's log."""
        return SUBMITTED.findall(self.log)

    def job_blocks(self) -> dict[str, dict]:
        """Snakemake job id -> {rule, resources} of the last time the log announced it."""
        blocks = {}
        for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", self.log):
            rule = re.search(r"^(local)?rule (\w+):$", block, re.M)
            jobid = re.search(r"^    jobid: (\d+)$", block, re.M)
            if rule and jobid:
                resources = re.search(r"^    resources: (.*)$", block, re.M)
                res = dict(kv.split("=", 1) for kv in resources.group(1).split(", ")) if resources else {}
                blocks[jobid.group(1)] = {"rule": rule.group(2), "local": bool(rule.group(1)), "resources": res}
        return blocks

    def finished(self) -> list[tuple[str, str]]:
        return re.findall(r"Finished jobid: (\d+) \(Rule: (\w+)\)", self.log)


NO_CLUSTER = no_cluster_reason()
if NO_CLUSTER and os.environ.get("CONVQA_REQUIRE_SLURM"):
    # .ci/run brought a cluster up: its absence is a failure, not a reason to skip.
    requires_slurm = pytest.mark.usefixtures("cluster_required")
else:
    requires_slurm = pytest.mark.skipif(bool(NO_CLUSTER), reason=NO_CLUSTER or "")


@pytest.fixture(scope="module")
def cluster_required():
    pytest.fail(f"CONVQA_REQUIRE_SLURM is set but {NO_CLUSTER}")


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory) -> SlurmRun:
    root = tmp_path_factory.mktemp("slurm")
    wf = Workflow.create(root / "cluster", CLUSTER_CONFIG)
    wf.path("bin").mkdir()
    wf.path("bin/halfwrite.py").write_text(HALFWRITE)
    local = wf.clone(root / "local")  # the same code, run on this machine for comparison
    log, hold = root / "slurm.log", root / "hold"
    hold.touch()
    start = time.monotonic()
    proc = snakemake_slurm(wf, "smoke", log=log, CONVQA_TEST_HOLD=str(hold))
    cancelled: dict = {}
    try:
        run_id = run_id_of(log, proc)
        killer = threading.Thread(target=cancel_while_running, args=(run_id, proc, wf, hold, cancelled), daemon=True)
        killer.start()
        returncode = wait(proc, RUN_TIMEOUT_S, log, run_id)
    finally:
        if proc.poll() is None:
            proc.kill()
    wall_s = time.monotonic() - start
    killer.join(timeout=30)
    hold.unlink(missing_ok=True)
    half_written = cancelled.pop("half_written_bytes", None)
    print(f"\nSLURM smoke run: {wall_s:.0f} s wall, exit {returncode}, cancelled {cancelled}")
    local.run("smoke")
    run = SlurmRun(wf, local, log.read_text(), returncode, wall_s, run_id, cancelled)
    run.half_written = half_written
    return run


@requires_slurm
def test_run_succeeds_through_slurm_despite_killed_jobs(slurm_run):
    assert slurm_run.returncode == 0, slurm_run.log[-6000:]
    assert set(slurm_run.cancelled) == set(CANCEL), f"the test did not catch {CANCEL} running: {slurm_run.cancelled}"
    qualification = json.loads(slurm_run.wf.path(f"results/{MODEL}/report/smoke/qualification.json").read_text())
    assert qualification["summary"]["verdict"] == "QUALIFIED", qualification["summary"]
    # Nothing left to do, nothing incomplete: the cluster run's outputs and metadata are whole.
    dry = slurm_run.wf.run("--dry-run", "smoke")
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]


@requires_slurm
def test_every_job_was_submitted_with_sbatch(slurm_run):
    submissions = slurm_run.submissions()
    slurm_ids = [s for _, s in submissions]
    assert len(set(slurm_ids)) == len(slurm_ids), "one SLURM job id per submission"
    blocks = slurm_run.job_blocks()
    finished = slurm_run.finished()
    # Local rules (the report, and the release jobs that delete intermediates) run on the
    # submitting host; every rule with an action that is not local goes to sbatch.
    runs_remotely = workflow_rules()
    remote = [(j, r) for j, r in finished if runs_remotely.get(r, False)]
    local = [(j, r) for j, r in finished if not runs_remotely.get(r, False)]
    assert remote and {r for _, r in local} >= {"report", "summary", "release_artifact"}
    # Every job that ran remotely was submitted once, plus once more for each cancelled one;
    # local rules never were.
    assert len(submissions) == len(remote) + len(slurm_run.cancelled), (len(submissions), len(remote), slurm_run.cancelled)
    assert {j for j, _ in submissions} == {j for j, _ in remote}
    assert not any(blocks[j]["local"] for j, _ in submissions)
    # SLURM itself knows exactly these jobs under the run's job name: completed, but the two
    # the test cancelled.
    known = {j["id"]: j for j in squeue(slurm_run.run_id)}
    assert set(known) == set(slurm_ids), (sorted(known), sorted(slurm_ids))
    states = {i: j["state"] for i, j in known.items()}
    assert {i for i, s in states.items() if s == "CANCELLED"} == set(slurm_run.cancelled.values()), states
    assert all(s == "COMPLETED" for i, s in states.items() if i not in slurm_run.cancelled.values()), states


@requires_slurm
def test_resources_reach_sbatch_in_mb_and_minutes(slurm_run):
    blocks = slurm_run.job_blocks()
    checked = 0
    retried = {}
    for jobid, slurm_id in slurm_run.submissions():
        if slurm_id in slurm_run.cancelled.values():
            continue  # its block was printed again for the retry, with attempt=2 resources
        res, job = blocks[jobid]["resources"], scontrol_job(slurm_id)
        # sbatch --mem takes megabytes, -t minutes: what SLURM granted is what Snakemake computed.
        assert job["MinMemoryNode"] == f"{res['mem_mb']}M", (blocks[jobid]["rule"], job["MinMemoryNode"], res)
        minutes = int(res["runtime"])
        assert job["TimeLimit"] == f"{minutes // 60:02d}:{minutes % 60:02d}:00", (blocks[jobid]["rule"], job["TimeLimit"], res)
        if blocks[jobid]["rule"] in slurm_run.cancelled:
            retried[blocks[jobid]["rule"]] = res
        checked += 1
    assert checked >= 15
    # The resubmitted jobs got the attempt=2 resources: doubled.
    for rule, res in retried.items():
        first = [blocks_res for blocks_res in re.findall(
            rf"rule {rule}:\n(?:    .*\n)*?    resources: (.*)", slurm_run.log)]
        assert len(first) >= 2, rule
        first_mem = int(dict(kv.split("=", 1) for kv in first[0].split(", "))["mem_mb"])
        assert int(res["mem_mb"]) >= 2 * first_mem - 1, (rule, first_mem, res["mem_mb"])
        assert int(res["runtime"]) == 2 * int(dict(kv.split("=", 1) for kv in first[0].split(", "))["runtime"])
    assert set(retried) == set(slurm_run.cancelled)
    # Inference jobs are sized like inference, not like a gate table.
    infer = [b for b in blocks.values() if b["rule"] in ("infer", "infer_source")]
    assert infer and all(int(b["resources"]["mem_mb"]) >= 2000 and b["resources"]["gpu"] == "0" for b in infer)


@requires_slurm
def test_killed_jobs_were_retried_and_nothing_half_written_is_trusted(slurm_run):
    for rule, slurm_id in slurm_run.cancelled.items():
        # What the user sees: the SLURM state and the resubmission.
        assert re.search(rf"SLURM-job '{slurm_id}' failed, SLURM status is: 'CANCELLED'", slurm_run.log), rule
        later = slurm_run.log.split(f"SLURM-job '{slurm_id}' failed", 1)[1]
        assert re.search(rf"rule {rule}:", later), f"{rule} was not resubmitted after {slurm_id} was cancelled"
    # The outputs of the killed jobs were rebuilt whole: the same bytes as the local run's.
    source = f"results/{MODEL}/source"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert sha256(slurm_run.wf.path(f"{source}/{name}")) == sha256(slurm_run.local.path(f"{source}/{name}")), name
    # The conversion was killed with half a GGUF at its output path; Snakemake removed it, and
    # the retry wrote the whole file: the local run's bytes, recorded in its sidecar. The GGUF
    # is an intermediate (temp_intermediates, the default): its release job deleted it after its
    # last reader, so its sidecar and release record are what is left to check it by.
    chain_dir = f"results/{MODEL}/native/st-gguf"
    cluster_sidecar, local_sidecar = (json.loads(w.path(f"{chain_dir}/sidecar.json").read_text())
                                      for w in (slurm_run.wf, slurm_run.local))
    whole = cluster_sidecar["size"]
    assert slurm_run.half_written and 0 < slurm_run.half_written < whole, (slurm_run.half_written, whole)
    assert re.search(rf"Removing output files of failed job convert_to_gguf since they might be corrupted:\n{re.escape(GGUF)}", slurm_run.log)
    assert cluster_sidecar["sha256"] == local_sidecar["sha256"]
    released = json.loads(slurm_run.wf.path(f"{chain_dir}/released-smoke.json").read_text())
    assert released["deleted"] and released["bytes"] == whole, released
    assert not slurm_run.wf.path(GGUF).exists()


@requires_slurm
def test_gate_rows_are_byte_identical_to_a_local_run(slurm_run):
    report = f"results/{MODEL}/report/smoke/qualification.json"
    cluster, local = (json.loads(w.path(report).read_text()) for w in (slurm_run.wf, slurm_run.local))
    assert cluster["gates"], "no gate rows"
    assert json.dumps(cluster["gates"], sort_keys=True) == json.dumps(local["gates"], sort_keys=True)
    assert cluster["summary"] == local["summary"]
    assert [(a["label"], a["file_sha256"]) for a in cluster["artifacts"]] == [(a["label"], a["file_sha256"]) for a in local["artifacts"]]
    for table in ("tensor.tsv", "inference.tsv"):
        path = f"results/{MODEL}/native/gates/smoke/{table}"
        assert slurm_run.wf.path(path).read_bytes() == slurm_run.local.path(path).read_bytes(), table


@requires_slurm
def test_partition_comes_from_the_environment(tmp_path):
    """CONVQA_SLURM_PARTITION reaches sbatch -p; a wrong one fails the job with SLURM's message."""
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    others = [p for p in partitions if not p.endswith("*")]
    if not others:
        pytest.skip(f"the cluster has one partition only ({partitions}): nothing to choose")
    wf = Workflow.create(tmp_path / "p", CONFIG)
    target = f"results/{MODEL}/source.sidecar.json"
    log = tmp_path / "alt.log"
    assert wait(snakemake_slurm(wf, target, log=log, CONVQA_SLURM_PARTITION=others[0]), 300, log) == 0, log.read_text()[-3000:]
    run_id = re.search(r"SLURM run ID: (\S+)", log.read_text()).group(1)
    assert {j["partition"] for j in squeue(run_id)} == {others[0]}
    shutil.rmtree(wf.path("results"))
    log = tmp_path / "bad.log"
    assert wait(snakemake_slurm(wf, target, log=log, CONVQA_SLURM_PARTITION="no-such-partition"), 300, log) != 0
    text = log.read_text()
    assert "SLURM sbatch failed" in text and "invalid partition" in text.lower() and "-p no-such-partition" in text, text[-3000:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
