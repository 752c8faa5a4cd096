"""Training-step benchmark: SBoRA-FA/FB against the frozen-model floor and LoRA (ours and PEFT's).

One run measures every method side by side on the default model (r=32, all
seven projections, batch 8 x 128 tokens, fp32, 2 threads):
- step time: all five models live in one process and take their steps in
  turn, round after round, so drift in machine speed hits every method alike;
- peak RSS: each method in a child process of its own;
- adapter file bytes, and whole-model merge+unmerge time of the trained
  adapter (ours through `merge_adapters`, PEFT through merge_adapter +
  unmerge_adapter), timed in turn as well.

    .venv/bin/python bench/train_step.py            # or: make bench

Prints a table and writes bench/results/train_step.json (top-level `ratios`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sbora_core.method.adapter import SparseAdapter
from sbora_core.method.adapter_io import load_adapter, save_adapter
from sbora_core.method.config import LLAMA_PROJECTIONS, SBoRAConfig
from sbora_core.method.inject import adapter_from_model, inject_adapter
from sbora_core.method.merge import RegionCache, merge_adapters
from sbora_core.method.models import DEFAULT_MODEL, load_base_model, resolve_model

METHODS = ["floor", "sbora_fa", "sbora_fb", "lora", "peft_lora"]
LABELS = {
    "floor": "frozen base, input grads (floor)",
    "sbora_fa": "SBoRA-FA (this project)",
    "sbora_fb": "SBoRA-FB (this project)",
    "lora": "LoRA (this project)",
    "peft_lora": "LoRA (PEFT)",
}
TARGETS = {
    "fa_step_vs_floor": ("<=", 1.05),
    "fa_step_vs_peft_lora": ("<=", 0.85),
    "fa_rss_vs_peft_lora": ("<=", 0.80),
    "fa_file_vs_peft_lora": ("<=", 0.55),
    "fa_merge_speedup_vs_peft": (">=", 10.0),
    "fb_merge_speedup_vs_peft": (">=", 20.0),
}
RESULTS = Path(__file__).resolve().parent / "results"


class Trainee:
    """One method's model, optimiser and batch, ready to take timed steps."""

    def __init__(self, method: str, r: int, batch: dict[str, torch.Tensor]) -> None:
        self.method = method
        self.base = load_base_model(DEFAULT_MODEL, device="cpu")
        self.model = self.base.model
        self.batch = batch
        if method == "floor":
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.enable_input_require_grads()  # gradients reach the input, as under any adapter
        elif method == "peft_lora":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LLAMA_PROJECTIONS))
            self.model = get_peft_model(self.model, config)
        else:
            self.config = SBoRAConfig(variant=method, r=r, alpha=2 * r, dropout=0.0,
                                       base_fingerprint=self.base.fingerprint)
            inject_adapter(self.model, self.config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=True) if self.params else None
        self.model.train()
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        if self.opt:
            self.opt.zero_grad(set_to_none=True)
        self.model(**self.batch).loss.backward()
        if self.opt:
            self.opt.step()
        return time.perf_counter() - start


def make_batch(args) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def rss_child(args) -> None:
    """Peak RSS of one method's training steps, alone in this process."""
    trainee = Trainee(args.rss_child, args.r, make_batch(args))
    for _ in range(2):
        trainee.step()
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_rss(method: str, args) -> float:
    cmd = [sys.executable, __file__, "--rss-child", method, "--r", str(args.r),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def peft_merge_unmerge(model: Any) -> None:
    model.merge_adapter()
    model.unmerge_adapter()


def merge_unmerge(model: torch.nn.Module, adapter: SparseAdapter, cache: RegionCache | None) -> None:
    merge_adapters(model, [adapter], cache).unmerge()


def merge_timers(trainees: dict[str, Trainee], tmp: Path) -> tuple[dict[str, int], dict[str, Callable[[], object]]]:
    """File size of each trained adapter, and a merge+unmerge closure per method."""
    sizes: dict[str, int] = {}
    timers: dict[str, Callable[[], object]] = {}
    with torch.no_grad():
        for method, t in trainees.items():
            if method == "floor":
                continue
            out = tmp / method
            if method == "peft_lora":
                for name, p in t.model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=1e-3)  # a trained-looking B, so the merge does real arithmetic
                t.model.save_pretrained(out)
                timers[method] = partial(peft_merge_unmerge, t.model)
            else:
                save_adapter(adapter_from_model(t.model, t.config), out)
                adapter = load_adapter(out)
                for delta in adapter.modules.values():
                    for factor in delta.factors().values():
                        factor.normal_(std=1e-3)
                plain = load_base_model(DEFAULT_MODEL, device="cpu").model
                timers[method] = partial(merge_unmerge, plain, adapter, None)
                if method != "lora":
                    cache = RegionCache()
                    timers[f"{method}_cached"] = partial(merge_unmerge, plain, adapter, cache)
            sizes[method] = (out / "adapter_model.safetensors").stat().st_size
    return sizes, timers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per method, taken in turn")
    parser.add_argument("--merge-rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return

    resolve_model(DEFAULT_MODEL)  # convert once, before anything is timed
    print("peak RSS, one child process per method ...", file=sys.stderr, flush=True)
    rss = {m: measure_rss(m, args) for m in METHODS}

    batch = make_batch(args)
    trainees = {m: Trainee(m, args.r, batch) for m in METHODS}
    for t in trainees.values():
        t.step()  # warm-up
    for i in range(args.rounds):
        print(f"step round {i + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        for t in trainees.values():
            t.times.append(t.step())

    with tempfile.TemporaryDirectory() as tmp:
        sizes, timers = merge_timers(trainees, Path(tmp))
        merge_times: dict[str, list[float]] = {k: [] for k in timers}
        with torch.no_grad():
            for fn in timers.values():
                fn()  # warm-up (and fills the region caches)
            for _ in range(args.merge_rounds):
                for key, fn in timers.items():
                    start = time.perf_counter()
                    fn()
                    merge_times[key].append(time.perf_counter() - start)
    merge = {k: statistics.median(v) for k, v in merge_times.items()}

    rows = {}
    for m, t in trainees.items():
        rows[m] = {
            "step_s": statistics.median(t.times),
            "step_times_s": t.times,
            "peak_rss_mb": rss[m],
            "trainable_params": sum(p.numel() for p in t.params),
            "file_bytes": sizes.get(m),
            "merge_unmerge_s": merge.get(m),
            "merge_unmerge_cached_s": merge.get(f"{m}_cached"),
        }
    fa, fb, floor, peft = rows["sbora_fa"], rows["sbora_fb"], rows["floor"], rows["peft_lora"]
    ratios = {
        "fa_step_vs_floor": fa["step_s"] / floor["step_s"],
        "fa_step_vs_peft_lora": fa["step_s"] / peft["step_s"],
        "fa_rss_vs_peft_lora": fa["peak_rss_mb"] / peft["peak_rss_mb"],
        "fa_file_vs_peft_lora": fa["file_bytes"] / peft["file_bytes"],
        # The serving engine swaps with a RegionCache (original regions read once); see docs/architecture.md.
        "fa_merge_speedup_vs_peft": peft["merge_unmerge_s"] / fa["merge_unmerge_cached_s"],
        "fb_merge_speedup_vs_peft": peft["merge_unmerge_s"] / fb["merge_unmerge_cached_s"],
        "fa_merge_speedup_vs_peft_uncached": peft["merge_unmerge_s"] / fa["merge_unmerge_s"],
        "fb_merge_speedup_vs_peft_uncached": peft["merge_unmerge_s"] / fb["merge_unmerge_s"],
    }
    setup = {
        "model": DEFAULT_MODEL, "r": args.r, "alpha": 2 * args.r, "batch": args.batch, "seq": args.seq,
        "dtype": "float32", "threads": args.threads, "rounds": args.rounds, "optimizer": "AdamW(fused=True)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_step.json").write_text(
        json.dumps({"setup": setup, "methods": rows, "ratios": ratios, "targets": TARGETS}, indent=2)
    )
    print_report(args, rows, ratios)


def print_report(args, rows, ratios) -> None:
    def ms(value):
        return "-" if value is None else f"{value * 1e3:.1f}"

    print(f"\nTraining step, {DEFAULT_MODEL}, r={args.r}, batch {args.batch}x{args.seq}, fp32, {args.threads} threads\n")
    print("| method | step (s, median) | peak RSS (MB) | trainable params | adapter file (bytes) "
          "| merge+unmerge (ms) | with region cache (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, row in rows.items():
        size = "-" if row["file_bytes"] is None else f"{row['file_bytes']:,}"
        print(f"| {LABELS[method]} | {row['step_s']:.2f} | {row['peak_rss_mb']:.0f} | {row['trainable_params']:,} "
              f"| {size} | {ms(row['merge_unmerge_s'])} | {ms(row['merge_unmerge_cached_s'])} |")
    print("\n| ratio | value | target |\n|---|---:|---|")
    for key, value in ratios.items():
        if key in TARGETS:
            op, bound = TARGETS[key]
            ok = value <= bound if op == "<=" else value >= bound
            print(f"| {key} | {value:.3f} | {op} {bound} ({'met' if ok else 'missed'}) |")
        else:
            print(f"| {key} | {value:.3f} | (for reference) |")


if __name__ == "__main__":
    main()
