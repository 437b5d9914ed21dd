"""Installs are reproducible: every package the code imports is declared in
requirements.in (runtime) or requirements-dev.in (tests and bench), and the generated
requirements*.txt pin what the inputs pin, every package with hashes (`make lock`)."""

from __future__ import annotations

import ast
import os
import re
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

from tests.worker_process import REPO

# Only tests and the benchmark may use what requirements-dev.in adds.
DEV_ONLY = ("tests", "bench")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+))?")
LOCKED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct(path: Path) -> dict[str, str | None]:
    """The packages an input file names (its `-r`/`-c` lines aside), with their pins."""
    found: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            match = PIN.match(line)
            assert match, f"{path.name}: cannot read {line!r}"
            found[normalize(match[1])] = match[2]
    return found


def locked(path: Path) -> dict[str, str]:
    text = path.read_text()
    pins = {normalize(m[1]): m[2] for m in map(LOCKED.match, text.splitlines()) if m}
    # Each pin is followed by its hashes: pip's --require-hashes insists on it anyway,
    # this says which file is wrong before an install is tried.
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    for block in blocks:
        if LOCKED.match(block):
            assert "--hash=sha256:" in block, f"{path.name}: no hash for {block.split()[0]}"
    return pins


def python_files() -> list[Path]:
    files: list[Path] = []
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "node_modules"
                   and d != "__pycache__"]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


@cache
def module_owners() -> dict[str, str]:
    """Dotted module or package name → the installed distribution whose files hold it
    (by files, not top-level names: `google` and `opentelemetry` are shared namespaces)."""
    owners: dict[str, str] = {}
    for dist in metadata.distributions():
        for file in dist.files or ():
            parts = file.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or ".." in parts:
                continue
            stem = parts[-1].split(".")[0]
            if parts[-1].endswith((".py", ".so", ".pyd")):
                dotted = ".".join([*parts[:-1], stem] if stem != "__init__" else parts[:-1])
                owners.setdefault(dotted, normalize(dist.metadata["Name"]))
    return owners


def owner(module: str) -> str | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        found = module_owners().get(".".join(parts[:end]))
        if found:
            return found
    return None


@pytest.mark.slow
def test_every_imported_package_is_declared() -> None:
    local = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir() if p.is_dir()}
    runtime = set(direct(REPO / "requirements.in"))
    dev = runtime | set(direct(REPO / "requirements-dev.in"))
    missing = []
    for path in python_files():
        relative = path.relative_to(REPO)
        allowed = dev if relative.parts[0] in DEV_ONLY else runtime
        for module in sorted(imports(path)):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in local:
                continue
            package = owner(module)
            if package not in allowed:
                missing.append(f"{relative}: {module} ({package or 'not installed'})")
    assert not missing, "imported but not declared:\n" + "\n".join(missing)


@pytest.mark.parametrize("name", ["requirements", "requirements-dev"])
def test_lock_pins_what_the_inputs_pin(name: str) -> None:
    pins = locked(REPO / f"{name}.txt")
    for package, version in direct(REPO / f"{name}.in").items():
        assert package in pins, f"{package} is in {name}.in but not {name}.txt: make lock"
        if version is not None:
            assert pins[package] == version, f"{package}: {name}.in says {version}, " \
                f"{name}.txt {pins[package]}: make lock"
    if name == "requirements-dev":  # the runtime keeps its versions in the dev lock
        runtime = locked(REPO / "requirements.txt")
        assert {p: v for p, v in pins.items() if p in runtime} == runtime
