"""Does it learn? SBoRA-FA, SBoRA-FB and LoRA fine-tuned and evaluated side by side.

Trains the default base model with every method on the same data, in the same
order, with the same steps and learning-rate schedule, then scores the
zero-shot base and each adapter on the test sets in ../shared/data:

- commonsense: trained on ARC-Easy + OpenBookQA + BoolQ (mixed in equal
  shares) as question -> correct option text; scored on ARC-Easy, BoolQ, PIQA,
  Social IQa and WinoGrande by the mean log-likelihood of each option's text
  after `Question: ...\\nAnswer:` (the `option_text` protocol; ARC-Easy and
  BoolQ are in-domain, the other three are not);
- arithmetic: trained on math_train.json's worked solutions (chat template);
  scored on MultiArith, SingleEq and GSM8K by greedy generation, comparing
  the last number of the answer with the gold one.

Methods: SBoRA-FA, SBoRA-FB and LoRA at r=32, LoRA at r=16 (about SBoRA-FA
r=32's trainable parameters) and SBoRA-FA at r=64; alpha = 2r throughout, all
seven projections. Accuracy carries a 95% bootstrap interval over test items
(items averaged over seeds first); `vs_base` is the paired bootstrap of the
in-domain accuracy gain over the zero-shot base, `vs_lora_r32` that of the
average difference from LoRA r=32.

    .venv/bin/python bench/quality.py                 # reduced CPU budget (about 1.5 h on 2 cores)
    .venv/bin/python bench/quality.py --domain-seeds commonsense=0,1   # a second seed where it matters
    .venv/bin/python bench/quality.py --full --seeds 0 1 2   # the full-size run, for a GPU

Finished trainings and evaluations are kept under --work-dir, so an
interrupted run picks up where it stopped. Writes bench/results/quality.json
(top-level `ratios`) and bench/results/quality.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sbora_core.method.adapter_io import apply_adapter, load_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.models import DEFAULT_MODEL, load_base_model
from sbora_core.training.evaluate import evaluate_file, load_task
from sbora_core.training.job import Hyperparameters, TrainJob
from sbora_core.training.train import train

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass(frozen=True)
class Method:
    key: str
    variant: str
    r: int
    label: str

    @property
    def alpha(self) -> float:
        return 2.0 * self.r


METHODS = {
    m.key: m
    for m in [
        Method("sbora_fa_r32", "sbora_fa", 32, "SBoRA-FA"),
        Method("sbora_fb_r32", "sbora_fb", 32, "SBoRA-FB"),
        Method("lora_r32", "lora", 32, "LoRA"),
        Method("lora_r16", "lora", 16, "LoRA"),
        Method("sbora_fa_r64", "sbora_fa", 64, "SBoRA-FA"),
    ]
}


@dataclass(frozen=True)
class Domain:
    name: str
    train_sets: tuple[str, ...]
    test_sets: tuple[str, ...]
    in_domain: tuple[str, ...]  # test sets drawn from the training distribution


DOMAINS = {
    "commonsense": Domain(
        "commonsense",
        ("commonsense/arc-easy_train.json", "commonsense/openbookqa_train.json", "commonsense/boolq_train.json"),
        ("commonsense/arc-easy_test.json", "commonsense/boolq_test.json", "commonsense/piqa_test.json",
         "commonsense/social_i_qa_test.json", "commonsense/winogrande_test.json"),
        ("arc-easy_test", "boolq_test"),
    ),
    "arithmetic": Domain(
        "arithmetic",
        ("arithmetic/math_train.json",),
        ("arithmetic/multiarith_test.json", "arithmetic/singleeq_test.json", "arithmetic/gsm8k_test.json"),
        ("multiarith_test", "singleeq_test", "gsm8k_test"),
    ),
}


@dataclass
class Budget:
    steps: dict[str, int]
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    max_seq_len: dict[str, int]
    mc_limit: int | None  # test items per multiple-choice set (None: all)
    math_limit: int | None  # test items per arithmetic set
    max_new_tokens: int
    records_per_train_set: int


def cpu_budget() -> Budget:
    return Budget(steps={"commonsense": 100, "arithmetic": 30}, batch_size=8, learning_rate=5e-4,
                  warmup_ratio=0.06, max_seq_len={"commonsense": 192, "arithmetic": 192},
                  mc_limit=150, math_limit=40, max_new_tokens=160, records_per_train_set=1000)


def full_budget() -> Budget:
    return Budget(steps={"commonsense": 1000, "arithmetic": 800}, batch_size=16, learning_rate=5e-4,
                  warmup_ratio=0.06, max_seq_len={"commonsense": 256, "arithmetic": 384},
                  mc_limit=None, math_limit=None, max_new_tokens=256, records_per_train_set=6000)


# -- train/test separation ---------------------------------------------------------------------
class TrainTestOverlap(ValueError):
    """A training record asks a question that a scored test file asks too."""


def normalised_question(record: dict) -> str:
    """Instruction + input, lower-cased, every run of non-word characters folded to one space."""
    text = f"{record.get('instruction', '')} {record.get('input', '')}".lower()
    return re.sub(r"\W+", " ", text).strip()


def check_no_overlap(data: Path, train_sets: tuple[str, ...], test_sets: tuple[str, ...]) -> None:
    """Stop before training if any training question (in any of `train_sets`) is also a test question.

    Scores measured on questions the model was trained on measure recall, not the task; the
    arithmetic figures of this bench were void for that reason until the shared data was fixed.
    """
    seen = {normalised_question(r) for name in train_sets for r in json.loads((data / name).read_text())}
    overlaps = {}
    for name in test_sets:
        shared = sum(normalised_question(r) in seen for r in json.loads((data / name).read_text()))
        if shared:
            overlaps[name] = shared
    if overlaps:
        listed = ", ".join(f"{name} ({count})" for name, count in overlaps.items())
        raise TrainTestOverlap(
            f"{sum(overlaps.values())} test question(s) also appear in the training files "
            f"{', '.join(train_sets)} (after lower-casing and folding punctuation): {listed}. "
            "Remove them from the training data before measuring.")


# -- training data -----------------------------------------------------------------------------
def build_train_file(domain: Domain, data: Path, budget: Budget, out: Path) -> Path:
    """The domain's training records in one file, mixed in a fixed order (seed 0)."""
    if out.exists():
        return out
    rng = random.Random(0)
    records: list[dict] = []
    for name in domain.train_sets:
        path = data / name
        if domain.name == "commonsense":
            # Train on what the option_text protocol scores: the correct option's text.
            _, items = load_task(path)
            part = [{"prompt": i.context, "completion": f" {i.choices[i.gold]}"}
                    for i in items if i.choices is not None and i.gold is not None]
        else:
            part = [{k: r[k] for k in ("instruction", "input", "output")} for r in json.loads(path.read_text())
                    if r["output"].strip()]  # a few records have no worked solution
        rng.shuffle(part)
        records.extend(part[: budget.records_per_train_set])
    # The source sets repeat a few questions; the trainer rejects duplicates.
    records = list({json.dumps(r, sort_keys=True): r for r in records}.values())
    rng.shuffle(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


# -- runs --------------------------------------------------------------------------------------
def train_method(domain: Domain, method: Method, seed: int, train_file: Path, budget: Budget,
                 run_dir: Path) -> dict:
    """Train once (or reuse a finished run); the training metrics."""
    done = run_dir / "train.json"
    if done.exists():
        return json.loads(done.read_text())
    job = TrainJob(
        base_model=DEFAULT_MODEL,
        train_file=str(train_file),
        output_dir=str(run_dir),
        # Dropout and checkpoints stated explicitly: the protocol must not move with the service's defaults.
        sbora=SBoRAConfig(variant=method.variant, r=method.r, alpha=method.alpha, dropout=0.0, index_seed=seed),
        hyperparameters=Hyperparameters(
            max_steps=budget.steps[domain.name], learning_rate=budget.learning_rate,
            warmup_ratio=budget.warmup_ratio, schedule="cosine", batch_size=budget.batch_size,
            max_seq_len=budget.max_seq_len[domain.name], seed=seed, checkpoint_every=None,
        ),
    )
    print(f"  training {method.key} seed {seed} on {domain.name} ({job.hyperparameters.max_steps} steps)", flush=True)
    result = train(job)
    metrics = {k: v for k, v in result.metrics.items() if k not in ("val_curve",)}
    metrics["adapter_dir"] = str(result.adapter_dir)
    done.write_text(json.dumps(metrics))
    return metrics


def evaluate_model(domain: Domain, data: Path, budget: Budget, adapter_dir: str | None, out: Path) -> dict:
    """Per-task outcomes of the base model, with `adapter_dir` applied if given (or reused)."""
    if out.exists():
        return json.loads(out.read_text())
    base = load_base_model(DEFAULT_MODEL)
    if adapter_dir:
        apply_adapter(base.model, load_adapter(adapter_dir), base.fingerprint)
    results = {}
    for name in domain.test_sets:
        started = time.perf_counter()
        limit = budget.mc_limit if domain.name == "commonsense" else budget.math_limit
        r = evaluate_file(base.model, base.tokenizer, data / name, protocol="option_text", limit=limit, seed=0,
                          batch_size=8, max_new_tokens=budget.max_new_tokens)
        results[r["task"]] = {"protocol": r["protocol"], "outcomes": [int(x) for x in r["outcomes"]]}
        print(f"    {r['task']}: {r['accuracy']:.1%} of {r['items']} ({time.perf_counter() - started:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results))
    return results


# -- statistics --------------------------------------------------------------------------------
def bootstrap(per_task: dict[str, np.ndarray], resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of each task's accuracy and of their average, resampling items."""
    rng = np.random.default_rng(seed)
    draws = {}
    for task, outcomes in per_task.items():
        idx = rng.integers(0, len(outcomes), size=(resamples, len(outcomes)))
        draws[task] = outcomes[idx].mean(axis=1)
    draws["average"] = np.mean([draws[t] for t in per_task], axis=0)
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()}


def paired_gain(adapted: dict[str, np.ndarray], base: dict[str, np.ndarray], tasks: tuple[str, ...],
                resamples: int = 2000, seed: int = 1) -> dict[str, float | list[float]]:
    """Mean in-domain accuracy gain over the base, with a paired 95% bootstrap interval."""
    rng = np.random.default_rng(seed)
    diffs = []
    for task in tasks:
        d = adapted[task] - base[task]
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        diffs.append(d[idx].mean(axis=1))
    gain = np.mean(diffs, axis=0)
    point = float(np.mean([(adapted[t] - base[t]).mean() for t in tasks]))
    return {"gain": point, "ci95": [float(np.percentile(gain, 2.5)), float(np.percentile(gain, 97.5))]}


def add_paired_differences(rows: list[dict], outcomes: dict, domain: str, reference: str = "lora_r32") -> None:
    """`vs_lora_r32` on each adapter row: is a method's average really below or above LoRA r=32's?"""
    if (domain, reference) not in outcomes:
        return
    for row in rows:
        if row["domain"] == domain and (domain, row["key"]) in outcomes and row["key"] != reference:
            mine, theirs = outcomes[(domain, row["key"])], outcomes[(domain, reference)]
            diff = paired_gain(mine, theirs, tuple(mine), seed=2)
            row["vs_lora_r32"] = {"difference": diff["gain"], "ci95": diff["ci95"]}


def summarise(outcomes_by_seed: list[dict], tasks: list[str]) -> dict[str, np.ndarray]:
    """Each task's per-item accuracy, averaged over seeds."""
    return {t: np.mean([np.array(o[t]["outcomes"], dtype=float) for o in outcomes_by_seed], axis=0) for t in tasks}


# -- report ------------------------------------------------------------------------------------
def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({r["domain"] for r in rows})
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4.5), squeeze=False)
    colours = {"sbora_fa": "tab:blue", "sbora_fb": "tab:orange", "lora": "tab:green"}
    for ax, domain in zip(axes[0], domains, strict=True):
        for row in (r for r in rows if r["domain"] == domain):
            lo, hi = row["ci95"]["average"]
            y = 100 * row["average"]
            if row["method"] == "base":
                ax.axhline(y, color="grey", linestyle="--", label="base (zero-shot)")
                ax.axhspan(100 * lo, 100 * hi, color="grey", alpha=0.12)
                continue
            ax.errorbar(row["trainable_params"] / 1e6, y, yerr=[[y - 100 * lo], [100 * hi - y]], fmt="o",
                        capsize=4, color=colours[row["method"]], label=f"{row['label']} r={row['r']}")
            ax.annotate(f"r={row['r']}", (row["trainable_params"] / 1e6, y), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
        ax.set_title(f"{domain}: average accuracy (95% CI)")
        ax.set_xlabel("trainable parameters (millions)")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict], domain: Domain) -> None:
    tasks = [Path(t).stem for t in domain.test_sets]
    head = ["method", "r", "trainable"] + [t.replace("_test", "") for t in tasks] + [
        "average", "in-domain gain vs base", "average vs LoRA r=32", "train s"]
    print(f"\n{domain.name}\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in (r for r in rows if r["domain"] == domain.name):
        cells = [row["label"], str(row["r"] or "-"), f"{row['trainable_params']:,}"]
        for t in tasks:
            lo, hi = row["ci95"][t]
            cells.append(f"{100 * row['accuracy'][t]:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]")
        lo, hi = row["ci95"]["average"]
        cells.append(f"**{100 * row['average']:.1f}** [{100 * lo:.1f}, {100 * hi:.1f}]")
        if row.get("vs_base"):
            g = row["vs_base"]
            cells.append(f"{100 * g['gain']:+.1f} [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]")
        else:
            cells.append("-")
        if row.get("vs_lora_r32"):
            d = row["vs_lora_r32"]
            cells.append(f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]")
        else:
            cells.append("-")
        cells.append(f"{row['train_wall_time_s']:.0f}" if row.get("train_wall_time_s") else "-")
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size budget (for a GPU): all test items, more steps")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--domain-seeds", nargs="+", default=[], metavar="DOMAIN=S,S",
                        help="seeds for one domain, overriding --seeds (e.g. commonsense=0,1)")
    parser.add_argument("--method-seeds", nargs="+", default=[], metavar="DOMAIN:METHOD=S,S",
                        help="seeds for one method in one domain, overriding the domain's "
                             "(e.g. arithmetic:lora_r32=0,1): more seeds where the comparison matters most")
    parser.add_argument("--steps", type=int, help="training steps for every domain (overrides the budget)")
    parser.add_argument("--mc-limit", type=int, help="test items per multiple-choice set")
    parser.add_argument("--math-limit", type=int, help="test items per arithmetic set")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "sbora" / "quality")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args()

    budget = full_budget() if args.full else cpu_budget()
    if args.steps:
        budget.steps = dict.fromkeys(budget.steps, args.steps)
    if args.mc_limit:
        budget.mc_limit = args.mc_limit
    if args.math_limit:
        budget.math_limit = args.math_limit
    if args.learning_rate:
        budget.learning_rate = args.learning_rate
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    # Runs made under another budget must not be mixed into this one's table.
    tag = f"steps{budget.steps}-bs{budget.batch_size}-lr{budget.learning_rate}-mc{budget.mc_limit}-math{budget.math_limit}"
    work = args.work_dir / "".join(c for c in tag if c.isalnum() or c in "-._")
    print(f"device: {device}; work dir {work}", flush=True)

    seeds_of: dict[str, list[int]] = {name: list(args.seeds) for name in args.domains}
    for item in args.domain_seeds:
        name, _, listed = item.partition("=")
        if name not in DOMAINS or not listed:
            parser.error(f"--domain-seeds: expected DOMAIN=S,S with DOMAIN one of {', '.join(DOMAINS)}, got {item!r}")
        seeds_of[name] = [int(x) for x in listed.split(",")]
    method_seeds: dict[tuple[str, str], list[int]] = {}
    for item in args.method_seeds:
        target, _, listed = item.partition("=")
        name, _, key = target.partition(":")
        if name not in DOMAINS or key not in METHODS or not listed:
            parser.error(f"--method-seeds: expected DOMAIN:METHOD=S,S with DOMAIN one of {', '.join(DOMAINS)} "
                         f"and METHOD one of {', '.join(METHODS)}, got {item!r}")
        method_seeds[(name, key)] = [int(x) for x in listed.split(",")]

    # Every domain is checked before any training, so an overlap stops the run at once.
    for name in args.domains:
        try:
            check_no_overlap(args.data, DOMAINS[name].train_sets, DOMAINS[name].test_sets)
        except TrainTestOverlap as exc:
            parser.exit(2, f"quality.py: {name}: {exc}\n")

    rows: list[dict] = []
    outcomes: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name in args.domains:
        domain = DOMAINS[name]
        tasks = [Path(t).stem for t in domain.test_sets]
        train_file = build_train_file(domain, args.data, budget, work / name / "train.jsonl")
        print(f"{name}: zero-shot base", flush=True)
        base_outcomes = evaluate_model(domain, args.data, budget, None, work / name / "base" / "eval.json")
        base = summarise([base_outcomes], tasks)
        rows.append(row_for(domain, None, base, base_outcomes, [], base, device))
        for key in args.methods:
            method = METHODS[key]
            trained, evaluated = [], []
            run_seeds = method_seeds.get((name, key), seeds_of[name])
            for seed in run_seeds:
                run_dir = work / name / f"{key}-seed{seed}"
                metrics = train_method(domain, method, seed, train_file, budget, run_dir)
                trained.append(metrics)
                evaluated.append(evaluate_model(domain, args.data, budget, metrics["adapter_dir"], run_dir / "eval.json"))
            per_item = summarise(evaluated, tasks)
            rows.append(row_for(domain, method, per_item, evaluated[0], trained, base, device, run_seeds))
            outcomes[(name, key)] = per_item
        add_paired_differences(rows, outcomes, name)

    ratios = {}
    for name in args.domains:
        by_key = {r["key"]: r for r in rows if r["domain"] == name}
        if "sbora_fa_r32" in by_key and "lora_r32" in by_key:
            fa, lora = by_key["sbora_fa_r32"], by_key["lora_r32"]
            ratios[f"{name}_fa32_minus_lora32_points"] = round(100 * (fa["average"] - lora["average"]), 2)
            ratios["fa32_params_vs_lora32"] = round(fa["trainable_params"] / lora["trainable_params"], 3)
        gains = [r["vs_base"]["ci95"][0] for r in rows if r["domain"] == name and r.get("vs_base")]
        if gains:
            ratios[f"{name}_variants_beating_base"] = sum(g > 0 for g in gains) / len(gains)

    report = {
        "device": device,
        "budget": asdict(budget),
        "seeds": seeds_of,
        "method_seeds": {f"{d}:{k}": v for (d, k), v in method_seeds.items()},
        "protocols": {"commonsense": "option_text: mean log-likelihood of each option's text after 'Question: ...\\nAnswer:'",
                      "arithmetic": "greedy generation (chat template), last number compared with the gold answer"},
        "subsets": "a fixed random subset (seed 0) of each test set, the same for every method; sizes in `items`",
        "targets": {"*_fa32_minus_lora32_points": ">= -1.0", "*_variants_beating_base": "1.0 (paired 95% CI above 0)"},
        "ratios": ratios,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    chart(rows, args.out.with_suffix(".png"))
    for name in args.domains:
        print_table(rows, DOMAINS[name])
    print(f"\nratios: {json.dumps(ratios)}\nwrote {args.out} and {args.out.with_suffix('.png')}")


def row_for(domain: Domain, method: Method | None, per_item: dict[str, np.ndarray], one_run: dict,
            trained: list[dict], base: dict[str, np.ndarray], device: str, seeds: list[int] | None = None) -> dict:
    accuracy = {t: float(v.mean()) for t, v in per_item.items()}
    row = {
        "domain": domain.name,
        "key": method.key if method else "base",
        "method": method.variant if method else "base",
        "label": method.label if method else "base (zero-shot)",
        "r": method.r if method else None,
        "alpha": method.alpha if method else None,
        "trainable_params": trained[0]["trainable_params"] if trained else 0,
        "accuracy": accuracy,
        "average": float(np.mean(list(accuracy.values()))),
        "ci95": bootstrap(per_item),
        "items": {t: len(v) for t, v in per_item.items()},
        "protocol": {t: one_run[t]["protocol"] for t in per_item},
        "seeds": seeds or [],
        "device": device,
    }
    if method:
        row["vs_base"] = paired_gain(per_item, base, domain.in_domain)
        row["train_wall_time_s"] = float(np.mean([m["wall_time_s"] for m in trained]))
        row["train_loss"] = float(np.mean([m["train_loss"] for m in trained]))
    return row


if __name__ == "__main__":
    main()
