"""The benchmarks are scripts, not a package: load one by path as a module, or run its --smoke mode."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="session")
def load_bench():
    def load(name: str) -> ModuleType:
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def smoke_report(tmp_path):
    """Run bench/NAME.py --smoke (tiny shapes on the CPU) and return the JSON it wrote."""
    def run(name: str) -> dict:
        out = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(out.read_text())

    return run
