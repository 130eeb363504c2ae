"""Scale benchmark: a model of Qwen2.5-Coder-1.5B-Instruct's geometry through a tier, cold and
after a one-line change to the GGUF writer. A script that prints numbers, not a timed test.

    .venv/bin/python bench/scale.py                      # the 1.5B geometry, mvp, 2 cores
    .venv/bin/python bench/scale.py --geometry small     # same vocabulary and heads, 2 narrow layers

The model is deterministic: random BF16 weights from a fixed seed (std 0.02; norms near 1),
written as two SafeTensors shards with an index, beside the tokenizer, chat template and
hub-4.x config of the qwen2.5-tiny-bf16 preset (448 real BPE tokens; the embedding has the
geometry's 151936 rows, padded past the tokenizer as Qwen's are). The workflow and the package
are copied into the work directory, and the one-line writer change is made in that copy
(never in the checkout). Snakemake runs with `--resources mem_mb=` so two inference jobs never
hold more than that together (rules/infer.smk takes each job's mem_mb from convqa.infer.memory).

Printed: wall time of each run, peak bytes under results/ (sampled every second), peak RSS and
CPU time per rule (Snakemake's benchmark files; CPU time is what contention does not inflate),
the rerun ratio, conversions executed against the conversions the tier needs, the model's
verdict after each run (with the rows that decided against it), and the targets of issue 13.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("Snakefile", "rules", "scripts", "config", "envs", "profiles")
GEOMETRIES = {
    # Qwen2.5-Coder-1.5B-Instruct: 1.54B parameters, 3.1 GB in BF16.
    "1.5b": dict(num_layers=28, hidden_size=1536, intermediate_size=8960, num_heads=12, num_kv_heads=2, vocab_size=151936),
    # The same vocabulary and head counts, 2 narrow layers: ~60M parameters, to exercise the bench quickly.
    "small": dict(num_layers=2, hidden_size=384, intermediate_size=1024, num_heads=12, num_kv_heads=2, vocab_size=151936),
}
SEED = 0
MODEL = "scale"  # the workflow's one model: results/scale/
WRITER_EDIT = "\n_BENCH_SCALE_EDIT = 1  # bench/scale.py: a one-line change to the GGUF writer\n"
JOB_LINE = re.compile(r"^(?:local)?rule (\w+):$")
# The rules whose scripts replay an earlier run on unchanged inputs (convqa.workflow.replay).
READER_RULES = ("inspect_artifact", "inspect_source", "compare_tensors", "infer", "infer_source", "infer_reference",
                "serve_check", "serve_source", "parity", "parity_source")


# ---------------------------------------------------------------- the model


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as torch does."""
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def qwen2_tensors(g: dict) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = g["hidden_size"] // g["num_heads"]
    kv = g["num_kv_heads"] * head_dim
    h, i = g["hidden_size"], g["intermediate_size"]
    names = [("model.embed_tokens.weight", (g["vocab_size"], h))]
    for n in range(g["num_layers"]):
        p = f"model.layers.{n}."
        names += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i)),
        ]
    return names + [("model.norm.weight", (h,))]


def build_model(out: Path, geometry: str) -> Path:
    """The benchmark's source directory (deterministic; reused when it exists)."""
    import torch
    from safetensors.torch import save_file

    from convqa.sources.synthetic import build_preset

    if (out / "model.safetensors.index.json").is_file():
        return out
    g = GEOMETRIES[geometry]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    preset = build_preset(out.with_name("tokenizer-preset"), "qwen2.5-tiny-bf16")
    tmp.mkdir(parents=True)
    for f in preset.iterdir():  # tokenizer, template, generation config; not the tiny weights
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    config = json.loads((preset / "config.json").read_text())
    config.update(hidden_size=g["hidden_size"], intermediate_size=g["intermediate_size"],
                  num_hidden_layers=g["num_layers"], num_attention_heads=g["num_heads"],
                  num_key_value_heads=g["num_kv_heads"], vocab_size=g["vocab_size"])
    (tmp / "config.json").write_text(json.dumps(config, indent=2))

    rng = np.random.default_rng(SEED)
    tensors = qwen2_tensors(g)
    total = sum(int(np.prod(s)) for _, s in tensors)
    shards, current, count = [[]], 0, 0
    for name, shape in tensors:  # two shards of about half the parameters each
        if current >= total / 2 and len(shards) == 1:
            shards.append([])
        shards[-1].append((name, shape))
        current += int(np.prod(shape))
    index = {"metadata": {"total_size": 2 * total}, "weight_map": {}}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            elif name.endswith(".bias"):
                values = 0.1 * rng.standard_normal(shape, dtype=np.float32)
            else:
                values = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            data[name] = torch.from_numpy(_bf16(values)).view(torch.bfloat16)
            index["weight_map"][name] = file
            count += 1
        save_file(data, str(tmp / file), metadata={"format": "pt"})
        del data
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- the workflow


class DiskSampler(threading.Thread):
    """The peak of the bytes under `root`, sampled every second; a file counted once however many
    hard links it has (a re-run stored as a link to the artifact it repeats holds no bytes).
    `peak_added` leaves out files also linked from outside `root` (the source checkpoint, which
    prepare_source links rather than copies): the disk the run needs free."""

    def __init__(self, root: Path, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.every_s, self.stop = root, every_s, threading.Event()
        self.peak = self.peak_added = 0

    def run(self):
        from convqa.report.disk import results_disk

        while not self.stop.is_set():
            total, outside = results_disk(self.root)
            self.peak, self.peak_added = max(self.peak, total), max(self.peak_added, total - outside)
            self.stop.wait(self.every_s)


def prepare_workdir(root: Path, source: Path, args) -> Path:
    wf = root / "wf"
    shutil.rmtree(root / "pkg", ignore_errors=True)
    shutil.rmtree(wf, ignore_errors=True)
    wf.mkdir(parents=True)
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, wf / part)
    shutil.copytree(REPO / "convqa", root / "pkg" / "convqa", ignore=shutil.ignore_patterns("__pycache__"))
    import yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["tier"] = args.tier
    config["variants"] = ["native", "q8_0"]
    config["temp_intermediates"] = args.temp_intermediates
    config["inference"]["backends"] = ["cpu"]  # no GPU here: the gpu rows would only say so
    config["models"] = {MODEL: {"source": {"kind": "local", "path": str(source)}}}
    (wf / "bench-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return wf


def snakemake(wf: Path, args, log: Path) -> tuple[float, tuple[int, int], list[str]]:
    """Run the tier; (wall s, (peak bytes under results/, peak bytes the run added), rules of
    the jobs it ran)."""
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe), "--directory", str(wf), "--workflow-profile", "none", "--cores", str(args.cores),
           "--resources", f"mem_mb={args.mem_mb}", "conversion_slots=2", "--configfile", "bench-config.yaml",
           "--replace-workflow-config", args.tier]
    env = {**os.environ, "PYTHONPATH": str(wf.parent / "pkg"), "OMP_WAIT_POLICY": "PASSIVE"}
    (wf / "results").mkdir(exist_ok=True)
    sampler = DiskSampler(wf / "results")
    sampler.start()
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=wf, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"snakemake exited {proc.returncode}; see {log}")
    rules = [m.group(1) for line in log.read_text().splitlines() if (m := JOB_LINE.match(line.strip()))]
    return wall, (sampler.peak, sampler.peak_added), rules


def restores(wf: Path) -> int:
    """Conversions re-run inside jobs to bring back an artifact deleted after use
    (convqa.workflow.intermediates logs each as `restoring <path>`), as the jobs' logs say now."""
    return sum(line.startswith("restoring ")
               for log in (wf / "results").rglob("*.log")
               for line in log.read_text(errors="replace").splitlines())


def repeated_conversions(wf: Path) -> list[tuple[str, str]]:
    """Conversions that repeat another one of the run: the same converter (fingerprint), the same
    input bytes (the parent's sha256, or the source's path), the same target format and the same
    quantization, from the sidecars. A `.runN` chain repeats its run-1 chain on purpose (the
    determinism check, F-CONV-IDEM-001) and is not counted. Pairs (repeat, first)."""
    sidecars = {p.parent.relative_to(wf / "results").as_posix(): json.loads(p.read_text())
                for p in (wf / "results").rglob("sidecar.json")}
    digest = {chain: car.get("sha256") for chain, car in sidecars.items()}
    first: dict[tuple, str] = {}
    repeats = []
    for chain, car in sorted(sidecars.items()):
        if ".run" in chain.rsplit("/", 1)[-1] or not car.get("fingerprint"):
            continue
        model, variant = chain.split("/")[:2]
        parent = car.get("parent")
        parent_bytes = digest.get(f"{model}/{variant}/{parent}") if parent and parent != "st" else car.get("input")
        key = (car["fingerprint"], parent_bytes, (car.get("record") or {}).get("target_format"), car.get("quant"))
        if key in first:
            repeats.append((chain, first[key]))
        else:
            first[key] = chain
    return repeats


def rule_of(path: Path) -> str:
    """The rule a benchmark file belongs to, from where rules/*.smk put it."""
    p = path.as_posix()
    if "/logs/prepare-source" in p:
        return "prepare_source"
    if "/xconv/" in p:
        return "xconv_convert"
    if "/compare/" in p:
        return "compare_tensors"
    if p.endswith("manifest.benchmark.tsv"):
        return "inspect_artifact"
    if "/reference/" in p:
        return "infer_reference"
    if "/serve-" in p:
        return "serve_check"
    if "parity.benchmark" in p:
        return "parity"
    if "/infer/" in p or "/source.infer/" in p:
        return "infer"
    return "convert"


def benchmark_rows(wf: Path) -> dict[Path, dict]:
    """Each job's Snakemake benchmark (its last row), by benchmark file."""
    found = {}
    for path in (wf / "results").rglob("*benchmark.tsv"):
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            found[path] = rows[-1]
    return found


def benchmarks(wf: Path) -> dict[str, dict]:
    """Per rule: jobs, peak max_rss (MB) and the job that reached it, CPU and wall seconds summed."""
    per = defaultdict(lambda: {"jobs": 0, "max_rss_mb": 0.0, "max_rss_at": "", "cpu_s": 0.0, "wall_s": 0.0})
    for path, row in benchmark_rows(wf).items():
        entry = per[rule_of(path)]
        entry["jobs"] += 1
        if _num(row.get("max_rss")) > entry["max_rss_mb"]:
            entry["max_rss_mb"] = _num(row.get("max_rss"))
            entry["max_rss_at"] = path.parent.relative_to(wf / "results").as_posix()
        entry["cpu_s"] += _num(row.get("cpu_time"))
        entry["wall_s"] += _num(row.get("s"))
    return dict(per)


def manifest_largest_bytes(manifest: Path) -> int:
    """The largest tensor of an artifact as stored, from its manifest (0 if it has none)."""
    try:
        return max(int(t["nbytes"]) for t in json.loads(manifest.read_text())["tensors"])
    except (OSError, ValueError, KeyError):
        return 0


def conversion_rss(wf: Path) -> list[tuple[float, int, str]]:
    """Each conversion job: (peak RSS MB, its own largest tensor in bytes, chain), the largest
    tensor being the bigger of its input's and its output's as stored (a conversion that
    dequantizes to F32 must hold the F32 tensor it writes)."""
    from convqa.workflow import paths

    results = wf / "results"
    found = []
    for path, row in benchmark_rows(wf).items():
        if rule_of(path) != "convert":
            continue
        sidecar = json.loads((path.parent / "sidecar.json").read_text())
        source_input = sidecar.get("parent") in (None, "st")
        model = path.parent.relative_to(results).parts[0]
        input_manifest = (wf / paths.source_manifest_path(model) if source_input
                          else wf / Path(sidecar["input"]).parent / "manifest.json")
        largest = max(manifest_largest_bytes(path.parent / "manifest.json"), manifest_largest_bytes(input_manifest))
        found.append((_num(row.get("max_rss")), largest, path.parent.relative_to(results).as_posix()))
    return found


def _num(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def largest_tensor_bytes(source: Path) -> int:
    from convqa.formats import open_model

    with open_model(source) as model:
        return max(t.nbytes for t in model.tensors.values())


def verdict(wf: Path, tier: str, most: int = 8) -> str:
    """The model's qualification at the tier (its report's qualification.json), with the rows that
    decided against it: a fast run that qualifies nothing proves nothing."""
    path = wf / "results" / MODEL / "report" / tier / "qualification.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"no qualification report ({path}: {exc})"
    s = report["summary"]
    line = (f"{s['verdict']}: {s['pass']} pass, {s['fail']} fail, {s['not_evaluated']} not evaluated, "
            f"{s['skipped']} skipped ({s['verdict_reason']}); report: {path.parent / 'report.html'}")
    against = [g for g in report["gates"] if g["status"] in ("fail", "not_evaluated")]
    for g in against[:most]:
        line += f"\n    {g['status']} {g['gate']} {g['subject']}: {g['reason'][:200]}"
    if len(against) > most:
        line += f"\n    ... and {len(against) - most} more"
    return line


def hold_workdir(root: Path):
    """An exclusive lock on the work directory for this process's lifetime: two benches in one
    directory delete and rewrite each other's workflow (a second run started during the first's
    rerun once cost that rerun's numbers)."""
    import fcntl

    fh = open(root / ".bench.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        raise SystemExit(f"{root} is in use by another bench/scale.py run ({fh.read().strip() or 'pid unknown'}); "
                         "wait for it, or pass another --workdir")
    fh.truncate(0)
    fh.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    return fh


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.5b")
    parser.add_argument("--tier", default="mvp")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--mem-mb", type=int, default=18000, help="Snakemake's memory budget for concurrent jobs")
    parser.add_argument("--temp-intermediates", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convqa-scale"))
    parser.add_argument("--keep", action="store_true", help="keep results/ afterwards (they can be large)")
    parser.add_argument("--rerun", action=argparse.BooleanOptionalAction, default=True,
                        help="after the cold run, rerun after a one-line change to the GGUF writer")
    args = parser.parse_args()

    from convqa.files import path_size
    from convqa.workflow import plan
    from convqa.workflow.replay import replayed_jobs

    root = args.workdir / args.geometry
    root.mkdir(parents=True, exist_ok=True)
    lock = hold_workdir(root)  # noqa: F841 (held until the process exits)
    t0 = time.perf_counter()
    source = build_model(root / "source-model", args.geometry)
    build_s = time.perf_counter() - t0
    source_bytes = path_size(source)
    largest = largest_tensor_bytes(source)
    wf = prepare_workdir(root, source, args)

    cold_wall, (cold_disk_all, cold_disk), cold_rules = snakemake(wf, args, root / "cold.log")
    cold = benchmarks(wf)
    cold_restores = restores(wf)
    conversion_rules = ("convert_to_gguf", "convert_to_apr", "convert_to_safetensors")
    variants = ["native", "q8_0"]
    # A conversion two variants share is one (plan.owning_variant: q8_0's S->A family is native's).
    needed_chains = {(plan.owning_variant(v, c, variants), c) for v in variants for c in plan.artifact_chains(args.tier, v)}
    needed = len(needed_chains)
    executed = sum(cold_rules.count(r) for r in conversion_rules)

    # The cold run's numbers first (flushed), so that a rerun cut short still leaves them.
    g = GEOMETRIES[args.geometry]
    print(f"geometry {args.geometry} {g}; source {source_bytes / 1e9:.3f} GB (largest tensor {largest / 1e6:.0f} MB), "
          f"built in {build_s:.0f} s; tier {args.tier}, {args.cores} cores, --resources mem_mb={args.mem_mb}, "
          f"temp_intermediates={args.temp_intermediates}; load average {os.getloadavg()[0]:.1f} after the cold run "
          f"(other jobs on this machine inflate wall times, not CPU times)")
    print(f"cold:  {cold_wall:7.1f} s wall, {len(cold_rules)} jobs, peak disk added by the run {cold_disk / 1e9:.3f} GB "
          f"({cold_disk / source_bytes:.2f}x the source); under results/ with the source checkpoint's hard links "
          f"{cold_disk_all / 1e9:.3f} GB ({cold_disk_all / source_bytes:.2f}x)")
    repeats = repeated_conversions(wf)
    print(f"conversions: cold {executed} executed / {needed} chains of the tier (+{cold_restores} restored); "
          f"{len(repeats)} repeat another conversion of the run (same converter, input bytes, format, quant): "
          + (", ".join(f"{a} = {b}" for a, b in repeats) or "none"))
    print(f"{'rule':<18}{'jobs':>5}{'peak RSS MB':>13}{'CPU s':>9}{'wall s':>9}  peak RSS in")
    for rule, e in sorted(cold.items()):
        print(f"{rule:<18}{e['jobs']:>5}{e['max_rss_mb']:>13.0f}{e['cpu_s']:>9.1f}{e['wall_s']:>9.1f}  {e['max_rss_at']}")
    total_cpu = sum(e["cpu_s"] for e in cold.values())
    print(f"{'total':<18}{sum(e['jobs'] for e in cold.values()):>5}{'':>13}{total_cpu:>9.1f}", flush=True)
    print(f"verdict (cold): {verdict(wf, args.tier)}", flush=True)

    inference_rss = max((cold[r]["max_rss_mb"] for r in ("infer", "infer_reference", "serve_check") if r in cold), default=0)
    # Each conversion against its own largest tensor (the F32 tensor a dequantizing one writes
    # is twice the BF16 source's); the worst margin is the one printed.
    per_conversion = conversion_rss(wf)
    worst = max(per_conversion, key=lambda c: c[0] * 2**20 - c[1], default=(0.0, 0, "none"))
    print(f"conversion RSS: the worst job over its own largest tensor is {worst[2]}: {worst[0]:.0f} MB with a "
          f"{worst[1] / 2**20:.0f} MB tensor; the highest is {max(per_conversion, default=(0,))[0]:.0f} MB "
          f"(the source's largest tensor: {largest / 2**20:.0f} MB)")
    targets = [
        ("mvp cold <= 15 min", cold_wall <= 900, f"{cold_wall / 60:.1f} min"),
        ("peak disk added <= 4x source", cold_disk <= 4 * source_bytes, f"{cold_disk / source_bytes:.2f}x"),
        ("inference RSS <= 1.5x model bytes", inference_rss * 2**20 <= 1.5 * source_bytes,
         f"{inference_rss:.0f} MB vs {1.5 * source_bytes / 2**20:.0f} MB"),
        ("conversion RSS <= its largest tensor + 300 MB", worst[0] * 2**20 <= worst[1] + 300 * 2**20,
         f"{worst[0]:.0f} MB vs {(worst[1] + 300 * 2**20) / 2**20:.0f} MB ({worst[2]})"),
        ("every conversion done once", executed == needed and not cold_restores and not repeats,
         f"{executed}/{needed}, {cold_restores} restored, {len(repeats)} repeated"),
    ]
    if args.rerun:
        # The one-line change to the GGUF writer, in the copy of the package the runs import.
        with open(wf.parent / "pkg" / "convqa" / "formats" / "gguf_writer.py", "a") as fh:
            fh.write(WRITER_EDIT)
        rerun_wall, rerun_disk, rerun_rules = snakemake(wf, args, root / "rerun.log")
        needed_rerun = sum(1 for _v, c in needed_chains if "gguf" in plan.hops(c))
        executed_rerun = sum(rerun_rules.count(r) for r in conversion_rules)
        restored_rerun = restores(wf) - cold_restores
        replayed = len(replayed_jobs(wf / "results" / MODEL))
        readers = sum(rerun_rules.count(r) for r in READER_RULES)
        print(f"rerun: {rerun_wall:7.1f} s wall, {len(rerun_rules)} jobs after a one-line GGUF-writer change "
              f"(ratio {rerun_wall / cold_wall:.0%}); conversions {executed_rerun} executed / {needed_rerun} "
              f"GGUF-touched chains, +{restored_rerun} deleted parents restored inside the jobs that needed them; "
              f"{replayed} of {readers} reader jobs replayed (convqa.workflow.replay: the GGUF bytes are unchanged)")

        print(f"verdict (rerun): {verdict(wf, args.tier)}")
        targets.append(("rerun <= 40% of cold", rerun_wall <= 0.4 * cold_wall, f"{rerun_wall / cold_wall:.0%}"))
    for name, ok, value in targets:
        print(f"target {'MET ' if ok else 'MISS'} {name}: {value}")
    if not args.keep:
        shutil.rmtree(wf / "results", ignore_errors=True)
        print(f"removed {wf / 'results'} and its reports (--keep keeps them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
