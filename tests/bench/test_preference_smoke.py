"""bench/preference.py runs end to end on a tiny model (--smoke) and builds its pairs as described."""

from __future__ import annotations

import json


def test_smoke_run_reports_every_ratio(smoke_report):
    report = smoke_report("preference")
    ratios = report["ratios"]
    assert {"dpo_fa_pref_acc_gain_points", "dpo_fa_minus_lora_points",
            "dpo_time_per_pair_vs_sft_per_example"} <= set(ratios)
    assert ratios["dpo_time_per_pair_vs_sft_per_example"] > 0
    assert set(report["rows"]) == {"base", "sft_fa", "dpo_fa", "sft_dpo_fa", "sft_lora", "dpo_lora", "sft_dpo_lora"}
    assert report["rows"]["dpo_fa"]["train_examples"] > 0 and report["model"] == "tiny (smoke)"


def test_pairs_prefer_the_gold_option_over_a_wrong_one(load_bench, tmp_path):
    bench = load_bench("preference")
    data = bench.smoke_data(tmp_path)
    pairs = bench.pairs_of(data / bench.TRAIN_SETS[0], None)
    records = json.loads((data / bench.TRAIN_SETS[0]).read_text())
    assert len(pairs) == len(records)
    for pair in pairs:
        assert pair["prompt"].startswith("Question: ") and pair["chosen"] != pair["rejected"]
    assert {p["chosen"] for p in pairs} <= {" red", " blue", " green", " gold", " pink", " grey", " teal", " plum"}
