"""The layout's import rules, checked on the source: a module imports only its own layer
and the layers below it (lazy imports inside functions included), and never a private
name (`_x`) of another package. The layers are the ones the packages' docstrings state."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# High to low. Entry points (and the stand-ins, which have a command line of their own)
# sit on top; the shared contract at the bottom.
LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(names.split()) for names in (
    "worker complete_activity tools standins bench",
    "startup",
    "decisions",
    "activities",
    "workflows",
    "dispatcher taskfiles",
    "temporal_client vault",
    "observability",
    "telemetry",
    "config",
    "models policies exceptions",
    "vocabulary",
))
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}
PROJECT_FILES = sorted(path for path in REPO.rglob("*.py")
                       if path.relative_to(REPO).parts[0] in LAYER_OF
                       or (len(path.relative_to(REPO).parts) == 1 and path.stem in LAYER_OF))


def top_name(path: Path) -> str:
    parts = path.relative_to(REPO).parts
    return parts[0].removesuffix(".py")


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every absolute import in the file, nested ones included."""
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def test_every_top_level_name_has_a_layer() -> None:
    """A new package or root module must be placed in a layer before it can be imported."""
    on_disk = {entry.name.removesuffix(".py") for entry in REPO.iterdir()
               if (entry.suffix == ".py" or (entry / "__init__.py").exists())}
    assert on_disk - {"tests"} - set(LAYER_OF) == set()


def project_imports(path: Path) -> list[tuple[str, str, str, list[str]]]:
    """(where, module, its top-level name, names) of the file's imports of this project."""
    return [(f"{path.relative_to(REPO)}:{line}", module, module.split(".")[0], names)
            for line, module, names in imports_of(path) if module.split(".")[0] in LAYER_OF]


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_down_the_layers_only(path: Path) -> None:
    importer = top_name(path)
    upward = [f"{where} imports {module}" for where, module, top, _ in project_imports(path)
              if LAYER_OF[top] < LAYER_OF[importer]]
    assert upward == []


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_name_crosses_a_package(path: Path) -> None:
    importer = top_name(path)
    private = [f"{where} takes {name} from {module}"
               for where, module, top, names in project_imports(path) if top != importer
               for name in names if name.startswith("_")]
    assert private == []


# What a package's docstring says it may import, where that is narrower than its layer:
# workflow code runs in every replay, so it stays with pure names.
ALLOWED: dict[str, tuple[str, ...]] = {
    "workflows": ("workflows", "vocabulary", "policies", "models", "exceptions",
                  "taskfiles.visible_text"),
}
# Imported only by these (the worker never runs a stand-in).
IMPORTED_ONLY_BY: dict[str, tuple[str, ...]] = {
    "standins": ("standins", "tools", "bench"),
}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_stay_within_what_the_package_allows(path: Path) -> None:
    importer = top_name(path)
    beyond = [f"{where} imports {module}" for where, module, top, _ in project_imports(path)
              if (importer in ALLOWED and not _within(module, ALLOWED[importer]))
              or importer not in IMPORTED_ONLY_BY.get(top, (importer,))]
    assert beyond == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself: a workflows module importing an activity is reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from activities import notify\n")
    assert imports_of(fake) == [(2, "activities", ["notify"])]
    assert LAYER_OF["activities"] < LAYER_OF["workflows"]
