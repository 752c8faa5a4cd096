"""Preference training: does DPO on an SBoRA adapter learn what it is shown to prefer, at what cost?

Pairs come from the commonsense training sets in ../shared/data (ARC-Easy, OpenBookQA, BoolQ, in
equal shares): the question as `Question: ...\\nAnswer:`, the correct option's text preferred over a
wrong option drawn at random (seed 0). The overlap guard of bench/quality.py runs first. Trained on
the default model, one epoch, the same order and schedule for every run:
- SFT: the same prompts with the preferred answer as the completion;
- DPO from a fresh adapter (the reference is the base), and SFT -> DPO (the reference is the SFT adapter);
each as SBoRA-FA and LoRA at r=32 (alpha 64). Scored on pairs built the same way from the ARC-Easy and
BoolQ test sets (held-out preference accuracy: the preferred answer's summed log-prob above the other's)
and by multiple-choice accuracy on them (bench/quality.py's option_text protocol), with 95% bootstrap
intervals; gains are paired over the same items.

    .venv/bin/python bench/preference.py              # CPU budget (480 pairs; several hours for all six runs on 2 cores)
    .venv/bin/python bench/preference.py --methods dpo_fa dpo_lora sft_fa   # the ratios' runs only
    .venv/bin/python bench/preference.py --smoke      # a tiny model on generated data: the script runs

Writes bench/results/preference.json with top-level `ratios`:
- dpo_fa_pref_acc_gain_points: held-out preference accuracy of DPO (FA) over the base (target: CI clear of 0);
- dpo_fa_minus_lora_points: DPO FA minus DPO LoRA, same budget (target >= -1);
- dpo_time_per_pair_vs_sft_per_example: training seconds per pair (reference pass included) over SFT's
  per example (target <= 2.8).
Finished runs are kept under --work-dir, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import TrainTestOverlap, bootstrap, check_no_overlap, paired_gain  # noqa: E402

from sbora_core.method.adapter_io import apply_adapter, load_adapter  # noqa: E402
from sbora_core.method.config import SBoRAConfig  # noqa: E402
from sbora_core.method.models import DEFAULT_MODEL, load_base_model  # noqa: E402
from sbora_core.training.data import load_examples  # noqa: E402
from sbora_core.training.evaluate import evaluate_file, load_task  # noqa: E402
from sbora_core.training.job import Hyperparameters, TrainJob  # noqa: E402
from sbora_core.training.preference import reference_logps, tokenize_pairs  # noqa: E402
from sbora_core.training.train import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN_SETS = ("commonsense/arc-easy_train.json", "commonsense/openbookqa_train.json", "commonsense/boolq_train.json")
TEST_SETS = ("commonsense/arc-easy_test.json", "commonsense/boolq_test.json")


@dataclass(frozen=True)
class Run:
    key: str
    objective: str  # sft, dpo, or sft_dpo (dpo continuing the sft run of the same variant)
    variant: str


RUNS = {r.key: r for r in [Run("sft_fa", "sft", "sbora_fa"), Run("dpo_fa", "dpo", "sbora_fa"),
                           Run("sft_dpo_fa", "sft_dpo", "sbora_fa"), Run("sft_lora", "sft", "lora"),
                           Run("dpo_lora", "dpo", "lora"), Run("sft_dpo_lora", "sft_dpo", "lora")]}


@dataclass
class Budget:
    pairs_per_train_set: int
    test_items: int  # per test set, for both scores
    r: int
    batch_size: int
    learning_rate: float
    beta: float
    max_seq_len: int


def cpu_budget() -> Budget:
    return Budget(pairs_per_train_set=160, test_items=250, r=32, batch_size=8, learning_rate=5e-4, beta=0.1,
                  max_seq_len=192)


def smoke_budget() -> Budget:
    return Budget(pairs_per_train_set=8, test_items=8, r=4, batch_size=4, learning_rate=1e-2, beta=0.1,
                  max_seq_len=96)


# -- data ----------------------------------------------------------------------------------------
def pairs_of(path: Path, limit: int | None, seed: int = 0) -> list[dict]:
    """prompt/chosen/rejected records: the correct option's text over a random wrong one."""
    rng = random.Random(seed)
    _, items = load_task(path)
    rng.shuffle(items)
    out = []
    for item in items:
        if item.choices is None or item.gold is None or len(set(item.choices)) < 2:
            continue
        wrong = [c for i, c in enumerate(item.choices) if i != item.gold and c != item.choices[item.gold]]
        if not wrong:
            continue
        out.append({"prompt": item.context, "chosen": f" {item.choices[item.gold]}", "rejected": f" {rng.choice(wrong)}"})
        if limit and len(out) == limit:
            break
    return out


def write_lines(path: Path, records: list[dict]) -> Path:
    unique = list({json.dumps(r, sort_keys=True): r for r in records}.values())  # the trainer rejects duplicates
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in unique))
    return path


def build_files(data: Path, budget: Budget, work: Path) -> tuple[Path, Path, dict[str, Path]]:
    """(pairs, sft records of the same prompts, held-out pairs per test set)."""
    rng = random.Random(0)
    pairs = [p for name in TRAIN_SETS for p in pairs_of(data / name, budget.pairs_per_train_set)]
    rng.shuffle(pairs)
    pair_file = write_lines(work / "pairs.jsonl", pairs)
    sft_file = write_lines(work / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs])
    held = {Path(name).stem: write_lines(work / f"held-{Path(name).stem}.jsonl",
                                         pairs_of(data / name, budget.test_items, seed=1)) for name in TEST_SETS}
    return pair_file, sft_file, held


# -- runs ----------------------------------------------------------------------------------------
def train_run(run: Run, model: str, files: tuple[Path, Path], budget: Budget, work: Path) -> dict:
    """Train once (or reuse a finished run); its metrics with the whole call's seconds."""
    done = work / run.key / "train.json"
    if done.exists():
        return json.loads(done.read_text())
    init = None
    if run.objective == "sft_dpo":
        init = train_run(RUNS[f"sft_{run.key.rsplit('_', 1)[1]}"], model, files, budget, work)["adapter_dir"]
    dpo = run.objective != "sft"
    job = TrainJob(base_model=model, train_file=str(files[0] if dpo else files[1]), output_dir=str(work / run.key),
                   sbora=SBoRAConfig(variant=run.variant, r=budget.r, alpha=2.0 * budget.r, dropout=0.0),
                   hyperparameters=Hyperparameters(epochs=1, learning_rate=budget.learning_rate, warmup_ratio=0.06,
                                                   batch_size=budget.batch_size, max_seq_len=budget.max_seq_len,
                                                   eval_batch_size=16, checkpoint_every=None),
                   objective="dpo" if dpo else "sft", beta=budget.beta, init_adapter=init)
    print(f"  training {run.key}", flush=True)
    started = time.perf_counter()
    result = train(job)  # timed whole: DPO's reference pass is part of its cost
    metrics = {k: v for k, v in result.metrics.items() if k not in ("loss_curve", "val_curve")}
    metrics.update(adapter_dir=str(result.adapter_dir), total_s=time.perf_counter() - started)
    done.write_text(json.dumps(metrics))
    return metrics


def score(model: str, adapter_dir: str | None, held: dict[str, Path], data: Path, budget: Budget, out: Path) -> dict:
    """Per-item outcomes: held-out preference accuracy and multiple-choice accuracy, per test set."""
    if out.exists():
        return json.loads(out.read_text())
    base = load_base_model(model)
    if adapter_dir:
        apply_adapter(base.model, load_adapter(adapter_dir), base.fingerprint)
    result: dict[str, dict[str, list[int]]] = {"preference": {}, "choice": {}}
    for name, path in held.items():
        pairs = tokenize_pairs(base.tokenizer, load_examples(path), budget.max_seq_len)
        logps = reference_logps(base.model, pairs, 16, base.tokenizer.pad_token_id)
        result["preference"][name] = (logps[:, 0] > logps[:, 1]).int().tolist()
    for name in TEST_SETS:
        r = evaluate_file(base.model, base.tokenizer, data / name, protocol="option_text",
                          limit=budget.test_items, seed=0, batch_size=8)
        result["choice"][r["task"]] = [int(x) for x in r["outcomes"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    return result


def arrays(outcomes: dict, kind: str) -> dict[str, np.ndarray]:
    return {t: np.array(v, dtype=float) for t, v in outcomes[kind].items()}


def row_for(key: str, outcomes: dict, base: dict, trained: dict | None) -> dict:
    row: dict = {"key": key}
    for kind in ("preference", "choice"):
        mine = arrays(outcomes, kind)
        row[kind] = {t: float(v.mean()) for t, v in mine.items()}
        row[f"{kind}_average"] = float(np.mean(list(row[kind].values())))
        row[f"{kind}_ci95"] = bootstrap(mine)["average"]
        if trained is not None:
            row[f"{kind}_vs_base"] = paired_gain(mine, arrays(base, kind), tuple(mine))
    if trained is not None:
        row.update(train_s=trained["total_s"], train_examples=trained["train_examples"],
                   trainable_params=trained["trainable_params"], train_loss=trained["train_loss"])
        for name in ("rewards_accuracies", "rewards_margins"):
            if f"train_{name}" in trained:
                row[f"train_{name}"] = trained[f"train_{name}"]
    return row


def ratios_of(rows: dict[str, dict]) -> dict[str, float | list[float]]:
    ratios: dict[str, float | list[float]] = {}
    if "dpo_fa" in rows:
        gain = rows["dpo_fa"]["preference_vs_base"]
        ratios["dpo_fa_pref_acc_gain_points"] = round(100 * gain["gain"], 2)
        ratios["dpo_fa_pref_acc_gain_ci95"] = [round(100 * x, 2) for x in gain["ci95"]]
    if "dpo_fa" in rows and "dpo_lora" in rows:
        ratios["dpo_fa_minus_lora_points"] = round(
            100 * (rows["dpo_fa"]["preference_average"] - rows["dpo_lora"]["preference_average"]), 2)
        ratios["dpo_fa_params_vs_lora"] = round(rows["dpo_fa"]["trainable_params"]
                                                / rows["dpo_lora"]["trainable_params"], 3)
    if "dpo_fa" in rows and "sft_fa" in rows:
        per_pair = rows["dpo_fa"]["train_s"] / rows["dpo_fa"]["train_examples"]
        ratios["dpo_time_per_pair_vs_sft_per_example"] = round(
            per_pair / (rows["sft_fa"]["train_s"] / rows["sft_fa"]["train_examples"]), 3)
    return ratios


def print_table(rows: dict[str, dict]) -> None:
    print("\n| run | held-out preference accuracy | vs base | multiple choice | vs base | train s |")
    print("|---|---|---|---|---|---|")
    for key, row in rows.items():
        cells = [key]
        for kind in ("preference", "choice"):
            lo, hi = row[f"{kind}_ci95"]
            cells.append(f"{100 * row[f'{kind}_average']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
            g = row.get(f"{kind}_vs_base")
            cells.append(f"{100 * g['gain']:+.1f} [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]" if g else "-")
        cells.append(f"{row['train_s']:.0f}" if "train_s" in row else "-")
        print("| " + " | ".join(cells) + " |")


# -- smoke ---------------------------------------------------------------------------------------
def smoke_data(root: Path) -> Path:
    """A data folder shaped like ../shared/data's commonsense sets, for a tiny model's run."""
    words = ["red", "blue", "green", "gold", "pink", "grey", "teal", "plum"]

    def records(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(offset, offset + n):
            options = [words[(i + k) % len(words)] for k in range(4)]
            listed = " ".join(f"Answer{k + 1}: {o}" for k, o in enumerate(options))
            out.append({"instruction": f"Please choose the correct answer to the question: colour {i}?\n\n{listed}"
                                       "\n\nAnswer format: answer1/answer2/answer3/answer4",
                        "input": "", "output": "the correct answer is answer1", "answer": "answer1"})
        return out

    for k, name in enumerate(TRAIN_SETS + TEST_SETS):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records(12, 100 * k)))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--smoke", action="store_true", help="a tiny model on generated data (for the tests)")
    parser.add_argument("--pairs-per-set", type=int, help="training pairs from each training set (budget: 160)")
    parser.add_argument("--test-items", type=int, help="scored items per test set (budget: 250)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "sbora" / "preference")
    parser.add_argument("--out", type=Path, default=RESULTS / "preference.json")
    args = parser.parse_args()

    budget, model, work, data = cpu_budget(), DEFAULT_MODEL, args.work_dir, args.data
    if args.smoke:
        from sbora_core.testing import build_tiny_model

        scratch = Path(tempfile.mkdtemp(prefix="sbora-preference-smoke-"))
        budget, work = smoke_budget(), scratch / "work"
        model, data = str(build_tiny_model(scratch / "tiny")), smoke_data(scratch / "data")
    if args.pairs_per_set:
        budget.pairs_per_train_set = args.pairs_per_set
    if args.test_items:
        budget.test_items = args.test_items
    try:
        check_no_overlap(data, TRAIN_SETS, TEST_SETS)
    except TrainTestOverlap as exc:
        parser.exit(2, f"preference.py: {exc}\n")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    work = work / (f"pairs{budget.pairs_per_train_set}-test{budget.test_items}-r{budget.r}-lr{budget.learning_rate}"
                   f"-beta{budget.beta}")
    print(f"device: {device}; work dir {work}", flush=True)
    pair_file, sft_file, held = build_files(data, budget, work)

    print("base", flush=True)
    base = score(model, None, held, data, budget, work / "base" / "score.json")
    rows = {"base": row_for("base", base, base, None)}
    for key in args.methods:
        trained = train_run(RUNS[key], model, (pair_file, sft_file), budget, work)
        outcomes = score(model, trained["adapter_dir"], held, data, budget, work / key / "score.json")
        rows[key] = row_for(key, outcomes, base, trained)
    ratios = ratios_of(rows)
    report = {"device": device, "model": "tiny (smoke)" if args.smoke else model, "budget": asdict(budget),
              "targets": {"dpo_fa_pref_acc_gain_points": "95% CI above 0", "dpo_fa_minus_lora_points": ">= -1",
                          "dpo_time_per_pair_vs_sft_per_example": "<= 2.8"},
              "ratios": ratios, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(rows)
    print(f"\nratios: {json.dumps(ratios)}\nwrote {args.out}")


if __name__ == "__main__":
    main()
