"""Whether the workflow starts the gpu backend's jobs at all (config `gpu_jobs`).

Each gpu job (the ground truth, a reference-quantized model or an artifact on `gpu`) asks its
own machine for a CUDA device and, without one, records `skipped: no CUDA device`. On a machine
without a GPU that is a process per cell started only to say so (~40 of `make run`'s jobs). So
the planner decides first:

- `auto` (the default): start them where the machine that plans the workflow has a CUDA device,
  or where the run names GPU nodes for them (CONVQA_SLURM_GPU_PARTITION, which profiles/slurm
  sends the gpu jobs to: a SLURM login node usually has no GPU while those nodes do); otherwise
  no gpu job is planned and the inference gates record each gpu cell as `skipped` with the
  reason below. The probe is cheap and imports nothing (`/dev/nvidia<N>`, as the NVIDIA driver
  creates one per device; `CUDA_VISIBLE_DEVICES` set empty or to -1 hides them, as CUDA does).
- `run`: always start them and let each job find out on its node (another executor whose nodes
  have GPUs the planning machine lacks).
- `skip`: never start them.
"""

from __future__ import annotations

import glob
import os
import re

AUTO, RUN, SKIP = "auto", "run", "skip"
NO_DEVICE = "no CUDA device"
GPU_PARTITION_VARIABLE = "CONVQA_SLURM_GPU_PARTITION"  # profiles/slurm: where the gpu jobs go


def cuda_device_visible(environ=os.environ, devices: str = "/dev/nvidia*") -> bool:
    """A CUDA device this process could use: a /dev/nvidia<N> node, not hidden by CUDA_VISIBLE_DEVICES."""
    hidden = environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    return any(re.fullmatch(r"nvidia\d+", os.path.basename(p)) for p in glob.glob(devices))


def skip_reason(setting: str, device_visible=cuda_device_visible, environ=os.environ) -> str | None:
    """None when the gpu jobs are started; else the reason every gpu cell's rows give."""
    if setting == RUN:
        return None
    if setting == SKIP:
        return "gpu backend not run: gpu_jobs is skip, so no gpu job was started"
    if environ.get(GPU_PARTITION_VARIABLE) or device_visible():
        return None
    return (f"{NO_DEVICE} (none on the machine that planned the workflow, so no gpu job was started; "
            f"gpu_jobs: run starts them where the jobs run elsewhere, e.g. on a cluster's GPU nodes)")
