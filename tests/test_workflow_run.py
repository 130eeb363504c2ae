"""Real workflow runs on a tiny synthetic model: reports and sidecars are produced and the
artifacts deleted after use (the default); a touch of converter code reruns nothing while a real
change reruns exactly the affected edges, restoring a deleted parent once without rerunning its
other readers; a converter
that writes beside its input or exits non-zero still ends in a NOT QUALIFIED report naming the
failure; a conversion killed half way is not trusted by the next run.

The workflow and the convqa package are copied into a temporary directory and the runs import
that copy (PYTHONPATH), so the tests can edit converter code without touching the repository.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from convqa.workflow import plan
from convqa.encodings import QUANT_TARGETS
from workflow_copy import Workflow
from workflow_runs import CONVQA_COMMAND, MODEL, VARIANT, run_config

CONVERT_RULES = {"convert_to_gguf", "convert_to_apr", "convert_to_safetensors"}

pytestmark = pytest.mark.slow


def artifact_path(chain: str) -> str:
    if chain == "st":
        return f"results/{MODEL}/source"
    name = {"gguf": "model.gguf", "apr": "model.apr", "safetensors": "model"}[plan.target_format(chain)]
    return f"results/{MODEL}/{VARIANT}/{chain}/{name}"


@pytest.fixture(scope="module")
def built(qwen2_mvp) -> Workflow:
    """The session's mvp run (conftest.py, tests/workflow_runs.py). Tests that change it clone it."""
    return qwen2_mvp


def restore_artifact(wf: Workflow, chain: str, log) -> str:
    """Bring a deleted artifact of `wf` back from its sidecar, as a rerun's job does."""
    from convqa.workflow.intermediates import restore

    cwd = os.getcwd()
    os.chdir(wf.workdir)  # sidecars record the paths relative to the workflow's directory
    try:
        restore(artifact_path(chain), log)
    finally:
        os.chdir(cwd)
    return str(wf.path(artifact_path(chain)))


def test_run_writes_reports_and_sidecars(built, tmp_path):
    from convqa.formats import open_model
    from convqa.inspect.manifest import file_sha256

    for name in ("qualification.json", "report.md", "report.html", "junit.xml"):
        assert built.path(f"results/{MODEL}/report/mvp/{name}").stat().st_size > 0
    summary = yaml.safe_load(built.path("results/summary/mvp/summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == [MODEL]

    restored = built.clone(tmp_path / "restored")
    with open(tmp_path / "restore.log", "w") as log:
        for chain in plan.artifact_chains("mvp", VARIANT):
            sidecar = yaml.safe_load(built.path(f"results/{MODEL}/{VARIANT}/{chain}/sidecar.json").read_text())
            # Deleted by default once every job of the tier that reads it was done, and recorded.
            assert not built.path(artifact_path(chain)).exists(), chain
            released = yaml.safe_load(built.path(f"results/{MODEL}/{VARIANT}/{chain}/released-mvp.json").read_text())
            assert released["deleted"] and released["bytes"] == sidecar["size"], chain
            repeated = plan.repeated_chain(chain)
            if repeated:
                # A re-run converts while the conversion it repeats is on disk, and the same
                # bytes are stored once: whichever was deleted first left them to the other.
                assert sidecar["shares_bytes_with"] == artifact_path(repeated), chain
                first = yaml.safe_load(built.path(f"results/{MODEL}/{VARIANT}/{repeated}/released-mvp.json").read_text())
                assert released["bytes_still_linked"] + first["bytes_still_linked"] == sidecar["size"], chain
            assert sidecar["argv"][1:4] == ["convert", artifact_path(plan.parent(chain)), artifact_path(chain)]
            assert sidecar["fingerprint"].startswith("convqa:")
            assert sidecar["wall_s"] > 0 and sidecar["peak_rss_mb"] > 0
            assert sidecar["record"]["tensors_written"] > 0
            # The quantization is applied when leaving S, never again, and only to a format that
            # holds it (APR has no Q8_0 blocks: S->A keeps the source dtypes).
            holds = plan.target_format(chain) in QUANT_TARGETS[VARIANT]
            expected_quant = VARIANT if plan.is_first_hop(chain) and holds else None
            assert sidecar["quant"] == expected_quant, chain
            assert ("--quant" in sidecar["argv"]) == (expected_quant is not None), chain
            # Restored from its sidecar (its parents first, and deleted again), it is the same bytes.
            artifact = restore_artifact(restored, chain, log)
            assert sidecar["sha256"] == file_sha256(artifact)
            with open_model(artifact) as model:
                assert len(model.tensors) == sidecar["record"]["tensors_written"]
    # The report's Disk section says what was deleted.
    report = built.path(f"results/{MODEL}/report/mvp/report.md").read_text()
    assert "deleted after use" in report and "| deleted after use |" in report
    assert "stored as hard links to identical artifacts" in report
    source_sidecar = yaml.safe_load(built.path(f"results/{MODEL}/source.sidecar.json").read_text())
    assert source_sidecar["record"]["kind"] == "synthetic"
    assert source_sidecar["converter"] == "source:synthetic"
    assert built.path(f"results/{MODEL}/source/config.json").is_file(), "the source is never deleted"


def test_nothing_to_do_after_a_run(built):
    assert built.planned_jobs("mvp") == []


def test_touching_converter_code_reruns_nothing(built, tmp_path):
    wf = built.clone(tmp_path / "touched")  # the run is the session's: other files clone it too
    future = time.time() + 60
    for module in ("gguf.py", "gguf_writer.py"):
        os.utime(wf.package / "formats" / module, (future, future))
    for script in (wf.workdir / "rules").iterdir():
        os.utime(script, (future, future))
    assert wf.planned_jobs("mvp") == []


def test_a_comment_in_the_gguf_writer_reruns_nothing(built, tmp_path):
    wf = built.clone(tmp_path / "commented")
    with open(wf.package / "formats" / "gguf_writer.py", "a") as fh:
        fh.write("\n# a comment: the code's behaviour is the same\n")
    assert wf.planned_jobs("mvp") == []


def restores_logged(wf: Workflow) -> list[str]:
    """The artifacts the jobs' logs say they restored (convqa.workflow.intermediates)."""
    found = []
    for log in wf.path("results").rglob("*.log"):
        found += [line.split()[1] for line in log.read_text(errors="replace").splitlines() if line.startswith("restoring ")]
    return sorted(found)


def test_changing_the_gguf_writer_reruns_exactly_the_gguf_edges(built, tmp_path):
    """S->G and A->G run the writer; G->A and the rest of a GGUF chain read what it wrote. The
    artifacts were deleted after use: A->G's input S->A is restored inside the A->G job, once,
    and S->A's other readers (its manifest, S->A->S, the untouched comparisons) do not rerun."""
    wf = built.clone(tmp_path / "changed")
    with open(wf.package / "formats" / "gguf_writer.py", "a") as fh:
        fh.write("\n_A_REAL_CHANGE = 1\n")
    jobs = wf.planned_jobs("mvp")
    rerun = {(rule, w.get("chain")) for rule, w in jobs}

    gguf_chains = {c for c in plan.artifact_chains("mvp", VARIANT) if "gguf" in plan.hops(c)}
    untouched = set(plan.artifact_chains("mvp", VARIANT)) - gguf_chains
    assert untouched == {"st-apr", "st-apr.run2", "st-apr-st"}
    converted = {chain for rule, chain in rerun if rule in CONVERT_RULES}
    assert converted == gguf_chains
    inspected = {chain for rule, chain in rerun if rule == "inspect_artifact"}
    assert inspected == gguf_chains
    assert not any(rule in ("prepare_source", "inspect_source") for rule, _ in rerun)
    for rule, w in jobs:
        if rule == "compare_tensors":  # only comparisons that involve a GGUF-touched chain
            assert {w["subject"], w["reference"]} & gguf_chains, w
        if rule in ("infer", "serve_check", "parity", "infer_reference"):
            assert w.get("chain", w.get("hop")) in gguf_chains, (rule, w)
    untouched_pairs = {("st-apr", "st"), ("st-apr.run2", "st"), ("st-apr-st", "st-apr"), ("st-apr-st", "st")}
    assert not {(w["subject"], w["reference"]) for rule, w in jobs if rule == "compare_tensors"} & untouched_pairs
    # Deleted again after use: every rewritten artifact, and S->A, restored for S->A->G.
    assert {chain for rule, chain in rerun if rule == "release_artifact"} == gguf_chains | {"st-apr"}
    assert {rule for rule, _ in jobs} >= {"tensor_gates", "report", "summary"}
    assert len(jobs) < 0.8 * len(built_jobs(built)), "not narrower than a cold run"

    wf.run("mvp")
    assert restores_logged(wf) == [artifact_path("st-apr")], "a deleted parent restored more than once, or another"
    assert not wf.path(artifact_path("st-apr")).exists()
    assert wf.planned_jobs("mvp") == []
    evidence = yaml.safe_load(wf.path(f"results/{MODEL}/report/mvp/qualification.json").read_text())
    assert evidence["summary"]["verdict"] == "QUALIFIED", evidence["summary"]

    # The change left the GGUF bytes alone, so every reader that reran was replayed
    # (convqa.workflow.replay): the cold run's outputs, byte for byte, and not computed again.
    readers = [(rule, w) for rule, w in jobs if rule in REPLAYABLE_RULES]
    assert {rule for rule, _ in readers} >= {"inspect_artifact", "compare_tensors", "infer", "parity", "infer_reference"}
    for rule, w in readers:
        output, log = reader_output_and_log(rule, w)
        assert wf.path(log).read_text().startswith("replayed: "), (rule, w)
        assert wf.path(output).read_bytes() == built.path(output).read_bytes(), (rule, w)
    for chain in gguf_chains:  # the conversions themselves ran (the writer's code changed)
        assert not wf.path(f"results/{MODEL}/{VARIANT}/{chain}/convert.log").read_text().startswith("replayed")


REPLAYABLE_RULES = {"inspect_artifact", "compare_tensors", "infer", "serve_check", "parity", "infer_reference"}


def reader_output_and_log(rule: str, w: dict) -> tuple[str, str]:
    """One reader job's main output and its log (rules/*.smk: the log beside the output)."""
    from convqa.workflow import paths

    model, variant = w["model"], w["variant"]
    if rule == "inspect_artifact":
        return paths.manifest_path(model, variant, w["chain"]), paths.step_log(model, variant, w["chain"], "inspect")
    output = {
        "compare_tensors": lambda: paths.comparison_path(model, variant, w["subject"], w["reference"]),
        "infer": lambda: paths.inference_run_path(model, variant, w["chain"], w["engine"], w["backend"]),
        "infer_reference": lambda: paths.reference_run_path(model, variant, w["hop"], backend=w["backend"]),
        "serve_check": lambda: paths.serve_path(model, variant, w["chain"], w["engine"]),
        "parity": lambda: paths.parity_path(model, variant, w["chain"]),
    }[rule]()
    return output, paths.log_beside(output)


def test_a_restore_that_gives_other_bytes_is_refused(built, tmp_path):
    """A converter that is not deterministic cannot stand in for the artifact its sidecar records:
    the readers that ran on the first copy would be judged with ones that ran on another."""
    import json

    from convqa.workflow.intermediates import RestoreError

    wf = built.clone(tmp_path / "nondeterministic")
    sidecar_path = wf.path(f"results/{MODEL}/{VARIANT}/st-gguf/sidecar.json")
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["argv"] = [sys.executable, "-c", "import os, sys; open(sys.argv[2], 'wb').write(os.urandom(64))",
                       artifact_path("st"), artifact_path("st-gguf")]
    sidecar_path.write_text(json.dumps(sidecar))
    with open(tmp_path / "restore.log", "w") as log, pytest.raises(RestoreError, match="not deterministic"):
        restore_artifact(wf, "st-gguf", log)
    assert not wf.path(artifact_path("st-gguf")).exists(), "the other bytes were left in place"


def built_jobs(built) -> list:
    """Every job of a cold run of the tier (a dry run that plans all of them)."""
    return built.planned_jobs("mvp", "--forceall")


def test_changing_the_apr_writer_reruns_everything_downstream_of_an_apr_write(built, tmp_path):
    wf = built.clone(tmp_path / "apr")
    with open(wf.package / "formats" / "apr.py", "a") as fh:
        fh.write("\n_A_REAL_CHANGE = 1\n")
    jobs = wf.planned_jobs("mvp")
    converted = {w["chain"] for rule, w in jobs if rule in CONVERT_RULES}
    # An APR write on the way makes a chain (and everything after it) depend on the writer.
    apr_downstream = {c for c in plan.artifact_chains("mvp", VARIANT) if "apr" in plan.hops(c)}
    assert converted == apr_downstream
    assert {"st-apr-gguf", "st-gguf-apr-gguf", "st-apr-st"} <= converted  # G and S written from an APR
    inspected = {w["chain"] for rule, w in jobs if rule == "inspect_artifact"}
    assert inspected >= apr_downstream
    assert not any(rule == "prepare_source" for rule, _ in jobs)


def test_a_changed_source_reruns_everything(built, tmp_path):
    wf = built.clone(tmp_path / "source")
    config = wf.config()
    config["models"][MODEL]["source"]["seed"] = 1
    wf.write_config(config)
    jobs = wf.planned_jobs("mvp")
    cold = built_jobs(built)
    assert sorted(jobs, key=repr) == sorted(cold, key=repr)


def test_primary_converters_that_fail_still_end_in_a_not_qualified_report(built, tmp_path):
    """CONV-001's `model.converted.gguf` case on S->G, a converter exiting 3 on S->A: the workflow
    finishes (no --keep-going), each failed edge fails naming what went wrong (the expected and the
    stray path; the exit status and stderr), and everything downstream waits on it."""
    wf = built.clone(tmp_path / "failing")
    failing = {"command": "{python} -c 'import sys; sys.stderr.write(\"no BF17 support\\n\"); sys.exit(3)' {input} {output}"}
    config = run_config(extra_converters={"beside": {"command": CONVQA_COMMAND.replace(" --json", " --mutant write-beside-input")},
                                          "failing": failing})
    config["route"] = {"st-gguf": ["beside"], "st-apr": ["failing"]}
    wf.write_config(config)
    proc = wf.run("mvp", "--latency-wait", "0")
    assert proc.returncode == 0
    # The input is the source directory: the mutant writes <input>/model.converted.gguf, left in place.
    stray = wf.path(f"results/{MODEL}/source/model.converted.gguf")
    assert stray.is_file(), "the mutant did not write beside its input"
    expected = f"results/{MODEL}/{VARIANT}/st-gguf/model.gguf"
    log = wf.path(f"results/{MODEL}/{VARIANT}/st-gguf/convert.log").read_text()
    assert expected in log
    # st-gguf and its re-run st-gguf.run2 both write that stray; whichever runs second finds it
    # already there, so the stray is named by the first one to run (the order is Snakemake's).
    named_by = [c for c in ("st-gguf", "st-gguf.run2")
                if str(stray.resolve()) in wf.path(f"results/{MODEL}/{VARIANT}/{c}/convert.log").read_text()]
    assert named_by, "no conversion log names the stray file"

    evidence = yaml.safe_load(wf.path(f"results/{MODEL}/report/mvp/qualification.json").read_text())
    assert evidence["summary"]["verdict"] == "NOT QUALIFIED"
    rows = wf.rows(f"results/{MODEL}/{VARIANT}/gates/mvp/tensor.tsv")
    by = {(r["gate"], r["subject"]): r for r in rows}
    edge = by[("F-CONV-S-G", f"{VARIANT}/st-gguf")]
    assert edge["status"] == "fail" and expected in edge["reason"]
    contract = by[("F-CONTRACT-OUTPUT", f"{VARIANT}/{named_by[0]}")]
    assert contract["status"] == "fail" and str(stray.resolve()) in contract["reason"]
    assert by[("F-CONTRACT-OUTPUT", f"{VARIANT}/st-gguf")]["status"] == "fail"
    exited = by[("F-CONV-S-A", f"{VARIANT}/st-apr")]
    assert exited["status"] == "fail" and "exited 3" in exited["reason"] and "no BF17 support" in exited["reason"]
    # Downstream of the failed edges: not evaluated, naming the edge that failed.
    for gate, chain, failed in (("F-CONV-G-A", "st-gguf-apr", "st-gguf"), ("F-CONV-RT-002", "st-gguf-apr-gguf", "st-gguf"),
                                ("G0-INTEGRITY", "st-gguf", "st-gguf"), ("G0-INTEGRITY", "st-gguf-apr", "st-gguf"),
                                ("F-CONTRACT-I2", "st-gguf-apr", "st-gguf"), ("F-CONV-A-G", "st-apr-gguf", "st-apr")):
        row = by[(gate, f"{VARIANT}/{chain}")]
        assert row["status"] == "not_evaluated" and f"{failed} failed" in row["reason"], (gate, chain, row)
    assert {r["status"] for r in rows if r["subject"] != f"{VARIANT}/st"} == {"fail", "not_evaluated"}, \
        "nothing passes on a placeholder"
    inference = wf.rows(f"results/{MODEL}/{VARIANT}/gates/mvp/inference.tsv")
    gguf_rows = [r for r in inference if r["subject"].startswith(f"{VARIANT}/st-gguf/") and r["status"] != "skipped"]
    assert gguf_rows and all(r["status"] == "not_evaluated" and "st-gguf failed" in r["reason"] for r in gguf_rows)
    # A placeholder, never a model: the strict reader refuses it, naming the failed edge.
    from convqa.formats import open_model
    from convqa.formats.no_artifact import NoArtifactError

    with pytest.raises(NoArtifactError, match="the conversion st-gguf failed"):
        open_model(wf.path(expected))


FAKE_CONVERTER = textwrap.dedent("""\
    # A converter that, when told to hang, writes a partial artifact and stalls (to be killed).
    import os, subprocess, sys, time
    src, dst, fmt, *rest = sys.argv[1:]
    if os.environ.get("FAKE_CONVERTER_HANG"):
        with open(dst, "wb") as fh:
            fh.write(b"GGUF partial")
        time.sleep(600)
    sys.exit(subprocess.call([sys.executable, "-m", "convqa.cli", "convert", src, dst, "--to", fmt, *rest]))
""")


def test_killed_conversion_is_not_trusted(built, tmp_path):
    from convqa.formats import open_model
    from convqa.inspect.manifest import file_sha256

    wf = built.clone(tmp_path / "killed")
    fake = wf.root / "fake_convert.py"
    fake.write_text(FAKE_CONVERTER)
    command = f"{sys.executable} {fake} {{input}} {{output}} {{format}} {{quant_arg}}"
    wf.write_config(run_config("fake", {"fake": {"command": command}}))
    target = f"results/{MODEL}/{VARIANT}/st-gguf/model.gguf"
    artifact = wf.path(target)

    proc = subprocess.Popen(wf.command(target), cwd=wf.workdir, env=wf.env(FAKE_CONVERTER_HANG="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (artifact.exists() and artifact.read_bytes().startswith(b"GGUF partial")):
            assert proc.poll() is None, "snakemake ended before the conversion started"
            assert time.monotonic() < deadline, "the conversion never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    assert artifact.read_bytes() == b"GGUF partial"
    wf.run("--unlock")
    refused = wf.run(target, check=False)
    assert refused.returncode != 0
    assert "IncompleteFilesException" in refused.stdout + refused.stderr

    wf.run(target, "--rerun-incomplete")
    with open_model(artifact) as model:
        assert model.format == "gguf" and len(model.tensors) > 0
    sidecar = yaml.safe_load(wf.path(f"results/{MODEL}/{VARIANT}/st-gguf/sidecar.json").read_text())
    assert sidecar["sha256"] == file_sha256(artifact)
    assert wf.planned_jobs(target) == []


def test_local_gguf_and_offline_hub_sources(built, tmp_path):
    wf = built.clone(tmp_path / "sources")
    local_dir = built.path(f"results/{MODEL}/source")
    with open(tmp_path / "restore.log", "w") as log:  # deleted after use: the clone's copy, restored
        gguf_file = restore_artifact(wf, "st-gguf", log)
    config = run_config()
    config["models"] = {
        "from-local": {"source": {"kind": "local", "path": str(local_dir)}},
        "from-gguf": {"source": {"kind": "gguf", "path": str(gguf_file)}},
        "from-hub": {"source": {"kind": "hub", "repo_id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "main"}},
    }
    wf.write_config(config)
    targets = [f"results/{m}/source.sidecar.json" for m in ("from-local", "from-gguf")]
    wf.run(*targets, HF_HUB_OFFLINE="1")

    local = yaml.safe_load(wf.path(targets[0]).read_text())
    assert local["record"]["origin"]["path"] == str(local_dir.resolve())
    # The checkpoint's files are hard links (one filesystem here), not a second copy of the model.
    assert sorted(local["record"]["hard_linked"]) == sorted(p.name for p in local_dir.iterdir() if not p.name.startswith("."))
    assert os.path.samefile(wf.path("results/from-local/source/model.safetensors"), local_dir / "model.safetensors")
    assert local["record"]["files"]["model.safetensors"]["sha256"] == yaml.safe_load(
        built.path(f"results/{MODEL}/source.sidecar.json").read_text())["record"]["files"]["model.safetensors"]["sha256"]
    imported = yaml.safe_load(wf.path(targets[1]).read_text())
    # The q8_0 GGUF's quantized weights are dequantized to F32, and that is recorded.
    assert imported["record"]["record"]["dequantized"], "no dequantization recorded"
    assert {(src, dst) for _, src, dst in imported["record"]["record"]["dequantized"]} == {("Q8_0", "F32")}

    proc = wf.run("results/from-hub/source.sidecar.json", check=False, HF_HUB_OFFLINE="1")
    assert proc.returncode != 0
    log = wf.path("results/from-hub/logs/prepare-source.log").read_text()
    assert "cannot download Qwen/Qwen2.5-0.5B-Instruct@main from the Hugging Face Hub" in log
    assert "kind: local" in log


def test_snakemake_report(built, tmp_path):
    wf = built.clone(tmp_path / "report")
    wf.run("mvp", "--report", "snakemake-report.html")
    html = wf.path("snakemake-report.html").read_text(errors="replace")
    assert "Qualification" in html and MODEL in html
    # every report output attached with its caption, and the workflow description (rules/captions/)
    for caption in ("self-contained page", "for a pull request or a terminal", "JUnit", "Qualification evidence of", "across every model",
                    "qualifies model-format converters"):
        assert caption in html, caption
    for name in ("report.html", "report.md", "junit.xml", "qualification.json", "summary.json"):
        assert name in html, name
    zipped = wf.run("mvp", "--report", "snakemake-report.zip", check=False)
    assert zipped.returncode == 0, zipped.stderr[-2000:]
    import zipfile
    names = zipfile.ZipFile(wf.path("snakemake-report.zip")).namelist()
    attached = sorted(n.rsplit("/", 1)[1] for n in names if "/data/raw/" in n)
    assert attached == ["junit.xml", "qualification.json", "report.html", "report.md", "summary.json", "summary.md"], names


def conversions_side_by_side(log: str) -> list[list[str]]:
    """The conversions a Snakemake log shows running when each conversion starts ("variant/chain",
    the one starting first), from its events in order: a job starts at `rule convert_to_...:` +
    `jobid: N` (its `wildcards:` follow) and ends at `Finished jobid: N`."""
    running, seen, rule, job = {}, [], None, None
    for line in log.splitlines():
        stripped = line.strip()
        if stripped.startswith(("rule ", "localrule ")) and stripped.endswith(":"):
            rule, job = stripped.split()[1].rstrip(":"), None
        elif stripped.startswith("jobid: ") and rule in CONVERT_RULES:
            job = stripped.split()[1]
        elif stripped.startswith("wildcards: ") and job is not None:
            wildcards = dict(kv.split("=", 1) for kv in stripped.split(": ", 1)[1].split(", "))
            running[job] = f"{wildcards['variant']}/{wildcards['chain']}"
            seen.append([running[job], *(c for j, c in running.items() if j != job)])
            rule = job = None
        elif stripped.startswith("Finished jobid: "):
            running.pop(stripped.split()[2].rstrip(")."), None)
    return seen


def test_the_default_profile_runs_a_conversion_that_outgrows_the_source_alone(built, tmp_path):
    """profiles/default provides 2 `conversion_slots`: a conversion that writes more bytes than
    the source holds (after a Q8_0 GGUF of a BF16 model, F32) takes both and runs alone, any other
    takes one, so that two of those run side by side (the other core would otherwise read
    artifacts, or wait). At 1.5B, two F32 conversions at once were the peak disk."""
    wf = built.clone(tmp_path / "slots")
    model = "qwen2.5-tiny-bf16"
    config = wf.config()
    config["variants"] = ["native", VARIANT]
    config["models"] = {model: {"source": {"kind": "synthetic", "preset": model, "seed": 0}}}
    wf.write_config(config)
    wide = [f"{VARIANT}/st-gguf-apr", f"{VARIANT}/st-gguf-st"]
    narrow = ["native/st-gguf", "native/st-apr", f"{VARIANT}/st-gguf"]
    targets = [f"results/{model}/{c}/sidecar.json" for c in narrow + wide]
    command = wf.command(*targets)
    unlimited = subprocess.run(command, cwd=wf.workdir, env=wf.env(), capture_output=True, text=True)
    assert unlimited.returncode == 0, unlimited.stderr[-3000:]
    seen = conversions_side_by_side(unlimited.stderr)
    assert sorted(s[0] for s in seen) == sorted(narrow + wide)
    assert max(map(len, seen)) == 2, "the check cannot see two conversions at once"
    assert "convqa: conversions are not limited" in unlimited.stderr  # said once, before anything runs
    assert unlimited.stderr.count("Add conversion_slots=2 to keep the default") == 1

    command = wf.command(*targets, "--forcerun", *sorted(CONVERT_RULES))
    command[command.index("--workflow-profile") + 1] = str(wf.workdir / "profiles" / "default")
    limited = subprocess.run(command, cwd=wf.workdir, env=wf.env(), capture_output=True, text=True)
    assert limited.returncode == 0, limited.stderr[-3000:]
    assert 'Resource("conversion_slots", 2)' in limited.stderr  # what the profile provides
    assert "conversions are not limited" not in limited.stderr
    seen = conversions_side_by_side(limited.stderr)
    assert sorted(s[0] for s in seen) == sorted(narrow + wide)
    assert max(map(len, seen)) == 2, seen  # two that hold the source's dtype (or Q8_0 blocks)
    for running in seen:
        if set(running) & set(wide):
            assert len(running) == 1, f"an F32 conversion ran beside another: {running}"
