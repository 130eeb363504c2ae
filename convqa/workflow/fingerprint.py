"""Content fingerprints of the convqa code that a workflow job runs.

Snakemake sees a `script:` file's mtime but not the modules the script imports, so a fix in a
converter would rerun nothing and a `git checkout` of unchanged code would rerun everything.
Each rule that runs convqa code therefore carries, in `params:`, a hash of the *content* of
exactly the modules its job can execute: a change there reruns the job and its downstream, a
touch changes nothing.

Which modules a job can execute is read from the import statements (module level and inside
functions) of its rule's `script:` file (`script_fingerprint`; no hand-kept list of roots),
followed transitively within the convqa package.
The format modules are the exception: `convqa.formats` dispatches to all of them lazily, but a
job only ever runs the reader of each format it reads and the writer of each format it writes,
so every other format module is cut out of the closure. A job names what it touches as format
names (read) and `writes(fmt)` (`fmt:write`). An edit to the GGUF writer therefore reruns the
jobs that write GGUF (Snakemake then reruns what reads their output), not SafeTensors -> APR and
not a GGUF source imported G->S, which only reads GGUF.

Code is hashed by its syntax tree with docstrings dropped (`ast.dump`, which carries no line
numbers; comments are not in the tree): a comment, a docstring or a reformatting reruns nothing.

The package is located from the imported `convqa` itself, so the hash describes the code the
job's Python will import (an installed copy, a checkout, or a `PYTHONPATH` override in tests).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

import convqa

PACKAGE = "convqa"
READ, WRITE = "read", "write"
# The module each format's reader and writer live in (one module may hold both).
FORMAT_MODULES = {
    "safetensors": {READ: "convqa.formats.safetensors", WRITE: "convqa.formats.safetensors"},
    "gguf": {READ: "convqa.formats.gguf", WRITE: "convqa.formats.gguf_writer"},
    "apr": {READ: "convqa.formats.apr", WRITE: "convqa.formats.apr"},
}
FINGERPRINT_CHARS = 16  # 64 bits of sha256: enough to tell code versions apart, short in logs


def writes(fmt: str) -> str:
    """The `formats` entry of a job that writes `fmt` (a plain format name means it reads it)."""
    return f"{fmt}:{WRITE}"


def package_dir() -> Path:
    return Path(convqa.__file__).resolve().parent


def module_file(module: str) -> Path | None:
    """The source file of a convqa module, or None if `module` is not one (a plain name)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir().joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _parent_packages(module: str) -> list[str]:
    # Importing convqa.formats.gguf executes convqa/__init__.py and convqa/formats/__init__.py.
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _file_version(path: Path) -> tuple:
    """What tells two versions of a file apart within one process, for the parse caches below:
    Snakemake asks for the fingerprints of hundreds of jobs, and each reaches the same modules
    (parsing them again for every job was 14 of the 22 s a dry run of the default config took)."""
    st = path.stat()
    return (str(path), st.st_ino, st.st_mtime_ns, st.st_size)


def imported_modules(module: str) -> set[str]:
    """convqa modules named by the import statements of `module` (anywhere in the file)."""
    path = module_file(module)
    if path is None:
        return set()
    return set(_imported_modules(module, _file_version(path)))


@functools.lru_cache(maxsize=None)
def _imported_modules(module: str, version: tuple) -> frozenset[str]:
    path = Path(version[0])
    tree = ast.parse(path.read_bytes(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, is_package)
            if base is None:
                continue
            found.add(base)
            # `from convqa import arch` imports the submodule convqa.arch.
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    return frozenset(m for m in found if module_file(m) is not None)


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def module_closure(roots: list[str], exclude: set[str] = frozenset()) -> list[str]:
    """`roots` and every convqa module they import, transitively, minus `exclude`."""
    seen: set[str] = set()
    pending = [m for root in roots for m in (*_parent_packages(root), root)]
    while pending:
        module = pending.pop()
        if module in seen or module in exclude or module_file(module) is None:
            continue
        seen.add(module)
        pending.extend(imported_modules(module))
        pending.extend(_parent_packages(module))
    return sorted(seen)


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def code_text(path: Path) -> str:
    """What of a module's source decides its behaviour: its syntax tree without docstrings and
    positions. Comments, docstrings, blank lines and line breaks change nothing here."""
    return _code_text(_file_version(Path(path)))


@functools.lru_cache(maxsize=None)
def _code_text(version: tuple) -> str:
    path = Path(version[0])
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def code_fingerprint(modules: list[str]) -> str:
    """sha256 over the modules' package-relative paths and code (`code_text`), in sorted order."""
    root = package_dir()
    h = hashlib.sha256()
    for path in sorted(module_file(m) for m in modules):
        h.update(path.relative_to(root).as_posix().encode() + b"\x00")
        h.update(code_text(path).encode())
        h.update(b"\x00")
    return h.hexdigest()[:FINGERPRINT_CHARS]


def _format_roots(roots: tuple[str, ...], formats: tuple[str, ...]) -> tuple[list[str], set[str]]:
    """(roots plus the reader/writer modules `formats` names, every other format module)."""
    used = []
    for entry in formats:
        fmt, _, side = entry.partition(":")
        side = side or READ
        if fmt not in FORMAT_MODULES or side not in (READ, WRITE):
            raise ValueError(f"unknown format {entry!r}; expected one of {', '.join(FORMAT_MODULES)}, optionally :{WRITE}")
        used.append(FORMAT_MODULES[fmt][side])
    every = {m for sides in FORMAT_MODULES.values() for m in sides.values()}
    return [*roots, *used], every - set(used)


@functools.lru_cache(maxsize=None)
def fingerprint(
    roots: tuple[str, ...],
    formats: tuple[str, ...],
    *,
    leaves: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> str:
    """Fingerprint of the code reachable from `roots` that reads or writes only `formats`
    (format names: read; `writes(fmt)`: written).

    `leaves` are hashed without following their imports (an entry point whose other commands
    the job never runs); `exclude` names modules the job cannot reach although an import names
    them (a branch for another kind of input).
    """
    modules, other_formats = _format_roots(roots, tuple(sorted(set(formats))))
    closure = module_closure(modules, other_formats | set(exclude))
    return code_fingerprint(sorted(set(closure) | {m for m in leaves if module_file(m)}))


def conversion_fingerprint(source_format: str, target_format: str) -> str:
    """What `convqa convert` runs for one edge: the converter, the source format's reader and
    the target format's writer.

    cli.py is hashed as the entry point, but its imports for the other subcommands (engines,
    server) are not followed: they never run during a conversion.
    """
    return fingerprint(("convqa.convert.builtin",), (source_format, writes(target_format)), leaves=("convqa.cli",))


def script_imports(script: str | Path) -> tuple[str, ...]:
    """convqa modules named by the import statements of a workflow script (a file outside the
    package, as a rule's `script:` names it), anywhere in the file, sorted."""
    path = Path(script)
    tree = ast.parse(path.read_bytes(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return tuple(sorted(m for m in found if module_file(m) is not None))


@functools.lru_cache(maxsize=None)
def script_fingerprint(script: str, formats: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> str:
    """Fingerprint of the code a rule's `script:` runs: the convqa modules the script imports and
    their closure, with the format modules cut to `formats` (those the job reads, and writes as
    `writes(fmt)`) and
    minus `exclude` (see `fingerprint`)."""
    return fingerprint(script_imports(script), tuple(formats), exclude=tuple(exclude))
