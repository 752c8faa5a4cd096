"""bench/gpu_serve.py works before a GPU is at hand: its --smoke mode, a tiny shape on the CPU."""

from __future__ import annotations


def test_smoke_run_measures_every_row_and_writes_the_ratios(smoke_report):
    report = smoke_report("gpu_serve")
    assert report["smoke"] is True and report["versions"]["torch"] and report["versions"]["device"]
    assert report["errors"] == {}  # every part ran (a failed part is recorded there and the rest still run)
    assert set(report["tokens_per_s"]) == {f"b{b}_{k}" for b in (8, 32) for k in ("base", "merged", "mixed8")} | {
        "b32_hf_generate", "b32_base_dynamic_cache"}
    assert report["setup"]["decode"] == "slot cache, eager"  # the path a GPU replays as graphs, run here
    assert all(v > 0 for v in report["tokens_per_s"].values())
    arrivals = report["continuous_batching"]
    assert arrivals["requests"] == report["setup"]["arrivals"]
    # Requests arrive while others decode: some of them must have joined a running batch.
    assert arrivals["joined_running_batch"] > 0
    assert set(report["ratios"]) == set(report["targets"])
    assert all(v > 0 for v in report["ratios"].values())
