"""`db/` depends on nothing of ours: `worker/` and `jobs/` import `db`, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import db

DB_ROOT = Path(db.__file__).parent
FORBIDDEN = {"worker", "jobs"}


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):  # function bodies too: a deferred import is still a dependency
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_module_of_db_imports_worker_or_jobs() -> None:
    files = sorted(DB_ROOT.rglob("*.py"))
    # The scan must see the modules that used to import worker.settings, and the migrations.
    names = {path.relative_to(DB_ROOT).as_posix() for path in files}
    assert {"session.py", "migrate.py", "models.py", "migrations/env.py"} <= names
    offenders = [
        f"{path.relative_to(DB_ROOT.parent)}:{line} imports {module}"
        for path in files
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)))
        if module.split(".")[0] in FORBIDDEN
    ]
    assert offenders == [], "db/ must not depend on worker/ or jobs/ (pass values in instead)"
