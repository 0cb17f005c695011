"""The error tree drawn in `worker.errors` lists every exception class of ours, as it is.

Like httpx's test of its exported members: the drawing is what readers trust, so a class added,
moved or re-parented without redrawing it fails here.
"""

from __future__ import annotations

import builtins
import importlib
import pkgutil
import re
from pathlib import Path

import db
import jobs
import worker
from worker import errors
from worker.errors import WorkerError

PACKAGES = (worker, jobs, db)
# Modules that do something on import instead of defining things: the CLI entry point runs the
# CLI, and Alembic's env.py needs a migration context. Neither defines an exception.
NOT_IMPORTED = frozenset({"worker.__main__", "db.migrations.env"})
# A node: an unindented root, or a branch (`├── ` / `└── `) under its parent's column. Wrapped
# descriptions are indented further and carry no branch, so they are not nodes.
NODE = re.compile(
    r"^    (?P<indent>(?:│   |    )*)(?P<branch>[├└]── )?(?P<name>[A-Za-z_]\w*)"
    r"(?:\s+\((?P<module>[a-z_]\w*(?:\.\w+)+)\))?(?:\s|$)"
)

Drawing = dict[str, tuple[str | None, str]]


def import_every_module() -> None:
    for package in PACKAGES:
        # A folder of modules without __init__.py is a namespace package: the walk below skips
        # it, and so does setuptools' find in pyproject.toml (a built wheel would lack it).
        for root in map(Path, package.__path__):
            for folder in {path.parent for path in root.rglob("*.py")}:
                assert (folder / "__init__.py").exists(), f"{folder} has no __init__.py"
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if module.name not in NOT_IMPORTED:
                importlib.import_module(module.name)


def our_exception_classes() -> list[type[BaseException]]:
    """Every exception class defined in `worker`, `jobs` or `db` (tests define their own)."""
    found: list[type[BaseException]] = []
    pending: list[type[BaseException]] = [BaseException]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] in {p.__name__ for p in PACKAGES}:
            found.append(cls)
    return found


def parse_drawing(docstring: str) -> Drawing:
    """Class name -> (drawn parent, module) for every node; roots have no parent.

    A class drawn without a module lives in `worker.errors`.
    """
    drawn: Drawing = {}
    path: list[str] = []  # the names from the current root down to the last node
    for line in docstring.splitlines():
        match = NODE.match(line)
        if not line.startswith("    "):
            path = []  # prose between drawings
            continue
        if match is None or (match["indent"] and not match["branch"]):
            continue  # a wrapped description
        depth = len(match["indent"]) // 4 + (1 if match["branch"] else 0)
        assert depth <= len(path), f"a branch with no parent above it: {line!r}"
        name = match["name"]
        assert name not in drawn, f"{name} is drawn twice"
        drawn[name] = (path[depth - 1] if depth else None, match["module"] or errors.__name__)
        path[depth:] = [name]
    return drawn


def test_the_drawing_lists_every_exception_class_with_its_parent_and_module() -> None:
    import_every_module()
    actual: Drawing = {}
    for cls in our_exception_classes():
        [base] = cls.__bases__  # one parent each, so a tree can draw it
        # WorkerError is the tree's root: its parent (Exception) is the drawing's premise.
        parent = None if cls is WorkerError else base.__name__
        actual[cls.__name__] = (parent, cls.__module__)
    assert errors.__doc__ is not None
    drawn = parse_drawing(errors.__doc__)
    # Roots above our classes (ValueError, Exception) are builtins, not ours: not in `actual`.
    roots = {name for name, (parent, _) in drawn.items() if parent is None}
    for name in roots - {WorkerError.__name__}:
        assert isinstance(getattr(builtins, name, None), type), f"{name} is not a builtin"
        del drawn[name]
    assert drawn == actual


def test_the_parser_reads_wrapped_lines_and_modules() -> None:
    """The reader of the drawing, on a small one: so a test above that passes means something."""
    drawing = """Prose.

    WorkerError                    text
    ├── TransientError             wrapped
    │   │                          Capitalised continuation
    │   └── Busy                   (jobs.x) text
    └── PermanentError
                                   Wrapped under a last child

    ValueError
    └── Refused                    (worker.y) text
"""
    assert parse_drawing(drawing) == {
        "WorkerError": (None, "worker.errors"),
        "TransientError": ("WorkerError", "worker.errors"),
        "Busy": ("TransientError", "jobs.x"),
        "PermanentError": ("WorkerError", "worker.errors"),
        "ValueError": (None, "worker.errors"),
        "Refused": ("ValueError", "worker.y"),
    }
