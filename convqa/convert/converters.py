"""The converter registry: which converter implements which edge, and what identifies its build.

The workflow config names converters under `converters:` (a command template, the edges it
implements, an optional version probe and environment variables) and routes each edge to one or
more of them: `route:` for the whole config, `models.<name>.route:` for one model, and
`converter:` for every edge neither routes. The first converter routed to an edge is the
*primary*: its artifact sits at the chain's default path and feeds the chains built on top of it.
Every further converter on that edge runs side by side on the same input and is qualified
against the primary (F-XCONV-001) and against the input, under its own path.

A converter's fingerprint is what makes a fixed converter rerun exactly its own jobs: for the
built-in `convqa` it is the content hash of the convqa code the edge runs; for an external tool
it is its declared `version` plus the hash of its probe (the output of a command that identifies
the build, and/or the content of the files it runs). The probe runs once per workflow
invocation, when the DAG is built.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from convqa.workflow import plan
from convqa.workflow.fingerprint import FINGERPRINT_CHARS, conversion_fingerprint

BUILTIN_PROGRAM = "convqa"
EDGES = tuple(f"{source}-{target}" for source, target in plan.EDGE_GATE)
SIDE_SEPARATOR = "@"  # `st-gguf@llama-cpp`: the side-by-side artifact of a chain by a converter
PROBE_TIMEOUT_S = 120


class ConverterConfigError(ValueError):
    """The `converters:`/`route:` configuration cannot be run as written."""


def edge_name(chain: str) -> str:
    """`st-gguf-apr` -> `gguf-apr`: the edge the chain's last conversion implements."""
    return "-".join(plan.edge(chain))


def is_builtin(entry: dict) -> bool:
    return shlex.split(entry["command"])[0] == BUILTIN_PROGRAM


def implemented_edges(entry: dict) -> list[str]:
    """The edges a converter declares; all of them when it declares none (a command that takes
    `{format}`, like convqa's)."""
    return list(entry.get("edges") or EDGES)


def routes(config: dict, model: str) -> dict[str, list[str]]:
    """Converters per edge for one model, primary first: model route, else config route, else
    `converter`."""
    model_route = config["models"][model].get("route") or {}
    config_route = config.get("route") or {}
    out = {}
    for edge in EDGES:
        chosen = model_route.get(edge) or config_route.get(edge) or [config["converter"]]
        out[edge] = [chosen] if isinstance(chosen, str) else list(chosen)
    return out


def check_routing(config: dict, edges_used: set[str]) -> None:
    """Every routed converter is defined and declares the edge it is routed to."""
    defined = config["converters"]
    problems = []
    if config["converter"] not in defined:
        problems.append(f"converter {config['converter']!r} is not defined under `converters:`")
    for model in config["models"]:
        for edge, names in routes(config, model).items():
            if len(set(names)) != len(names):
                problems.append(f"model {model}: edge {edge} lists a converter twice: {names}")
            for name in names:
                if name not in defined:
                    problems.append(f"model {model}: edge {edge} is routed to {name!r}, which is not defined under `converters:`")
                elif edge in edges_used and edge not in implemented_edges(defined[name]):
                    problems.append(
                        f"model {model}: edge {edge} is routed to {name!r}, whose `edges:` are "
                        f"{implemented_edges(defined[name]) or 'none'}; route {edge} to another converter "
                        f"(`route: {{{edge}: [...]}}`) or add it to {name}'s edges")
    if problems:
        raise ConverterConfigError("config: " + "; ".join(dict.fromkeys(problems)) +
                                   f" (defined converters: {', '.join(defined) or 'none'})")


def primary_converter(config: dict, model: str, chain: str) -> str:
    return routes(config, model)[edge_name(chain)][0]


def side_converters(config: dict, model: str, chain: str) -> list[str]:
    """Converters that run beside the primary on this chain's edge. Re-runs (`.runN`) belong to
    the idempotency checks of the primary and get none."""
    if "." in chain:
        return []
    return routes(config, model)[edge_name(chain)][1:]


def side_label(chain: str, converter: str) -> str:
    return f"{chain}{SIDE_SEPARATOR}{converter}"


# ---------------------------------------------------------------- fingerprints


def converter_fingerprint(name: str, entry: dict, source_format: str, target_format: str) -> str:
    """`convqa:<code hash>[+version]` for the built-in converter; `<name>:<version>[+<probe
    hash>]` for an external one (`<name>:unversioned` when it declares neither)."""
    if is_builtin(entry):
        code = conversion_fingerprint(source_format, target_format)
        return f"{BUILTIN_PROGRAM}:{code}" + (f"+{entry['version']}" if entry.get("version") else "")
    probe = entry.get("probe") or {}
    parts = [entry.get("version") or ""]
    if probe:
        parts.append(probe_hash(name, json.dumps(probe, sort_keys=True), json.dumps(entry.get("env") or {}, sort_keys=True)))
    return f"{name}:" + ("+".join(p for p in parts if p) or "unversioned")


@functools.lru_cache(maxsize=None)
def probe_hash(name: str, probe_json: str, env_json: str) -> str:
    """sha256 over the probe command's output and the probed files' paths and bytes (cached:
    Snakemake evaluates params once per job, the probe needs to run once per invocation)."""
    record = probe_record(name, json.loads(probe_json), json.loads(env_json))
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:FINGERPRINT_CHARS]


def probe_record(name: str, probe: dict, env: dict) -> dict:
    """What identifies the converter's build: {"command": [argv, output], "files": {path: sha256}}."""
    record: dict = {}
    if probe.get("command"):
        argv = [token.format(python=sys.executable) for token in shlex.split(probe["command"])]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                                  env={**os.environ, **env})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConverterConfigError(f"converter {name!r}: version probe {probe['command']!r} did not run: {exc}") from None
        if proc.returncode != 0:
            raise ConverterConfigError(f"converter {name!r}: version probe {probe['command']!r} exited "
                                       f"{proc.returncode}: {proc.stderr.strip()[-500:]}")
        record["command"] = [probe["command"], proc.stdout.strip()]
    if probe.get("files"):
        record["files"] = probed_files(name, probe["files"])
    return record


def probed_files(name: str, patterns: list[str]) -> dict[str, str]:
    """sha256 of every file the patterns match (`**` recurses). A pattern that matches nothing is
    an error: a typo must not freeze the fingerprint."""
    found: dict[str, str] = {}
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
        if not matches:
            raise ConverterConfigError(f"converter {name!r}: version probe file pattern {pattern!r} matches no file "
                                       f"(relative to {Path.cwd()})")
        for path in matches:
            if "__pycache__" in Path(path).parts:
                continue  # compiled copies change with the interpreter, not with the code
            found[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found
