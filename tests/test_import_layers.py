"""The stairs run one way at run time too: each process loads only the layers it needs.

`make lint` checks the import contracts statically (import-linter, see
pyproject.toml); these tests import the real entry points in a fresh
interpreter and look at what ended up in `sys.modules`. The import graph has
no circles, and no code here imports through the library's kept flat paths.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import grimp
import pytest


def loaded_after(statement: str) -> set[str]:
    """Top-level packages in sys.modules after running `statement` in a fresh interpreter."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


WEB = {"fastapi", "starlette", "uvicorn"}


@pytest.mark.parametrize("entry", [
    # What the Celery worker process imports, and what a job then runs.
    "import worker.tasks, worker.runner",
])
def test_workers_never_load_the_web_framework(entry):
    assert not loaded_after(entry) & WEB


def test_the_engine_process_loads_neither_the_api_nor_the_database():
    # What the spawned child imports to run `serve`, plus what serving a request imports.
    entry = ("import app.engine_process, sbora_core.serving.engine, sbora_core.method.models, sbora_core.training.tokenization")
    assert not loaded_after(entry) & (WEB | {"sqlalchemy", "celery", "alembic"})


def test_the_method_library_stands_alone():
    entry = ("import pkgutil, importlib, sbora_core\n"
             "for m in pkgutil.walk_packages(sbora_core.__path__, 'sbora_core.'): importlib.import_module(m.name)")
    assert not loaded_after(entry) & (WEB | {"sqlalchemy", "celery", "pydantic_settings", "app", "worker"})


def test_the_services_need_no_web_framework():
    entry = ("import pkgutil, importlib, app.services\n"
             "for m in pkgutil.iter_modules(app.services.__path__): importlib.import_module(f'app.services.{m.name}')")
    assert not loaded_after(entry) & WEB


def import_cycle(graph, modules: set[str]) -> list[str] | None:
    """One circle of imports among `modules` (each module listed once, then the first again), or None."""
    state: dict[str, int] = {}  # 1 while on the current path, 2 once every import below it is done
    for root in sorted(modules):
        if root in state:
            continue
        state[root] = 1
        path, todo = [root], [iter(sorted(graph.find_modules_directly_imported_by(root) & modules))]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(sorted(graph.find_modules_directly_imported_by(nxt) & modules)))
    return None


def test_no_module_imports_itself_round_a_circle():
    # Imports inside functions and under TYPE_CHECKING count: a circle is a design fault wherever it hides.
    graph = grimp.build_graph("sbora_core", "sbora_cli", "app", "worker", cache_dir=None)
    cycle = import_cycle(graph, set(graph.modules))
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_circle():
    graph = grimp.ImportGraph()
    for importer, imported in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.a", "p.d")]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycle(graph, set(graph.modules)) == ["p.a", "p.b", "p.c", "p.a"]
    graph.remove_import(importer="p.c", imported="p.a")
    assert import_cycle(graph, set(graph.modules)) is None


FLAT_PATHS = {"sbora_core.models", "sbora_core.config", "sbora_core.inject", "sbora_core.adapter_io",
              "sbora_core.merge"}  # kept for users of the library; code here imports from sbora_core.method


def test_no_code_here_imports_through_the_flat_paths():
    root = Path(__file__).resolve().parent.parent
    found = []
    for package in ("sbora_core", "app", "worker", "sbora_cli", "bench", "tests"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name == "test_public_api.py" or path.relative_to(root).as_posix() in \
                    {f"{m.replace('.', '/')}.py" for m in FLAT_PATHS}:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                else:
                    continue
                found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in sorted(names & FLAT_PATHS)]
    assert not found, "import from sbora_core.method instead:\n" + "\n".join(found)
