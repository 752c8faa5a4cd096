"""Composition: three adapters trained in one group on three tasks, each task scored alone and composed.

SBoRA-FA adapters (r=32, all seven projections) are trained on ARC-Easy, BoolQ
and the arithmetic set, in three slots of one index seed: their index sets are
disjoint in every layer, so all three merge exactly into one model. Each task is
scored with the zero-shot base, with its own adapter, and with the composition
of all three. The anchors are LoRA r=32 adapters trained on the same tasks:
their dense sum merged into the base, and PEFT's `add_weighted_adapter` with
`combination_type="cat"` (weights 1). Training data, budget and scoring follow
`bench/quality.py` (CPU budget; its train/test overlap check runs first).

For each method, a task's retained gain is (composed accuracy - base) /
(single-adapter accuracy - base); `ratios.compose_retained_gain_min` is the
smallest over the three tasks (target >= 0.90), the same figure is given for
each anchor, and `compose_vs_best_anchor_retained` divides ours by the better
anchor's (target >= 1.0).

    .venv/bin/python bench/compose.py                 # about 1.5 h on 2 CPU cores
    .venv/bin/python bench/compose.py --steps 2 --mc-limit 8 --math-limit 4 --out /tmp/c.json   # a quick check

Finished trainings and evaluations are kept under --work-dir, so an interrupted
run picks up where it stopped. Writes bench/results/compose.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import quality  # bench/quality.py (this script runs from bench/): data, budget and overlap check
import torch

from sbora_core.method.adapter_io import export_peft, load_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.merge import merge_adapters
from sbora_core.method.models import DEFAULT_MODEL, load_base_model
from sbora_core.training.evaluate import evaluate_file
from sbora_core.training.job import Hyperparameters, TrainJob
from sbora_core.training.train import train

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {
    "arc": quality.Domain("commonsense", ("commonsense/arc-easy_train.json",), ("commonsense/arc-easy_test.json",),
                          ("arc-easy_test",)),
    "boolq": quality.Domain("commonsense", ("commonsense/boolq_train.json",), ("commonsense/boolq_test.json",),
                            ("boolq_test",)),
    "math": quality.DOMAINS["arithmetic"],
}
INDEX_SEED = 7  # the group's seed: slot k of every layer is block k of one permutation
TARGETS = {"compose_retained_gain_min": ">= 0.90", "compose_vs_best_anchor_retained": ">= 1.0"}


def train_adapter(task: str, variant: str, slot: int, budget: quality.Budget, data: Path, work: Path) -> Path:
    """Train (or reuse) one task's adapter; its directory."""
    run_dir = work / f"{task}-{variant}"
    if (run_dir / "adapter" / "adapter_config.json").exists():
        return run_dir / "adapter"
    domain = TASKS[task]
    train_file = quality.build_train_file(domain, data, budget, work / f"{task}-train.jsonl")
    print(f"  training {variant} on {task} (slot {slot})", flush=True)
    job = TrainJob(base_model=DEFAULT_MODEL, train_file=str(train_file), output_dir=str(run_dir),
                   sbora=SBoRAConfig(variant=variant, r=32, alpha=64.0, dropout=0.0, index_seed=INDEX_SEED,
                                     index_slot=slot if variant != "lora" else 0),
                   hyperparameters=Hyperparameters(max_steps=budget.steps[domain.name],
                                                   learning_rate=budget.learning_rate,
                                                   warmup_ratio=budget.warmup_ratio, schedule="cosine",
                                                   batch_size=budget.batch_size,
                                                   max_seq_len=budget.max_seq_len[domain.name], seed=0,
                                                   checkpoint_every=None))
    result = train(job)
    assert result.adapter_dir is not None
    return result.adapter_dir


def score(model: Any, tokenizer: Any, task: str, budget: quality.Budget, data: Path) -> list[int]:
    """Per-item outcomes of `model` on the task's test sets (concatenated)."""
    domain = TASKS[task]
    limit = budget.mc_limit if domain.name == "commonsense" else budget.math_limit
    outcomes: list[int] = []
    for name in domain.test_sets:
        result = evaluate_file(model, tokenizer, data / name, protocol="option_text", limit=limit, seed=0,
                               batch_size=8, max_new_tokens=budget.max_new_tokens)
        outcomes.extend(int(x) for x in result["outcomes"])
    return outcomes


def cached(path: Path, compute) -> list[int]:
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def evaluate(setup: str, adapters: list[Path], budget: quality.Budget, data: Path, work: Path,
             tasks: list[str] | None = None) -> dict[str, list[int]]:
    """The tasks' outcomes with `setup` applied: base, one adapter, merged adapters, or PEFT's cat."""
    out = {}
    for task in tasks or list(TASKS):
        def compute(task: str = task) -> list[int]:
            print(f"  scoring {setup} on {task}", flush=True)
            base = load_base_model(DEFAULT_MODEL)
            model = base.model
            if setup == "peft_cat":
                model = peft_cat(base, adapters)
            else:
                for directory in adapters:  # merged one by one: LoRA's dense deltas add up
                    merge_adapters(model, [load_adapter(directory)])
            return score(model, base.tokenizer, task, budget, data)

        out[task] = cached(work / "eval" / f"{setup}-{task}.json", compute)
    return out


def peft_cat(base: Any, adapters: list[Path]) -> Any:
    """PEFT's add_weighted_adapter(combination_type='cat', weights 1) of the LoRA adapters."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        names = [f"a{i}" for i in range(len(adapters))]
        dirs = [export_peft(load_adapter(d), Path(tmp) / n, str(base.path)) for n, d in zip(names, adapters, strict=True)]
        model = PeftModel.from_pretrained(base.model, str(dirs[0]), adapter_name=names[0])
        for name, directory in zip(names[1:], dirs[1:], strict=True):
            model.load_adapter(str(directory), adapter_name=name)
        model.add_weighted_adapter(names, [1.0] * len(names), "sum", combination_type="cat")
        model.set_adapter("sum")
        model.eval()
    return model


def retained(setup: dict[str, list[int]], single: dict[str, list[int]], base: dict[str, list[int]]) -> dict[str, float]:
    """Per task, (setup - base) / (single - base) in accuracy."""
    out = {}
    for task in TASKS:
        gain = np.mean(single[task]) - np.mean(base[task])
        out[task] = float((np.mean(setup[task]) - np.mean(base[task])) / gain) if gain > 0 else float("nan")
    return out


def retained_interval(setup: dict[str, list[int]], single: dict[str, list[int]], base: dict[str, list[int]],
                      draws: int = 2000) -> dict[str, list[float]]:
    """Per task, a 95% bootstrap interval of the retained gain: the test items resampled together
    for all three outcomes (they are the same items), so how much the figure moves with the sample."""
    rng = np.random.default_rng(0)
    out = {}
    for task in TASKS:
        b, s, c = (np.asarray(x[task], dtype=float) for x in (base, single, setup))
        picks = rng.integers(0, len(b), size=(draws, len(b)))
        gain = s[picks].mean(1) - b[picks].mean(1)
        ratio = (c[picks].mean(1) - b[picks].mean(1))[gain > 0] / gain[gain > 0]
        out[task] = [round(float(q), 3) for q in np.percentile(ratio, [2.5, 97.5])] if len(ratio) else []
    return out


def gain_interval(single: dict[str, list[int]], base: dict[str, list[int]], draws: int = 2000) -> dict[str, list[float]]:
    """Per task, a 95% bootstrap interval of the single adapter's gain over the base, in points."""
    rng = np.random.default_rng(0)
    out = {}
    for task in TASKS:
        b, s = (np.asarray(x[task], dtype=float) for x in (base, single))
        picks = rng.integers(0, len(b), size=(draws, len(b)))
        out[task] = [round(float(q), 1) for q in np.percentile(100 * (s[picks].mean(1) - b[picks].mean(1)), [2.5, 97.5])]
    return out


def summary_ratios(kept: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, float | None]:
    """The issue's ratios over `tasks`: each method's smallest retained gain, ours over the better anchor's."""
    def worst(values: dict[str, float]) -> float | None:
        finite = [values[t] for t in tasks if np.isfinite(values[t])]
        return round(min(finite), 3) if finite else None

    ratios = {"compose_retained_gain_min": worst(kept["sbora_fa_composed"]),
              "lora_sum_retained_gain_min": worst(kept["lora_sum"]),
              "peft_cat_retained_gain_min": worst(kept["peft_cat"])}
    anchors = [v for k, v in ratios.items() if k != "compose_retained_gain_min" and v is not None]
    ours, best = ratios["compose_retained_gain_min"], max(anchors, default=None)
    # Undefined when no anchor keeps any gain: a ratio of two losses says nothing.
    ratios["compose_vs_best_anchor_retained"] = round(ours / best, 3) if ours is not None and best and best > 0 \
        else None
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="training steps for every task (overrides the budget)")
    parser.add_argument("--mc-limit", type=int)
    parser.add_argument("--math-limit", type=int)
    parser.add_argument("--data", type=Path, default=quality.DATA)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "sbora" / "compose")
    parser.add_argument("--out", type=Path, default=RESULTS / "compose.json")
    args = parser.parse_args()

    budget = quality.cpu_budget()
    if args.steps:
        budget.steps = dict.fromkeys(budget.steps, args.steps)
    budget.mc_limit = args.mc_limit or budget.mc_limit
    budget.math_limit = args.math_limit or budget.math_limit
    for domain in TASKS.values():
        quality.check_no_overlap(args.data, domain.train_sets, domain.test_sets)
    tag = f"steps{budget.steps}-mc{budget.mc_limit}-math{budget.math_limit}"
    work = args.work_dir / "".join(c for c in tag if c.isalnum() or c in "-._")

    fa = {task: train_adapter(task, "sbora_fa", slot, budget, args.data, work) for slot, task in enumerate(TASKS)}
    lora = {task: train_adapter(task, "lora", 0, budget, args.data, work) for task in TASKS}
    base = evaluate("base", [], budget, args.data, work)
    fa_single = {t: evaluate(f"fa-{t}", [fa[t]], budget, args.data, work, [t])[t] for t in TASKS}
    lora_single = {t: evaluate(f"lora-{t}", [lora[t]], budget, args.data, work, [t])[t] for t in TASKS}
    composed = evaluate("fa-composed", list(fa.values()), budget, args.data, work)
    lora_sum = evaluate("lora-sum", list(lora.values()), budget, args.data, work)
    cat = evaluate("peft_cat", list(lora.values()), budget, args.data, work)

    kept = {"sbora_fa_composed": retained(composed, fa_single, base),
            "lora_sum": retained(lora_sum, lora_single, base), "peft_cat": retained(cat, lora_single, base)}
    kept_ci = {"sbora_fa_composed": retained_interval(composed, fa_single, base),
               "lora_sum": retained_interval(lora_sum, lora_single, base),
               "peft_cat": retained_interval(cat, lora_single, base)}
    ratios = summary_ratios(kept, list(TASKS))
    # The same figures over the tasks where both kinds of adapter alone gain clearly (the 95% interval
    # of the gain above zero): elsewhere a retained gain divides noise by noise.
    gains = {"sbora_fa": gain_interval(fa_single, base), "lora": gain_interval(lora_single, base)}
    clear = [t for t in TASKS if min(gains["sbora_fa"][t][0], gains["lora"][t][0]) > 0]

    def accuracy(outcomes: dict[str, list[int]]) -> dict[str, float]:
        return {t: round(100 * float(np.mean(v)), 1) for t, v in outcomes.items()}

    accuracies = {"base": accuracy(base), "sbora_fa_single": accuracy(fa_single),
                  "sbora_fa_composed": accuracy(composed), "lora_single": accuracy(lora_single),
                  "lora_sum": accuracy(lora_sum), "peft_cat": accuracy(cat)}
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})",
        "budget": {"steps": budget.steps, "batch_size": budget.batch_size, "learning_rate": budget.learning_rate,
                   "mc_limit": budget.mc_limit, "math_limit": budget.math_limit},
        "targets": TARGETS, "ratios": ratios, "retained": kept, "retained_ci95": kept_ci,
        "single_gain_points_ci95": gains, "tasks_with_clear_gain": clear,
        "ratios_on_tasks_with_clear_gain": summary_ratios(kept, clear),
        "accuracy": accuracies,
        "items": {t: len(v) for t, v in base.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("| task | base | FA alone | FA composed | LoRA alone | LoRA sum | PEFT cat |\n|---|---:|---:|---:|---:|---:|---:|")
    for task in TASKS:
        row = [accuracies[k][task] for k in ("base", "sbora_fa_single", "sbora_fa_composed", "lora_single",
                                                     "lora_sum", "peft_cat")]
        print(f"| {task} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    print("\n| retained gain | " + " | ".join(TASKS) + " |\n|---|" + "---:|" * len(TASKS))
    for method, values in kept.items():
        print(f"| {method} | " + " | ".join(f"{values[t]:.2f} {kept_ci[method][t]}" for t in TASKS) + " |")
    print(f"\nratios: {json.dumps(ratios)}\nwrote {args.out}")


if __name__ == "__main__":
    main()
