# The config checked, the global wildcard constraints and the one object every rule file uses.
#
# Everything a rule computes from the config or its wildcards lives in convqa.workflow.jobs (`J`,
# input functions and params) and every path in convqa.workflow.paths, used by the producing
# rule's `output:` and by every consumer's `input:`, so a path that nobody produces is a DAG
# error at dry-run time, never a file discovered (or missed) by globbing.

import sys
from pathlib import Path

from snakemake.utils import validate

from convqa.workflow import fingerprint as fingerprints, jobs, paths, plan
from convqa.workflow.paths import SOURCE_CHAIN

validate(config, schema="../config/schema.yaml")

J = jobs.Jobs(config, Path(workflow.basedir) / "scripts")
# The run's `--resources conversion_slots=N`, if any (a Resource, its value None when not given).
provided = getattr(workflow.global_resources.get("conversion_slots"), "value", None)
J.conversion_slots_provided = provided if isinstance(provided, int) else None
MODELS = J.models
TIER = J.tier
INFERENCE = J.inference


wildcard_constraints:
    model=J.constraint("model"),
    variant=J.constraint("variant"),
    chain=J.constraint("chain"),
    subject=J.constraint("subject"),
    reference=J.constraint("reference"),
    tier=J.constraint("tier"),
    engine=J.constraint("engine"),
    backend=J.constraint("backend"),
    converter=J.constraint("converter"),
    against=J.constraint("against"),
    mutant=J.constraint("mutant"),


def maybe_temp(path):
    """A side-by-side converter's artifact is Snakemake's temp() when `temp_intermediates` is on
    (only its own manifest and comparisons read it). The primary chains' artifacts are released
    by rules/intermediates.smk instead, so that a deleted parent comes back without rerunning its
    other readers (convqa.workflow.intermediates)."""
    return temp(path) if config["temp_intermediates"] else path
