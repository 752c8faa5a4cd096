"""The chaos soak's short version: half a minute of kills on the embedded stack, and nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


@pytest.mark.alone  # times each recovery: run by itself, after the parallel tests
def test_half_a_minute_of_chaos_loses_no_job_and_answers_only_503s(tmp_path):
    # Kills come every 7-13 s and alternate worker / engine, so 30 s meet both kinds.
    out = tmp_path / "chaos.json"
    done = subprocess.run([sys.executable, str(BENCH), "--flavours", "embedded", "--duration", "30",
                           "--chaos-every", "10", "--clients", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    ratios, run = report["ratios"], report["flavours"]["embedded"]
    assert {k["action"] for k in run["kills"]} == {"worker", "engine"}, run["kills"]
    assert run["jobs"] > 0 and run["generations"] > 0
    assert ratios["jobs_lost"] == 0, run["lost"]
    assert ratios["duplicate_adapters"] == 0
    assert ratios["generate_5xx_without_retry_after"] == 0, run["other_errors"]
    assert ratios["generate_5xx_rate"] <= 0.05  # the soak's target is 0.005; half a minute has few requests
    if ratios["max_recovery_s"] is not None:
        assert ratios["max_recovery_s"] <= 20, run["kills"]
