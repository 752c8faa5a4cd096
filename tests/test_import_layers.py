"""The stairs run one way at run time too: each process loads only the layers it needs.

`make lint` checks the import contracts statically (import-linter, see
pyproject.toml); these tests import the real entry points in a fresh
interpreter and look at what ended up in `sys.modules`.
"""

from __future__ import annotations

import json
import subprocess
import sys

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
    entry = ("import app.engine_process, sbora_core.engine, sbora_core.models, sbora_core.tokenization")
    assert not loaded_after(entry) & (WEB | {"sqlalchemy", "celery", "alembic"})


def test_the_method_library_stands_alone():
    entry = ("import pkgutil, importlib, sbora_core\n"
             "for m in pkgutil.iter_modules(sbora_core.__path__): importlib.import_module(f'sbora_core.{m.name}')")
    assert not loaded_after(entry) & (WEB | {"sqlalchemy", "celery", "pydantic_settings", "app", "worker"})


def test_the_services_need_no_web_framework():
    entry = ("import pkgutil, importlib, app.services\n"
             "for m in pkgutil.iter_modules(app.services.__path__): importlib.import_module(f'app.services.{m.name}')")
    assert not loaded_after(entry) & WEB
