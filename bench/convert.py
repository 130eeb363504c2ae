"""Benchmark every conversion edge: wall time, MB/s, `cp` of the same bytes for scale, peak RSS.

Peak memory must track the largest tensor, not the model: the benchmark converts two models
of the same tensor geometry and different depth (so different total size, same largest tensor)
plus the real SmolLM2-135M, and prints one row per edge. Run: `.venv/bin/python bench/convert.py`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EDGES = [("st", "gguf"), ("st", "apr"), ("gguf", "apr"), ("apr", "gguf"), ("gguf", "st"), ("apr", "st")]
EXT = {"st": "", "gguf": ".gguf", "apr": ".apr"}
FMT = {"st": "safetensors", "gguf": "gguf", "apr": "apr"}


def run_measured(argv: list[str]) -> tuple[float, float]:
    """Run a command under GNU time; return (wall seconds, peak RSS of the command in MB).

    GNU time forks from its own small process, so the RSS is the command's alone; measuring a
    child of this (large, torch-importing) process would count pages inherited at fork.
    """
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed: {proc.stderr[-2000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def largest_tensor_mb(path: Path) -> float:
    from convqa.formats import open_model

    with open_model(path) as m:
        return max(t.nbytes for t in m) / 1e6


def bench_model(name: str, source: Path, work: Path) -> list[dict]:
    convqa = str(Path(sys.executable).with_name("convqa"))
    paths = {"st": source}
    rows = []
    for src, dst in EDGES:
        out = work / f"{name}.{src}-{dst}{EXT[dst]}"
        if src != "st" and src not in paths:
            raise RuntimeError(f"no {src} artifact yet")
        wall, rss = run_measured([convqa, "convert", str(paths[src]), str(out), "--to", FMT[dst]])
        paths.setdefault(dst, out)
        nbytes = size_of(out)
        cp_target = work / "cp-copy"
        cp_wall, _ = run_measured(["cp", "-r", str(paths[src]), str(cp_target)])
        shutil.rmtree(cp_target) if cp_target.is_dir() else cp_target.unlink()
        rows.append({"model": name, "edge": f"{src}->{dst}", "MB": nbytes / 1e6, "wall_s": wall, "MB/s": nbytes / 1e6 / wall,
                     "cp_s": cp_wall, "cp_MB/s": size_of(paths[src]) / 1e6 / cp_wall, "peak_rss_MB": rss})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temp dir, removed afterwards)")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    from convqa.convert.builtin import convert
    from convqa.sources.synthetic import build_synthetic_model, smollm2_gguf_path

    work = args.work or Path(tempfile.mkdtemp(prefix="convqa-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = {}
        geometry = dict(architecture="qwen2", hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=2,
                        vocab_size=8192, tie_word_embeddings=False, seed=0)
        for layers in (4, 24):
            models[f"qwen2-{layers}L"] = build_synthetic_model(work / f"qwen2-{layers}L", num_layers=layers, **geometry)
        if not args.skip_smollm2:
            models["smollm2-135m-f32"] = work / "smollm2"
            convert(smollm2_gguf_path(), models["smollm2-135m-f32"], "safetensors")
        rows = []
        for name, path in models.items():
            print(f"# {name}: {size_of(path) / 1e6:.1f} MB, largest tensor {largest_tensor_mb(path):.1f} MB", flush=True)
            rows += bench_model(name, path, work)
        header = ["model", "edge", "MB", "wall_s", "MB/s", "cp_s", "cp_MB/s", "peak_rss_MB"]
        print("\t".join(header))
        for r in rows:
            print("\t".join(f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in header))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
