"""Run one converter command and record what it did: the artifact's sidecar.

A converter is a command template from the workflow config (`convqa convert {input} {output}
--to {format} {quant_arg}` for the built-in one, any other tool's command line for an external
one). It is expanded token by token into an argv, never through a shell, so paths with spaces
stay one argument and the recorded argv is exactly what ran.

The output-path contract: the converter must write exactly the path it was asked for. If it
exits without doing so, the job fails with a message naming the expected path and the files
that appeared beside the input or in the working directory while it ran (the classic
"model.converted.gguf next to the source" bug), instead of a later rule picking up whatever it
finds.

The sidecar (`sidecar.json` beside the artifact) holds the artifact's sha256 and size, the
converter's name, fingerprint and argv, wall time, peak RSS and tool versions, plus the
converter's own record when it prints one (`convqa convert --json`).
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from convqa.files import path_size
from convqa.inspect.manifest import file_sha256
from convqa.versions import CONVERSION_TOOLS, tool_versions

SIDECAR_VERSION = 1
STRAY_LIMIT = 20  # stray files named in an error message; more are counted
STDERR_TAIL_CHARS = 2000  # of a failed converter's stderr, in its error message and fail row


class OutputPathError(RuntimeError):
    """The converter exited without writing the path it was asked to write."""

    def __init__(self, message: str, strays: list[Path] = ()):
        super().__init__(message)
        self.strays = list(strays)


class ConverterExitError(subprocess.CalledProcessError):
    """The converter exited non-zero; `stderr_tail` is the end of what it printed on stderr."""

    def __init__(self, returncode: int, argv: list[str], stdout: str, stderr_tail: str, converter: str | None):
        super().__init__(returncode, argv, output=stdout)
        self.stderr_tail = stderr_tail
        self.converter = converter

    def __str__(self) -> str:
        who = f"converter {self.converter!r}" if self.converter else "converter"
        return f"{who} exited {self.returncode}: {shlex.join(self.cmd)}\n--- stderr (tail) ---\n{self.stderr_tail}"


@dataclass
class CommandResult:
    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float
    stdout: str


def expand_command(template: str, *, input: str, output: str, format: str, quant: str | None) -> list[str]:
    """argv from a converter template. `{quant_arg}` as a whole token becomes `--quant Q` or
    nothing; `{input}`, `{output}`, `{outdir}` (the output's directory), `{format}`, `{quant}` and
    `{python}` (the interpreter running the job) may appear inside any token."""
    argv: list[str] = []
    values = {"input": input, "output": output, "outdir": os.path.dirname(output) or ".", "format": format,
              "quant": quant or "", "python": sys.executable}
    for token in shlex.split(template):
        if token == "{quant_arg}":
            argv.extend(["--quant", quant] if quant else [])
            continue
        try:
            argv.append(token.format(**values))
        except (KeyError, IndexError) as exc:
            raise ValueError(f"converter command {template!r}: unknown placeholder {exc}; "
                             "known: {input} {output} {outdir} {format} {quant} {quant_arg} {python}") from None
    if not argv:
        raise ValueError("converter command is empty")
    return argv


def resolve_program(argv: list[str]) -> list[str]:
    """Find argv[0] on PATH or, failing that, beside the running Python (a venv's bin/ when the
    venv is not activated, which is how `.venv/bin/snakemake` runs its jobs)."""
    program = argv[0]
    if os.sep in program:
        return argv
    found = shutil.which(program) or shutil.which(program, path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError(f"converter program {program!r} not found on PATH or in {Path(sys.executable).parent}")
    return [found, *argv[1:]]


def _listing(directories: list[Path]) -> dict[Path, set[str]]:
    return {d: set(os.listdir(d)) if d.is_dir() else set() for d in directories}


def watched_directories(input_path: Path, output_path: Path) -> list[Path]:
    """Where a misdirected converter typically writes: beside the input, inside an input
    directory, beside the requested output, and the working directory."""
    dirs = [input_path.parent, output_path.parent, Path.cwd()]
    if input_path.is_dir():
        dirs.insert(0, input_path)
    unique: list[Path] = []
    for d in dirs:
        d = d.resolve()
        if d not in unique:
            unique.append(d)
    return unique


def new_files(before: dict[Path, set[str]]) -> list[Path]:
    after = _listing(list(before))
    return sorted(d / name for d, names in after.items() for name in names - before[d])


def run_converter(argv: list[str], input_path: str, output_path: str, log, *,
                  env: dict[str, str] | None = None, converter: str | None = None) -> CommandResult:
    """Run argv with `env` added to the environment, stream its stderr to `log`, and enforce the
    output-path contract. A non-zero exit raises ConverterExitError with the stderr tail; an exit
    0 without the output raises OutputPathError naming the files written instead and `converter`."""
    input_p, output_p = Path(input_path), Path(output_path)
    watched = watched_directories(input_p, output_p)
    before = _listing(watched)
    argv = resolve_program(argv)
    print(f"$ {shlex.join(argv)}", file=log, flush=True)
    started = time.perf_counter()
    log_start = log.tell()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                          env={**os.environ, **env} if env else None)
    wall_s = time.perf_counter() - started
    # ru_maxrss of the largest waited-for child, in KiB on Linux.
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    failure_tail = stderr_tail(log, log_start) if proc.returncode != 0 else ""  # before stdout joins the log
    log.write(proc.stdout)
    log.flush()
    result = CommandResult(argv, proc.returncode, round(wall_s, 4), round(peak_rss_mb, 1), proc.stdout)
    if proc.returncode != 0:
        raise ConverterExitError(proc.returncode, argv, proc.stdout, failure_tail, converter)
    if not output_p.exists():
        strays = [p for p in new_files(before) if p != output_p.resolve()]
        raise OutputPathError(output_path_message(output_p, strays, converter), strays)
    return result


def convert_or_leave_placeholder(argv: list[str], input_path: str, output_path: str, log, *, chain: str,
                                 directory: bool, env: dict[str, str] | None = None,
                                 converter: str | None = None) -> tuple[CommandResult | None, dict | None]:
    """Run one conversion of the workflow: (result, None) when the converter wrote its output;
    (None, failure) when it could not, with a placeholder left at `output_path`
    (convqa.formats.no_artifact) so the gates judge the failure and the report is still written.

    A placeholder input (an upstream conversion failed) is not handed to the converter: the
    output is a placeholder of kind `upstream` naming the chain that failed. Errors of the job
    itself (a bad command template, a converter program that does not exist) still raise.
    """
    from convqa.formats import no_artifact

    upstream = no_artifact.read(input_path)
    if upstream is not None:
        failed = upstream.get("failed_chain") or upstream.get("chain")
        failure = {"kind": no_artifact.UPSTREAM, "chain": chain, "failed_chain": failed, "converter": converter,
                   "reason": f"input {input_path} is a placeholder: the conversion {failed} failed"}
        print(f"not converted: {failure['reason']}", file=log, flush=True)
    else:
        try:
            return run_converter(argv, input_path, output_path, log, env=env, converter=converter), None
        except ConverterExitError as exc:
            failure = {"kind": no_artifact.CONVERTER_EXIT, "returncode": exc.returncode, "stderr_tail": exc.stderr_tail,
                       "reason": f"converter {converter!r} exited {exc.returncode}: {exc.stderr_tail[-600:]}"}
        except OutputPathError as exc:
            failure = {"kind": no_artifact.OUTPUT_PATH, "reason": str(exc), "stray": [os.fspath(p) for p in exc.strays]}
        failure.update(chain=chain, failed_chain=chain, converter=converter, argv=argv, expected=os.fspath(output_path))
        print(f"conversion failed, placeholder written: {failure['reason']}", file=log, flush=True)
    if os.path.lexists(output_path):  # a converter that wrote part of it and then failed: never trusted
        shutil.rmtree(output_path) if os.path.isdir(output_path) else os.unlink(output_path)
    no_artifact.write(output_path, failure, directory=directory)
    return None, failure


def stderr_tail(log, start: int) -> str:
    """The end of what the command wrote to `log` (its stderr) since offset `start`."""
    with open(log.name, "rb") as fh:
        fh.seek(max(start, fh.seek(0, os.SEEK_END) - STDERR_TAIL_CHARS))
        return fh.read().decode(errors="replace").strip()


def output_path_message(expected: Path, strays: list[Path], converter: str | None = None) -> str:
    who = f"converter {converter!r}" if converter else "converter"
    message = f"{who} exited 0 but did not write the expected output {expected}"
    if not strays:
        return message + "; no new files appeared beside the input, beside the output or in the working directory"
    listed = ", ".join(str(p) for p in strays[:STRAY_LIMIT])
    more = f" (+{len(strays) - STRAY_LIMIT} more)" if len(strays) > STRAY_LIMIT else ""
    return f"{message}; it wrote elsewhere instead: {listed}{more} (left in place for inspection)"


def converter_record(stdout: str) -> dict | None:
    """The converter's own JSON record (`convqa convert --json`), if stdout holds one."""
    try:
        record = json.loads(stdout)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def artifact_sidecar(
    artifact: str | os.PathLike,
    *,
    converter: str,
    fingerprint: str,
    command: CommandResult | None = None,
    record: dict | None = None,
    extra: dict | None = None,
) -> dict:
    path = Path(artifact)
    sidecar = {
        "sidecar_version": SIDECAR_VERSION,
        "artifact": os.fspath(path),
        "sha256": file_sha256(path),
        "size": path_size(path),
        "converter": converter,
        "fingerprint": fingerprint,
        "argv": command.argv if command else None,
        "command": shlex.join(command.argv) if command else None,
        "wall_s": command.wall_s if command else None,
        "peak_rss_mb": command.peak_rss_mb if command else None,
        "tool_versions": tool_versions(CONVERSION_TOOLS),
        "record": record,
    }
    sidecar.update(extra or {})
    return sidecar
