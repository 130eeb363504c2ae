"""The gpu cells of the mvp tier on one model, and the tolerances they measure.

Run on a machine with a CUDA device (torch with CUDA; `make setup-cuda` for llama.cpp's rows):

    .venv/bin/python bench/gpu.py                      # SmolLM2-135M, gpu cells + their cpu partners
    .venv/bin/python bench/gpu.py --backend cpu        # the same path on cpu (no device needed)
    .venv/bin/python bench/gpu.py --model qwen2-tiny   # a tiny synthetic model, in about a minute

It runs the workflow's inference gate tables of the model's `native` and `q8_0` variants (every
engine on both backends: F-BACKEND-001 needs the cpu partner of each gpu run) in a working
directory of its own, then prints every row of the backend asked for, F-BACKEND-001's measured
values per engine (what goes into config inference.backend_tolerances, with its reason) and the
largest gpu-vs-gpu values per variant and engine (F-INF on gpu: 0 under transformers for a
lossless conversion; F-INF-REF: 0). Exit status 0 when every printed row passed, 1 when one
failed or was not evaluated, 2 when none ran (no device: every row skipped, reasons printed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "smollm2": {"source": {"kind": "bundled", "name": "smollm2-135m-instruct"}},
    "qwen2-tiny": {"source": {"kind": "synthetic", "preset": "qwen2-tiny", "seed": 0}},
}
VARIANTS = ("native", "q8_0")


def workflow_config(model: str, backend: str) -> dict:
    """The repository's config, cut to one model, the two variants and the backends to run."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["tier"] = "mvp"
    config["variants"] = list(VARIANTS)
    config["models"] = {model: MODELS[model]}
    # gpu rows need their cpu partners (F-BACKEND-001); the cpu path needs nothing else.
    config["inference"]["backends"] = ["cpu", "gpu"] if backend == "gpu" else ["cpu"]
    return config


def run_workflow(model: str, backend: str, workdir: Path, cores: int) -> list[Path]:
    from convqa.workflow import paths

    workdir.mkdir(parents=True, exist_ok=True)
    configfile = workdir / "gpu-check.yaml"
    configfile.write_text(yaml.safe_dump(workflow_config(model, backend), sort_keys=False))
    targets = [paths.inference_gates_path(model, v, "mvp") for v in VARIANTS]
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = [str(snakemake), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--workflow-profile", "none",
           "--cores", str(cores), "--configfile", str(configfile), "--replace-workflow-config", *targets]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return [workdir / t for t in targets]


def backend_of(row: dict) -> str | None:
    if row["gate"] == "F-BACKEND-001":
        return "gpu"
    for backend in ("cpu", "gpu"):
        if f"-{backend}-" in row["gate"]:
            return backend
    return None


def worst_values(found: list[dict]) -> str:
    """The worst value of each limit over the rows: the largest error, the lowest top-1 agreement."""
    names = found[0]["metric"].split("; ")
    worst = []
    for i, name in enumerate(names):
        values = [float(str(r["value"]).split("; ")[i]) for r in found]
        worst.append(min(values) if name == "top-1 agreement" else max(values))
    return "; ".join(f"{v:.3g}" for v in worst)


def measured(rows: list[dict], backend: str) -> list[str]:
    """Lines: F-BACKEND-001 per engine, then the worst F-INF / F-INF-REF values on `backend` per
    (variant, gate family, engine)."""
    groups = defaultdict(list)
    for r in rows:
        if r["status"] not in ("pass", "fail") or not r["metric"]:
            continue
        engine = r["subject"].rsplit("/", 1)[-1]
        if r["gate"] == "F-BACKEND-001":
            groups[("F-BACKEND-001", engine.rsplit("-", 1)[0], "")].append(r)
        elif backend_of(r) == backend and r["gate"].startswith("F-INF"):
            family = "F-INF-REF" if r["gate"].startswith("F-INF-REF") else "F-INF"
            groups[(f"{family} {backend}", engine, r["variant"])].append(r)
    return [f"{family} {variant + ' ' if variant else ''}{engine}: {found[0]['metric']} = {worst_values(found)} "
            f"(worst of {len(found)}; threshold {found[0]['threshold']})"
            for (family, engine, variant), found in sorted(groups.items())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--backend", choices=["gpu", "cpu"], default="gpu",
                        help="cpu: run and print the cpu cells instead (the same path, no device needed)")
    parser.add_argument("--workdir", type=Path, default=REPO / "results-gpu-check")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)

    from convqa.report.evidence import read_gate_table

    tables = run_workflow(args.model, args.backend, args.workdir.resolve(), args.cores)
    rows = [r for t in tables for r in read_gate_table(t)]
    mine = [r for r in rows if backend_of(r) == args.backend]
    print(f"\n{args.model}, mvp, {args.backend}: {len(mine)} rows")
    for r in mine:
        value = f"{r['metric']} = {r['value']} ({r['threshold']}) " if r["metric"] else ""
        print(f"  {r['gate']:<24} {r['subject']:<34} {r['status']:<13} {value}{r['reason'][:160]}")
    print("\nmeasured:")
    for line in measured(rows, args.backend) or ["nothing measured: no row of this backend ran"]:
        print(f"  {line}")
    statuses = {r["status"] for r in mine}
    if not statuses or statuses == {"skipped"}:
        return 2
    return 0 if statuses <= {"pass", "skipped"} else 1


if __name__ == "__main__":
    sys.exit(main())
