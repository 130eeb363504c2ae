"""A gate row, its statuses, and the TSV gate table the workflow writes.

Every gate produces one row per (gate, subject[, reference]) with the measured value, the
threshold and a status: pass | fail | skipped | not_evaluated. A gate never passes vacuously:
when its inputs are missing or empty it says `not_evaluated` with the reason, which counts
against coverage. `skipped` is only for an absent capability (no CUDA device).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from convqa.gates.registry import REGISTRY

PASS, FAIL, SKIPPED, NOT_EVALUATED = "pass", "fail", "skipped", "not_evaluated"
LISTED_PROBLEMS = 3  # named in a row's reason; up to DETAILED_PROBLEMS are in its details
DETAILED_PROBLEMS = 200


@dataclass
class GateRow:
    gate: str
    subject: str
    reference: str = ""
    metric: str = ""
    value: str = ""
    threshold: str = ""
    status: str = NOT_EVALUATED
    reason: str = ""
    model: str = ""
    variant: str = ""
    details: str = ""  # JSON, for the report

    def __post_init__(self) -> None:
        if self.gate not in REGISTRY:
            raise ValueError(f"unknown gate {self.gate!r}")


COLUMNS = [f.name for f in fields(GateRow)]


def fmt(x) -> str:
    """A measured value or threshold as the gate table writes it."""
    if x is None:
        return ""
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.6g}"
    return str(x)


def write_rows_tsv(rows: list[GateRow], path: str | Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def label(variant: str, chain: str) -> str:
    return f"{variant}/{chain}"


def problems_reason(problems: list[str]) -> str:
    """The first problems, and how many more there are."""
    more = f" (+{len(problems) - LISTED_PROBLEMS} more)" if len(problems) > LISTED_PROBLEMS else ""
    return "; ".join(problems[:LISTED_PROBLEMS]) + more


def verdict(row: GateRow, count: int, problems: list[str]) -> GateRow:
    """A counting gate: passes when `count` is 0; the problems are its reason and details."""
    row.value = str(count)
    row.status = PASS if count == 0 else FAIL
    if problems:
        row.reason = problems_reason(problems)
        row.details = json.dumps({"problems": problems[:DETAILED_PROBLEMS]})
    return row
