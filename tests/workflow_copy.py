"""A temporary copy of the workflow and of the convqa package, for tests that run Snakemake for real.

The runs import the copied package (PYTHONPATH), so a test can edit converter code, and find
executables in the copy's `bin/` first (PATH), so a test can install a stand-in tool, without
touching the repository.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
WORKFLOW_PARTS = ("Snakefile", "rules", "scripts", "config", "envs", "profiles")


def copy_workflow(dest: Path) -> Path:
    """The workflow's files (not the package) copied into `dest`."""
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / part)
    return dest


class Workflow:
    """root/wf: the workflow and its results; root/pkg/convqa: the package the runs import."""

    def __init__(self, root: Path):
        self.root = root
        self.workdir = root / "wf"
        self.package = root / "pkg" / "convqa"

    @classmethod
    def create(cls, root: Path, config: dict) -> "Workflow":
        wf = cls(root)
        wf.workdir.mkdir(parents=True)
        copy_workflow(wf.workdir)
        shutil.copytree(REPO / "convqa", wf.package, ignore=shutil.ignore_patterns("__pycache__"))
        wf.write_config(config)
        return wf

    def clone(self, root: Path) -> "Workflow":
        """A copy of this workflow with its results and Snakemake metadata."""
        shutil.copytree(self.root, root, symlinks=True, dirs_exist_ok=True)
        return Workflow(root)

    def write_config(self, config: dict) -> None:
        (self.workdir / "test-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def config(self) -> dict:
        return yaml.safe_load((self.workdir / "test-config.yaml").read_text())

    def env(self, **extra: str) -> dict:
        return {**os.environ, "PYTHONPATH": str(self.package.parent),
                "PATH": f"{self.workdir / 'bin'}{os.pathsep}{os.environ['PATH']}", **extra}

    def command(self, *args: str) -> list[str]:
        return [str(SNAKEMAKE), "--directory", str(self.workdir), "--workflow-profile", "none", "--cores", "2",
                "--configfile", "test-config.yaml", "--replace-workflow-config", *args]

    def run(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(*args), cwd=self.workdir, env=self.env(**env), capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"snakemake {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def planned_jobs(self, *args: str) -> list[tuple[str, dict]]:
        """(rule, wildcards) of every job a dry run would execute."""
        jobs = []
        for line in self.run("--dry-run", *args).stdout.splitlines():
            if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
                jobs.append((line.split()[1].rstrip(":"), {}))
            elif line.startswith("    wildcards: ") and jobs:
                jobs[-1][1].update(kv.split("=", 1) for kv in line.split(": ", 1)[1].split(", "))
        return jobs

    def path(self, relative: str) -> Path:
        return self.workdir / relative

    def rows(self, relative: str) -> list[dict]:
        """A gate table (TSV) of the results."""
        with open(self.path(relative), newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t"))
