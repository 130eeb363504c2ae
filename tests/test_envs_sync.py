"""envs/*.yaml (the conda environments of `--sdm conda` runs) pin the same versions as the
project's venv: requirements.txt (and the Makefile's extra pip installs), and satisfy
pyproject.toml's dependency specifiers."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
PIN = re.compile(r"^([A-Za-z0-9._-]+)(\[[^\]]*\])?==([^\s;#]+)")


def pins_in(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        m = PIN.match(line.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(3)
    return pins


def project_pins() -> dict[str, str]:
    pins = pins_in((REPO / "requirements.txt").read_text().splitlines())
    # `pip install ... name==version` lines in the Makefile (the bundled model package).
    for line in (REPO / "Makefile").read_text().splitlines():
        if "pip install" in line:
            pins.update(pins_in(tok for tok in line.split() if "==" in tok))
    return pins


def env_pip_lines(env: dict) -> list[str]:
    for dep in env["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            return [str(x) for x in dep["pip"]]
    return []


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_there_are_env_files():
    assert {p.stem for p in ENV_FILES} >= {"convert", "sources", "report"}


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_match_the_project_pins(env_file):
    env = yaml.safe_load(env_file.read_text())
    known = project_pins()
    pins = pins_in(env_pip_lines(env))
    assert pins, f"{env_file.name} pins nothing"
    for name, version in pins.items():
        assert name in known, f"{env_file.name}: {name}=={version} is not pinned in requirements.txt (or the Makefile)"
        assert version == known[name], f"{env_file.name}: {name}=={version}, requirements.txt has {known[name]}"
    unpinned = [line for line in env_pip_lines(env) if not line.startswith("-") and "==" not in line]
    assert not unpinned, f"{env_file.name}: unpinned packages {unpinned}"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_installs_convqa_with_its_dependencies_pinned(env_file):
    env = yaml.safe_load(env_file.read_text())
    lines = env_pip_lines(env)
    assert "-e .." in lines, f"{env_file.name} does not install the convqa package"
    pins = pins_in(lines)
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{env_file.name}: convqa dependency {req.name} is not pinned"
        assert Version(pins[name]) in req.specifier, f"{env_file.name}: {name}=={pins[name]} violates pyproject's {dep}"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_python_satisfies_requires_python(env_file):
    env = yaml.safe_load(env_file.read_text())
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and re.match(r"^python[=<>]", d)]
    assert len(pythons) == 1, f"{env_file.name} must pin python once"
    version = pythons[0].split("=")[-1]
    requires = pyproject()["project"]["requires-python"]
    assert Version(version) in Requirement(f"python{requires}").specifier


def test_requirements_satisfy_pyproject():
    known = project_pins()
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in known, f"{req.name} (pyproject) is not pinned in requirements.txt"
        assert Version(known[name]) in req.specifier, f"requirements.txt {name}=={known[name]} violates pyproject's {dep}"
