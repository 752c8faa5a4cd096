"""bench/distributed.py's measurement on paper: a 70B NF4 base on the meta device, sharded by the
training code over a fake process group (in a process of its own, as the benchmark runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_nf4_statistics_formula_matches_bitsandbytes(load_bench):
    load_bench("distributed").check_statistics_formula()


def test_two_ranks_each_hold_half_the_70b_base_and_the_whole_statistics_and_factors():
    done = subprocess.run([sys.executable, str(BENCH / "distributed.py"), "--paper-child", "2", "--r", "8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert 68 < row["params_billion"] < 70  # Llama-2-70B's shapes
    assert abs(row["frozen_base_shard_gib"] - row["frozen_base_whole_gib"] / 2) < 0.01
    parts = row["frozen_base_shard_gib"] + row["nf4_statistics_gib"] + row["trainable_gib"]
    assert row["per_rank_gib"] == pytest.approx(parts)
    assert 0.9 < row["nf4_statistics_gib"] < 1.1 and 0 < row["trainable_gib"] < 0.25  # r=8: a quarter of r=32's
