"""Refuses non-deterministic code in workflow modules, read as source (run by `make lint`).

worker.py runs workflows outside the SDK's sandbox (docs/development.md says why), so
nothing at run time stops workflow code from reading the clock, drawing a random number,
doing I/O or iterating a set in hash order: each replays differently on another worker
and fails a pipeline with a non-determinism error days later. This check reads every
module under workflows/ (or the files and folders named) and names each such use:

    python -m tools.check_workflows [PATH ...]

Exit codes: 0 nothing found · 1 findings (one `path:line:col: ...` line each on stdout)
· 2 a file could not be read or parsed."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.common import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = REPO / "workflows"

# Calls (or references) that differ between a run and its replay -> what to use instead.
FORBIDDEN_NAMES = {
    "datetime.datetime.now": "workflow.now()",
    "datetime.datetime.utcnow": "workflow.now()",
    "datetime.datetime.today": "workflow.now()",
    "datetime.date.today": "workflow.now().date()",
    "uuid.uuid1": "workflow.uuid4()",
    "uuid.uuid4": "workflow.uuid4()",
    "asyncio.sleep": "workflow.sleep()",
    "builtins.open": "an activity",
    "builtins.input": "an activity",
    "builtins.hash": "a stable digest (hashlib); str hashes differ per process",
}
# Modules workflow code must not import at all -> what to use instead.
FORBIDDEN_MODULES = {
    "time": "workflow.now() or workflow.sleep()",
    "random": "workflow.random()",
    "secrets": "workflow.random(), or an activity",
    "os": "an activity",
    "pathlib": "an activity",
    "shutil": "an activity",
    "tempfile": "an activity",
    "glob": "an activity",
    "sqlite3": "an activity",
    "socket": "an activity",
    "ssl": "an activity",
    "select": "an activity",
    "selectors": "an activity",
    "subprocess": "an activity",
    "signal": "an activity",
    "threading": "the workflow's own event loop",
    "multiprocessing": "an activity",
    "concurrent": "the workflow's own event loop",
    "urllib": "an activity",
    "http": "an activity",
    "httpx": "an activity",
    "requests": "an activity",
    # This project's I/O: the task-file layer's file access and the services' clients.
    "taskfiles.safe_io": "an activity",
    "taskfiles.lookup": "an activity",
    "taskfiles.documents": "an activity",
    "taskfiles.io_pool": "an activity",
    "taskfiles.bounded_yaml": "an activity",
    "observability": "workflow.logger, or an activity",
    "telemetry": "an activity (the SDK's tracing interceptor traces workflows)",
    "dispatcher": "an activity",
    "temporal_client": "an activity",
    "vault": "an activity",
    "config": "the input, or an activity that reads the setting",
}
SET_TYPES = frozenset({"set", "frozenset", "Set", "AbstractSet", "MutableSet"})
# Builtins that walk their argument in its iteration order.
ORDER_TAKING_CALLS = frozenset({"list", "tuple", "enumerate", "iter", "next", "zip",
                                "reversed", "join"})
BUILTINS = frozenset(name.rpartition(".")[2] for name in FORBIDDEN_NAMES
                     if name.startswith("builtins."))


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col + 1}: {self.message}"


def _module_of(name: str) -> str | None:
    """The forbidden module `name` is, or lies in."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in FORBIDDEN_MODULES:
            return ".".join(parts[:end])
    return None


class _Checker(ast.NodeVisitor):
    def __init__(self, path: Path, tree: ast.Module) -> None:
        self.path = path
        self.findings: list[Finding] = []
        self.imported: dict[str, str] = {}  # local name -> what it was imported as
        self.set_names = _set_valued_names(tree)
        # A builtin's name the module binds itself (a field or argument `input`) is not
        # the builtin; scopes are not told apart.
        self.bound = _bound_names(tree)

    def report(self, node: ast.expr | ast.stmt, message: str) -> None:
        self.findings.append(Finding(self.path, node.lineno, node.col_offset, message))

    # ---- imports: a forbidden module is reported where it comes in ------------------

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imported[alias.asname or alias.name.partition(".")[0]] = (
                alias.name if alias.asname else alias.name.partition(".")[0])
            self._refuse_module(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or node.module is None:
            return
        for alias in node.names:
            self.imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            self._refuse_module(node, f"{node.module}.{alias.name}")

    def _refuse_module(self, node: ast.stmt, name: str) -> None:
        module = _module_of(name)
        if module is not None:
            self.report(node, f"imports {module}: not deterministic in workflow code "
                              f"(use {FORBIDDEN_MODULES[module]})")

    # ---- names: a forbidden call or reference is reported where it is used ----------

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if not self._refuse_name(node):
            self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self._refuse_name(node)

    def _refuse_name(self, node: ast.Attribute | ast.Name) -> bool:
        name = self._qualified(node)
        if name is None:
            return False
        for candidate, instead in FORBIDDEN_NAMES.items():
            if name == candidate or name.startswith(candidate + "."):
                shown = candidate.removeprefix("builtins.")
                self.report(node, f"{shown}: not deterministic in workflow code (use {instead})")
                return True
        return False

    def _qualified(self, node: ast.expr) -> str | None:
        """`node`'s dotted name with its first part resolved through the imports."""
        if isinstance(node, ast.Attribute):
            base = self._qualified(node.value)
            return f"{base}.{node.attr}" if base is not None else None
        if isinstance(node, ast.Name):
            if node.id in self.imported:
                return self.imported[node.id]
            if node.id in BUILTINS and node.id not in self.bound:
                return f"builtins.{node.id}"
        return None

    # ---- iteration over a set: hash order, which differs per process ------------------

    def visit_For(self, node: ast.For) -> None:
        self._refuse_set_order(node.iter)
        self.generic_visit(node)

    def visit_AsyncFor(self, node: ast.AsyncFor) -> None:
        self._refuse_set_order(node.iter)
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self._refuse_set_order(node.iter)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called in ORDER_TAKING_CALLS:
            for arg in node.args:
                self._refuse_set_order(arg)
        self.generic_visit(node)

    def _refuse_set_order(self, node: ast.expr) -> None:
        if _is_set_valued(node, self.set_names):
            self.report(node, "iterates a set: its order differs per process (use sorted())")


def _bound_names(tree: ast.Module) -> frozenset[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return frozenset(names)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def _is_set_valued(node: ast.expr, set_names: frozenset[str]) -> bool:
    if isinstance(node, ast.Set | ast.SetComp):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id in ("set", "frozenset")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr | ast.BitAnd
                                                  | ast.Sub | ast.BitXor):
        return _is_set_valued(node.left, set_names) or _is_set_valued(node.right, set_names)
    return _dotted(node) in set_names


def _annotation_is_set(annotation: ast.expr | None) -> bool:
    if annotation is None:
        return False
    if isinstance(annotation, ast.Subscript):
        annotation = annotation.value
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return annotation.value.partition("[")[0].rpartition(".")[2] in SET_TYPES
    name = _dotted(annotation)
    return name is not None and name.rpartition(".")[2] in SET_TYPES


def _set_valued_names(tree: ast.Module) -> frozenset[str]:
    """Names (and `self.x` attributes) the module annotates as, or assigns, a set.
    Scopes are not told apart: a name that is a set anywhere in the module counts."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and _annotation_is_set(node.annotation):
            names.add(_dotted(node.target) or "")
        elif isinstance(node, ast.arg) and _annotation_is_set(node.annotation):
            names.add(node.arg)
        elif isinstance(node, ast.Assign) and _is_set_valued(node.value, frozenset()):
            names.update(_dotted(target) or "" for target in node.targets)
    names.discard("")
    return frozenset(names)


def check_source(source: str, path: Path) -> list[Finding]:
    """The findings in one module's source (SyntaxError if it does not parse)."""
    tree = ast.parse(source, filename=str(path))
    checker = _Checker(path, tree)
    checker.visit(tree)
    return sorted(checker.findings, key=lambda found: (found.line, found.col))


def modules(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg.startswith("-") for arg in args):
        print("usage: python -m tools.check_workflows [PATH ...]", file=sys.stderr)
        return EXIT_USAGE
    findings: list[Finding] = []
    for path in modules([Path(arg) for arg in args] or [WORKFLOW_DIR]):
        try:
            findings += check_source(path.read_text(encoding="utf-8"), path)
        except (OSError, UnicodeDecodeError, SyntaxError) as err:
            print(f"check_workflows: cannot check {path}: {err}", file=sys.stderr)
            return EXIT_USAGE
    for finding in findings:
        print(finding)
    if findings:
        print(f"check_workflows: {len(findings)} non-deterministic use(s) in workflow code",
              file=sys.stderr)
        return EXIT_ATTENTION
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
