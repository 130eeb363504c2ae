"""Run one engine job in a child Python process, so that what an engine does to its process
becomes a recorded outcome instead of the end of the workflow job.

llama.cpp aborts the whole process on some files (`GGML_ASSERT`, "binary_op: unsupported
types", a GGUF without vocabulary), a native library can segfault, the kernel's OOM killer sends
SIGKILL, and a broken model can hang. None of these raise a Python exception that a `try` could
catch. So the job runs as `python -m convqa.infer.isolated REQUEST`, in its own process group; the
parent waits (with a timeout), and a child that did not exit 0 becomes a `ChildOutcome` that says
how it ended (the signal by name, with what that usually means), with the tail of its stderr.
The caller writes that into its record, and the gates turn it into a `fail` row.

The request names a function (`convqa.infer.run:run_prompts_job`) and its JSON arguments; the
function writes its own outputs (atomically, so a child killed half way leaves nothing that looks done).
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STDERR_TAIL_CHARS = 6000  # faulthandler's stack dump and module list can take a few KB
FAULTHANDLER_HEADER = "Fatal Python error:"
# ggml's abort handler attaches gdb to print a backtrace; under a sandbox or without ptrace rights
# that attach hangs forever (seen here: a BF16-norm GGUF hung for the whole timeout instead of
# dying with SIGABRT), so the child never asks for one.
CHILD_ENV = {"GGML_NO_BACKTRACE": "1"}
# What a signal usually means for an engine process, for the reason a user reads in the report.
SIGNAL_MEANING = {
    signal.SIGABRT: "the engine aborted (a failed assertion or unsupported operation in the native library)",
    signal.SIGSEGV: "segmentation fault in the native library",
    signal.SIGBUS: "bus error (a truncated or unmappable file)",
    signal.SIGFPE: "floating-point exception in the native library",
    signal.SIGILL: "illegal instruction (a build for another CPU)",
    signal.SIGKILL: "killed: out of memory (the kernel's OOM killer) or killed from outside",
    signal.SIGTERM: "terminated from outside",
}


@dataclass
class ChildOutcome:
    """How the child ended. `ok` when it exited 0 within the timeout."""

    returncode: int | None
    signal: str | None
    timed_out: bool
    timeout_s: float
    wall_s: float
    stderr_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """One line: how the child ended (empty when it succeeded)."""
        if self.timed_out:
            return f"did not finish within {self.timeout_s:g} s (hung?) and was killed"
        if self.signal is not None:
            meaning = SIGNAL_MEANING.get(signal.Signals[self.signal], "")
            return f"killed by {self.signal} (signal {-self.returncode})" + (f": {meaning}" if meaning else "")
        if self.returncode:
            return f"exited with status {self.returncode}"
        return ""

    def last_words(self, n: int = 3) -> list[str]:
        """The last lines the engine printed itself (ggml's assertion, a Python exception), before
        faulthandler's dump of the Python stack; that dump's first frame when nothing else is there."""
        lines = [line.strip() for line in self.stderr_tail.splitlines() if line.strip()]
        dump = next((i for i, line in enumerate(lines) if line.startswith(FAULTHANDLER_HEADER)), None)
        if dump is None:
            return lines[-n:]
        before = lines[:dump]
        if before:
            return before[-n:]
        frames = [line for line in lines[dump:] if line.startswith("File ")]
        return [lines[dump]] + frames[:1]

    def as_dict(self) -> dict:
        return asdict(self)


def run_isolated(function: str, kwargs: dict, *, timeout_s: float, stderr_path: str | os.PathLike,
                 args: list | None = None) -> ChildOutcome:
    """Call `function` ("package.module:name") with JSON `args`/`kwargs` in a child process;
    wait at most `timeout_s`. The child's stdout and stderr go to `stderr_path` (kept: it is the
    job's record of what the engine printed)."""
    _check_function_name(function)
    stderr_path = Path(stderr_path)
    stderr_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=".isolated-", dir=stderr_path.parent, delete=False) as fh:
        json.dump({"function": function, "args": list(args or []), "kwargs": kwargs}, fh)
        request = fh.name
    started = time.perf_counter()
    timed_out = False
    try:
        with open(stderr_path, "wb") as err:
            # Own session: a timeout kills the child and anything it started, as one group.
            child = subprocess.Popen([sys.executable, "-m", "convqa.infer.isolated", request], stdin=subprocess.DEVNULL,
                                     stdout=err, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**CHILD_ENV, **os.environ})
            previous = _forward_sigterm(child)
            try:
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(child.pid)
                child.wait()
            finally:
                _kill_group(child.pid)  # leftovers of a child that exited
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
    finally:
        os.unlink(request)
    returncode = child.returncode
    return ChildOutcome(
        returncode=returncode,
        signal=signal.Signals(-returncode).name if returncode is not None and returncode < 0 and not timed_out else None,
        timed_out=timed_out,
        timeout_s=timeout_s,
        wall_s=round(time.perf_counter() - started, 3),
        stderr_tail=_tail(stderr_path),
    )


def _check_function_name(function: str) -> None:
    module, _, name = function.partition(":")
    if not module or not name.isidentifier():
        raise ValueError(f"isolated function must be named 'package.module:function', got {function!r}")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _forward_sigterm(child: subprocess.Popen):
    """Snakemake stops a job with SIGTERM: take the child's group down with it."""
    if threading.current_thread() is not threading.main_thread():
        return None  # handlers can only be set from the main thread
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        _kill_group(child.pid)
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    return previous


def _tail(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, fh.seek(0, os.SEEK_END) - STDERR_TAIL_CHARS))
        return fh.read().decode(errors="replace").strip()


def main(argv: list[str]) -> int:
    # A native crash then leaves the Python stack that led to it in the stderr tail.
    faulthandler.enable()
    with open(argv[0]) as fh:
        request = json.load(fh)
    function = request["function"]
    _check_function_name(function)
    module, _, name = function.partition(":")
    getattr(importlib.import_module(module), name)(*request.get("args", []), **request["kwargs"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
