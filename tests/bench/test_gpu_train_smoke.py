"""bench/gpu_train.py works before a GPU is at hand: its --smoke mode, tiny shapes on the CPU."""

from __future__ import annotations

METHODS = {"floor", "sbora_fa", "sbora_fb", "lora", "peft_lora", "qsbora_fa", "peft_qlora"}


def test_smoke_run_measures_every_method_and_writes_the_ratios(smoke_report):
    report = smoke_report("gpu_train")
    assert report["smoke"] is True and report["versions"]["torch"]
    (first, rows_a), (second, rows_b) = report["rows"].items()
    assert set(rows_a) == METHODS and set(rows_b) == METHODS | {"qsbora_fa_checkpointed"}
    for rows in (rows_a, rows_b):
        assert not [row["error"] for row in rows.values() if "error" in row]
        assert all(row["step_s"] > 0 for row in rows.values())
        # SBoRA trains one factor, LoRA two; PEFT's LoRA has exactly ours' parameters.
        assert rows["floor"]["trainable"] == 0
        assert 0 < rows["sbora_fa"]["trainable"] < rows["lora"]["trainable"] == rows["peft_lora"]["trainable"]
        assert rows["qsbora_fa"]["trainable"] == rows["sbora_fa"]["trainable"]
    ratios = report["ratios"]
    for key in ("fa_step_vs_floor_bf16", "fb_step_vs_floor_bf16", "fa_step_vs_peft_lora_bf16",
                "qsbora_fa_step_vs_qlora"):
        assert ratios[key] > 0
    assert set(report["targets"]) >= {"fa_step_vs_floor_bf16", "qsbora_fa_8b_peak_gib"}
