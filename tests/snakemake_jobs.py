"""Every job of a workflow's DAG with its evaluated params, as JSON lines (one job per line).

    python tests/snakemake_jobs.py WORKDIR TARGET[,TARGET...] [CONFIGFILE...]

Run in a subprocess with PYTHONPATH pointing at a copy of the package, so the params (the code
fingerprints) describe that copy. Snakemake builds the DAG as for a dry run, with every job
planned (forceall); nothing is executed and nothing is written but Snakemake's own metadata.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings, StorageSettings


def plain(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def main(workdir: Path, targets: list[str], configfiles: list[str]) -> None:
    with SnakemakeApi(OutputSettings()) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[Path(c) for c in configfiles],
                                           replace_workflow_config=bool(configfiles)),
            storage_settings=StorageSettings(),
            snakefile=workdir / "Snakefile",
            workdir=workdir,
        )
        workflow_api.dag(DAGSettings(targets=set(targets), forceall=True))
        workflow = workflow_api._workflow  # no public API lists a DAG's jobs with their params
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        for job in sorted(workflow.dag.jobs, key=lambda j: (j.rule.name, sorted(map(str, j.output)))):
            print(json.dumps({
                "rule": job.rule.name,
                "wildcards": dict(job.wildcards_dict),
                "input": sorted(map(str, job.input)),
                "output": sorted(map(str, job.output)),
                "log": sorted(map(str, job.log)),
                "params": {k: plain(v) for k, v in job.params.items()},
            }, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:])
