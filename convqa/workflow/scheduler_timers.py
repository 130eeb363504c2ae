"""One pending re-evaluation timer in Snakemake's job scheduler, not one per scheduler pass.

Snakemake 9.27's job-rate limiter (on by default: `--max-jobs-per-timespan 100/1s`) ends every
pass of the scheduler loop by starting a `threading.Timer` that wakes the loop again after the
timespan (`JobScheduler._schedule_reevalutation`). The pass that timer causes starts another
timer, and so does every pass caused by a job finishing. So the timers never die out: after N
job events there are N chains of them, and the scheduler makes N passes a second doing nothing.
Measured on `make run` (386 jobs, 2 cores): the Snakemake process itself used 6 min 42 s of CPU
in 12 min 31 s, more than half a core, most of it starting timer threads, and it grew toward
the end of the run. The timers are also not daemon threads, so Snakemake cannot exit before the
last one fires.

The rate limiter needs one wake-up per timespan at most (to notice that the window moved), so
this keeps its semantics and drops the duplicates: a new timer starts only when none is pending.
Installed from the Snakefile's `onstart` handler, which Snakemake calls after it creates the
scheduler and before the first pass. If a Snakemake version no longer has the private method
this replaces, nothing is changed.
"""

from __future__ import annotations

import threading


def coalesce_reevaluation_timers(scheduler) -> bool:
    """Replace the scheduler's timer-per-pass with at most one pending timer; True if installed."""
    wake = getattr(scheduler, "_open_jobs", None)
    if wake is None or not hasattr(scheduler, "_schedule_reevalutation"):
        return False
    lock = threading.Lock()
    pending: list[threading.Timer] = []

    def schedule_reevaluation(delay: float) -> None:
        with lock:
            if pending and pending[0].is_alive():
                return
            timer = threading.Timer(delay, wake.release)
            timer.daemon = True  # a wake-up for a loop that has ended must not hold the exit
            pending[:] = [timer]
            timer.start()

    scheduler._schedule_reevalutation = schedule_reevaluation
    return True


def install(workflow) -> bool:
    """The Snakefile's onstart hook: coalesce the timers of this run's scheduler."""
    scheduler = getattr(workflow, "scheduler", None)
    return scheduler is not None and coalesce_reevaluation_timers(scheduler)
