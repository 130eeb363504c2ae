"""convqa.workflow.scheduler_timers on real Snakemake runs: without it the pinned Snakemake's
scheduler starts a wake-up timer on every pass and every timer's pass starts another, so the
timer threads pile up with the jobs run; with it (as the Snakefile installs it from `onstart`)
one at most is pending."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from convqa.workflow import scheduler_timers

REPO = Path(__file__).resolve().parents[1]
JOBS = 40
# Short jobs on 2 cores with more ready than can run: the scheduler passes that pile up timers.
SNAKEFILE = textwrap.dedent(f"""
    import os
    from convqa.workflow import scheduler_timers

    onstart:
        if os.environ.get("COALESCE") == "1":
            assert scheduler_timers.install(workflow)

    rule all:
        input: expand("out/{{i}}", i=range({JOBS}))

    rule one:
        output: "out/{{i}}"
        shell: "sleep 0.2; touch {{output}}"
""")


def most_threads(tmp_path: Path, coalesce: bool) -> int:
    """The most threads the Snakemake process had at once during the run (sampled every 50 ms)."""
    work = tmp_path / ("coalesced" if coalesce else "stock")
    work.mkdir()
    (work / "Snakefile").write_text(SNAKEFILE)
    env = {**os.environ, "COALESCE": "1" if coalesce else "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    snakemake = Path(sys.executable).with_name("snakemake")
    proc = subprocess.Popen([str(snakemake), "--cores", "2", "--quiet", "all"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    most = 0
    try:
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            most = max(most, int(status.split("Threads:")[1].split()[0]))
            time.sleep(0.05)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert len(list((work / "out").iterdir())) == JOBS  # every job ran, with the workaround too
    return most


def test_the_workaround_keeps_the_scheduler_threads_few(tmp_path):
    stock, coalesced = most_threads(tmp_path, coalesce=False), most_threads(tmp_path, coalesce=True)
    # If the first fails, Snakemake fixed its scheduler and convqa.workflow.scheduler_timers can go.
    assert stock >= JOBS // 2, (stock, coalesced)
    assert coalesced <= 10, (stock, coalesced)


def test_a_scheduler_without_the_private_method_is_left_alone():
    class Other:
        pass

    assert scheduler_timers.coalesce_reevaluation_timers(Other()) is False


def test_the_replacement_starts_a_timer_only_when_none_is_pending():
    class Scheduler:
        def __init__(self):
            self._open_jobs = threading.Semaphore(0)

        def _schedule_reevalutation(self, delay):
            raise AssertionError("replaced")

    scheduler = Scheduler()
    assert scheduler_timers.coalesce_reevaluation_timers(scheduler)
    before = {t for t in threading.enumerate() if isinstance(t, threading.Timer)}
    for _ in range(50):
        scheduler._schedule_reevalutation(0.2)
    started = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t not in before]
    assert len(started) == 1 and started[0].daemon
    assert scheduler._open_jobs.acquire(timeout=5)  # it fires, once
    assert not scheduler._open_jobs.acquire(timeout=0.5)
    scheduler._schedule_reevalutation(0.05)  # and a new one can start after it
    assert scheduler._open_jobs.acquire(timeout=5)


def test_the_pinned_snakemake_has_what_the_workaround_replaces():
    from snakemake.scheduling.job_scheduler import JobScheduler

    assert callable(getattr(JobScheduler, "_schedule_reevalutation"))
