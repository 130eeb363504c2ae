"""F-CONTRACT-OUTPUT, the output-path contract: a converter writes exactly the path it is asked
to write, and nothing else.

In the workflow a violation fails the conversion job (convqa.convert.runner), and the failed
conversion's placeholder sidecar records it: `conversion_failure_rows` turns that record into
this gate's row. The detection run (convqa.detection.matrix) runs a converter that breaks the
contract on a scratch copy of its input instead: `output_path_rows` records each converter's
run as this gate's row (a plain dict, with the converter's name, as the detection matrix reads
it from JSON).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from convqa.formats import ARTIFACT_NAME, no_artifact
from convqa.gates.rows import FAIL, GateRow, label
from convqa.workflow import plan

OUTPUT_CONTRACT_GATE = "F-CONTRACT-OUTPUT"
SCRATCH = "<scratch>"  # stands for the temporary directory in recorded messages: the matrix is reproducible


def conversion_failure_rows(chain: str, sidecar: dict | None, model: str, variant: str) -> list[GateRow]:
    """F-CONTRACT-OUTPUT for a conversion whose converter exited 0 without writing the requested
    path (the sidecar of its placeholder says so; convqa.formats.no_artifact). Other failures fail the
    edge's own check; a conversion that wrote its output has no row here."""
    failure = (sidecar or {}).get("conversion_failed")
    if not failure or failure.get("kind") != no_artifact.OUTPUT_PATH:
        return []
    row = GateRow(OUTPUT_CONTRACT_GATE, label(variant, chain), reference=label(variant, plan.parent(chain)),
                  metric="conversions not written to the requested path", threshold="0", model=model, variant=variant)
    stray = failure.get("stray") or []
    details = {"expected": failure.get("expected"), "stray": stray, "converter": failure.get("converter")}
    row.value, row.status, row.reason = "1", FAIL, failure.get("reason", "")
    row.details = json.dumps(details)
    return [row]


def output_path_rows(converters, input_artifact: str | os.PathLike, chain: str, variant: str,
                     quant: str | None) -> list[dict]:
    """One F-CONTRACT-OUTPUT row per (name, command) of `converters`, each run on a scratch copy of
    `input_artifact` to convert `chain`'s last edge (a misdirected output must not land in results/)."""
    from convqa.convert.runner import OutputPathError, expand_command, run_converter

    rows = []
    target = plan.target_format(chain)
    for converter, command in converters:
        row = {"gate": OUTPUT_CONTRACT_GATE, "subject": label(variant, chain), "reference": "",
               "metric": "conversions not written to the requested path", "threshold": "0", "converter": converter}
        with tempfile.TemporaryDirectory(prefix="convqa-output-path-") as scratch:
            scratch_path = Path(scratch).resolve()
            src = scratch_path / "input" / Path(input_artifact).name
            (shutil.copytree if Path(input_artifact).is_dir() else shutil.copy2)(input_artifact, src)
            dst = scratch_path / "output" / ARTIFACT_NAME[target]
            dst.parent.mkdir()
            argv = expand_command(command, input=str(src), output=str(dst), format=target, quant=quant)
            cwd = os.getcwd()
            os.chdir(scratch_path)  # the working directory is watched for strays too
            try:
                with open(scratch_path / "convert.log", "w+") as log:
                    run_converter(argv, str(src), str(dst), log, converter=converter)
                row.update(value="0", status="pass", reason="")
            except OutputPathError as exc:
                row.update(value="1", status="fail", reason=str(exc).replace(str(scratch_path), SCRATCH))
            finally:
                os.chdir(cwd)
        rows.append(row)
    return rows
