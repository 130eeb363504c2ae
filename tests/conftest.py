"""Shared fixtures: real tiny models built once per test session, and the bundled SmolLM2."""

from __future__ import annotations

import os

# torch and llama.cpp share this process: busy-waiting OpenMP threads of one starve the other on
# 2 cores (10x slower forwards). Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
from pathlib import Path

import pytest


# `make test` runs the suite on one pytest-xdist worker per core. Each module is one scheduling
# unit, so that its module-scoped fixtures (a whole workflow run, often) are built on one worker
# only; modules that share an expensive session fixture are one unit together.
SHARED_UNITS = {"test_workflow_run.py": "qwen2_mvp", "test_workflow_infer.py": "qwen2_mvp"}
# Longest units first (measured with --durations: one to six minutes each): a worker that picked one
# of them at the end of the run would leave the other core idle for its length.
LONGEST_FIRST = ("test_detection.py", "test_workflow_run.py", "test_workflow_infer.py", "test_real_checkpoints.py",
                 "test_workflow_converters.py", "test_slurm.py", "test_gemma3.py", "test_workflow_divergence.py")


def scheduling_unit(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return SHARED_UNITS.get(module, module)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module stays


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # xdist's --dist loadgroup cannot do this with pytest 9 (its group suffix is written to a
    # node attribute pytest 9 no longer reads), and loadfile cannot join two modules.
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_unit(nodeid)

    config.option.loadscopereorder = False  # keep the collection order above, not "most tests first"
    return ModuleUnits(config, log)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """Factory: synthetic_dir(preset, dtype="float32") -> HF directory, built once per session."""
    from convqa.sources.synthetic import build_preset

    cache: dict[tuple, Path] = {}

    def make(preset: str, dtype: str = "float32", **overrides) -> Path:
        key = (preset, dtype, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{preset}-{dtype}") / "model"
            cache[key] = build_preset(out, preset, dtype=dtype, **overrides)
        return cache[key]

    return make


def position_encode(model_dir: Path, names: list[str]) -> None:
    """Overwrite tensors with values that encode their position: W[i, j] = 1000 * i + j.

    Non-square and exactly representable in F32, so any transpose, reshape or row shuffle
    leaves a value in the wrong place that a test can point at.
    """
    from safetensors.numpy import load_file, save_file
    from tinymodel import position_values

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    for name in names:
        tensors[name] = position_values(tensors[name].shape).astype(tensors[name].dtype)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def position_model(synthetic_dir, tmp_path_factory):
    """A synthetic qwen2 whose embedding, a k_proj and a gate_proj hold position-encoded values."""
    import shutil

    src = synthetic_dir("qwen2-tiny")
    out = tmp_path_factory.mktemp("position") / "model"
    shutil.copytree(src, out)
    position_encode(out, ["model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.k_proj.weight"])
    return out


@pytest.fixture(scope="session")
def smollm2_gguf():
    from convqa.sources.synthetic import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_st(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M-Instruct imported G->S (dequantized to F32): the real-model ground truth."""
    from convqa.convert.builtin import convert

    out = tmp_path_factory.mktemp("smollm2") / "source"
    convert(smollm2_gguf, out, "safetensors")
    return out


@pytest.fixture(scope="session")
def qwen2_mvp(tmp_path_factory):
    """qwen2-tiny in q8_0 through the mvp tier, run once per session (tests/workflow_runs.py).
    Read it as it is; a test that changes it works on a clone (Workflow.clone)."""
    from workflow_copy import Workflow
    from workflow_runs import run_config

    wf = Workflow.create(tmp_path_factory.mktemp("run"), run_config())
    wf.run("mvp")
    return wf


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
