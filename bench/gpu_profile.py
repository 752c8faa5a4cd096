"""Where a GPU step's time goes: torch.profiler's top kernels for training steps and decode steps.

Training: the steps bench/gpu_train.py times (the 1B shape, r=32 on all seven
projections): the frozen floor, SBoRA-FA and SBoRA-FB on the bf16 base,
QSBoRA-FA and PEFT QLoRA on the NF4 base. Decoding: the engine at batch 32 on
bench/gpu_serve.py's model, no adapter and 8 mixed adapters, on its default
decode path (the slot cache with CUDA graphs on a GPU). For each, the device
time per step and the kernels that take most of it, with their calls per step.

    python bench/gpu_profile.py                              # on a GPU; writes bench/results/gpu_profile.json
    python bench/gpu_profile.py --smoke --out /tmp/x.json    # tiny shapes on the CPU (CPU ops instead of kernels)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpu_serve
import gpu_train
import torch
from support import synchronize
from torch._C._profiler import _ExperimentalConfig
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sbora_core.method.models import default_dtype
from sbora_core.serving.engine import Engine
from sbora_core.serving.generation import SamplingParams
from sbora_core.testing import random_adapter

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_ROWS = ("floor", "sbora_fa", "sbora_fb", "qsbora_fa", "peft_qlora")


def top_ops(prof: Any, steps: int, on_gpu: bool, limit: int) -> dict[str, Any]:
    """Device kernels (on a GPU) or CPU ops (elsewhere) by self time, per step."""
    if on_gpu:
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    total_us = sum(time_of(e) for e in events)
    events.sort(key=time_of, reverse=True)
    return {
        "time_per_step_ms": total_us / 1e3 / steps,
        "top": [{"name": e.key[:160], "calls_per_step": e.count / steps, "ms_per_step": time_of(e) / 1e3 / steps,
                 "share": time_of(e) / max(total_us, 1e-9)} for e in events[:limit]],
    }


def profiled(work: Callable[[], object], steps: int, device: torch.device, limit: int) -> dict[str, Any]:
    """Profile `work` (which runs `steps` steps) after one untimed call; wall time measured apart."""
    work()
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    wall = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # The engine decodes on its own thread: record every thread's ops, not only this one's.
    try:
        config = _ExperimentalConfig(profile_all_threads=True)
    except TypeError:  # an older torch: CUDA kernels are still seen from every thread
        config = _ExperimentalConfig()
    with profile(activities=activities, experimental_config=config) as prof:
        work()
        synchronize(device)
    return {"wall_ms_per_step": 1e3 * wall / steps, **top_ops(prof, steps, device.type == "cuda", limit)}


def training(device: torch.device, shape: gpu_train.Shape, args: argparse.Namespace, out: dict) -> None:
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        model_dir = gpu_train.build_model_dir(shape, Path(scratch) / "model", default_dtype(device), device)
        data = gpu_train.write_dataset(Path(scratch) / "data.jsonl", shape, records=4 * shape.batch)
        builders = gpu_train.method_steps(model_dir, data, shape, device, args.r)
        for key in args.rows:
            print(f"  train {key} ...", file=sys.stderr, flush=True)
            try:
                step, _ = builders[key]()
                step()  # warm-up beyond profiled's own: first steps allocate and autotune

                def two_steps(step: Callable[[], object] = step) -> None:
                    step()
                    step()

                out[key] = profiled(two_steps, 2, device, args.top)
            except Exception as exc:  # noqa: BLE001 - recorded, the other rows still run
                out[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            step = None  # type: ignore[assignment]
            gpu_train.free_memory()
            args.save()


def decoding(device: torch.device, shape: gpu_serve.Shape, args: argparse.Namespace, out: dict) -> None:
    base = gpu_serve.build_base(shape, device)
    rng = random.Random(0)
    prompts = [[rng.randrange(2, shape.vocab) for _ in range(shape.prompt)] for _ in range(32)]
    adapters = [random_adapter(base, "sbora_fa", r=shape.r, seed=i, index_seed=i, std=0.02) for i in range(8)]
    for i, a in enumerate(adapters):
        a.name = f"a{i}"
        a.place(device)
    new_tokens = args.decode_tokens
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engine = Engine(base, max_batch_size=32, slot_cache=True if args.smoke else None)
    out["decode_path"] = "slot cache, CUDA graphs" if engine.graphs else "slot cache, eager"
    for key, sets in (("base_b32", [[]] * 32), ("mixed8_b32", [[adapters[i % 8]] for i in range(32)])):
        print(f"  decode {key} ...", file=sys.stderr, flush=True)

        def generate(sets: list = sets) -> None:
            with engine.cv:  # every request queued before the scheduler takes any: one batch
                handles = [engine.submit(p, a, params) for p, a in zip(prompts, sets, strict=True)]
            for h in handles:
                h.result()

        try:
            # One prefill and new_tokens - 1 decode steps per call; the prefill is in the figures too.
            out[key] = profiled(generate, new_tokens, device, args.top)
        except Exception as exc:  # noqa: BLE001
            out[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        args.save()
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script works")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per profile")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--parts", nargs="+", default=["training", "decoding"], choices=["training", "decoding"])
    parser.add_argument("--rows", nargs="+", default=list(TRAIN_ROWS), choices=TRAIN_ROWS,
                        help="the training rows profiled")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_profile.json")
    args = parser.parse_args()
    if args.smoke:
        device = torch.device("cpu")
        train_shape, serve_shape, args.r, args.decode_tokens = gpu_train.SMOKE_SHAPES["1b"], gpu_serve.SMOKE, 4, 4
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU: run on a GPU machine, or --smoke to check the script on the CPU")
        device, train_shape, serve_shape = torch.device("cuda"), gpu_train.SHAPES["1b"], gpu_serve.FULL
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "smoke": args.smoke, "versions": gpu_train.versions(),
        "train_shape": vars(train_shape), "serve_shape": vars(serve_shape), "r": args.r,
        "training": {}, "decoding": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))

    args.save = save
    if "training" in args.parts:
        training(device, train_shape, args, report["training"])
    if "decoding" in args.parts:
        decoding(device, serve_shape, args, report["decoding"])
    save()
    for part in ("training", "decoding"):
        for key, row in report[part].items():
            if not isinstance(row, dict):
                continue
            if "error" in row:
                print(f"\n{part} {key}: failed: {row['error'][:200]}")
                continue
            print(f"\n{part} {key}: {row['time_per_step_ms']:.2f} ms of device time per step "
                  f"({row['wall_ms_per_step']:.2f} ms wall)")
            for op in row["top"]:
                print(f"  {op['ms_per_step']:9.3f} ms {100 * op['share']:5.1f}% x{op['calls_per_step']:<6g} {op['name'][:90]}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
