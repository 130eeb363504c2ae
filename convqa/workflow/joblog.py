"""The one way a workflow script writes its job log."""

from __future__ import annotations

import contextlib
import traceback


@contextlib.contextmanager
def job_log(path):
    """`snakemake.log[...]` open for writing; an exception leaving the block is written to the
    log (its traceback) and re-raised, so the job fails with the reason in its log."""
    with open(path, "w") as log:
        try:
            yield log
        except Exception:
            traceback.print_exc(file=log)
            raise
