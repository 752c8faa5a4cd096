"""Serving benchmark: the engine with and without adapters, mixed batches, swaps, and HTTP concurrency.

One run on the default model, side by side, in tokens/s (greedy, EOS ignored so
every request produces exactly --new-tokens tokens):
- base model alone (a batch of 8 requests, no adapter);
- one SBoRA-FA adapter merged (8 requests, the same adapter);
- a mixed batch: 8 requests on 8 different adapters (unmerged, per-row banks);
- PEFT with the same 8 adapters (exported as LoRA) via `generate(adapter_names=...)`;
- adapter swap latency: load from disk + merge (ours, region cache warm) against
  PEFT's load_adapter + set_adapter + merge_adapter;
- whole-model merge + unmerge of one adapter already loaded: SBoRA-FA and
  SBoRA-FB (region cache warm, as in the engine) against PEFT's merge_adapter +
  unmerge_adapter of a LoRA adapter of the same rank;
- a cold adapter among 1,000: the engine has served adapters from 1,000
  distinct ids (its adapter cache full and evicting); the first token of a
  request for an id it has never loaded (read, sha256 and fingerprint checked,
  merged) against one for an id still in its cache. The 1,000 directories
  share 8 weight files (hard links): the files are in the OS page cache, as a
  local copy just fetched would be; the engine keys everything by id;
- 16 concurrent HTTP clients on /v1/completions against one client at a time.

    .venv/bin/python bench/serve.py

Writes bench/results/serve.json (top-level `ratios`).

    .venv/bin/python bench/serve.py --only long-prefill

measures one thing alone: the time to first token of 3-token requests from another tenant while
an 8,000-token prompt is being read, against the same request on an idle engine (prefill chunks
are bounded by time, `sbora_core/serving/prefill.py`); writes bench/results/serve_long_prefill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from sbora_core.method.adapter_io import export_peft, load_adapter, save_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import adapter_from_model, inject_adapter, remove_adapter
from sbora_core.method.merge import RegionCache, merge_adapters
from sbora_core.method.models import DEFAULT_MODEL, load_base_model
from sbora_core.serving.engine import Engine
from sbora_core.serving.generation import Completion, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "merged_vs_base_tps": (">=", 0.97),
    "mixed8_vs_base_tps": (">=", 0.75),
    "mixed8_vs_peft_mixed8_tps": (">", 1.0),
    "swap_speedup_vs_peft": (">=", 10.0),
    "concurrent16_vs_sequential": (">=", 3.0),
    "fa_merge_speedup_vs_peft": (">=", 10.0),
    "fb_merge_speedup_vs_peft": (">=", 20.0),
    "cold_adapter_first_token_ms": ("<=", 50.0),
}
REGISTERED = 1000
PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about autumn leaves.", "What is the capital of Japan?",
    "List three uses of copper.", "Describe a cat to someone who has never seen one.",
    "How do vaccines work?", "Give me a tip for learning to cook.", "Why do we have seasons?",
]


def make_adapters(base, n: int, r: int, out: Path, variant: str = "sbora_fa") -> list[Path]:
    """n SBoRA adapters with distinct index sets and random (trained-looking) factors."""
    dirs = []
    for i in range(n):
        config = SBoRAConfig(variant=variant, r=r, alpha=2 * r, dropout=0.0, index_seed=i,
                             base_fingerprint=base.fingerprint)
        layers = inject_adapter(base.model, config, fast_path=False)
        torch.manual_seed(i)
        with torch.no_grad():
            for layer in layers.values():
                layer.trainable.normal_(std=2e-3)
        save_adapter(adapter_from_model(base.model, config), out / f"{variant}-{i}")
        remove_adapter(base.model)
        dirs.append(out / f"{variant}-{i}")
    return dirs


def engine_tps(engine: Engine, prompts: list[list[int]], adapter_sets: list[list], params: SamplingParams,
               reps: int) -> float:
    """Generated tokens per second over `reps` batches of all prompts submitted together."""
    rates = []
    for _ in range(reps + 1):  # the first batch warms up (and fills the region cache)
        start = time.perf_counter()
        with engine.cv:
            handles = [engine.submit(p, a, params) for p, a in zip(prompts, adapter_sets, strict=True)]
        tokens = sum(h.result().completion_tokens for h in handles)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def peft_mixed_tps(base_dir_model, tokenizer, prompts: list[str], peft_dirs: list[Path], new_tokens: int,
                   reps: int) -> float:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_dir_model, peft_dirs[0], adapter_name="p0")
    for i, d in enumerate(peft_dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"p{i}")
    model.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    names = [f"p{i}" for i in range(len(prompts))]
    rates = []
    with torch.no_grad():
        for _ in range(reps + 1):
            start = time.perf_counter()
            out = model.generate(**enc, adapter_names=names, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            generated = (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)
            rates.append(generated / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def swap_latencies(base, dirs: list[Path], peft_model_factory, peft_dirs: list[Path],
                   reps: int) -> tuple[float, float, float]:
    """Median seconds for one swap: ours (load + merge) with the engine's region cache warm, ours with
    a cold cache (the first swap to a new index set), and PEFT (load_adapter + set_adapter + merge)."""

    def ours(regions_for) -> float:
        times = []
        for i in range(reps + 1):
            regions = regions_for()
            start = time.perf_counter()
            handle = merge_adapters(base.model, [load_adapter(dirs[i % len(dirs)])], regions)
            times.append(time.perf_counter() - start)
            handle.unmerge()
        return statistics.median(times[1:])

    warm = RegionCache()
    for d in dirs:  # the engine's steady state: every adapter seen once already
        merge_adapters(base.model, [load_adapter(d)], warm).unmerge()
    ours_warm, ours_cold = ours(lambda: warm), ours(RegionCache)
    peft_model = peft_model_factory()
    theirs = []
    for i in range(reps + 1):
        name = f"swap{i}"
        start = time.perf_counter()
        peft_model.load_adapter(peft_dirs[i % len(peft_dirs)], adapter_name=name)
        peft_model.set_adapter(name)
        peft_model.merge_adapter()
        theirs.append(time.perf_counter() - start)
        peft_model.unmerge_adapter()
        peft_model.delete_adapter(name)
    return ours_warm, ours_cold, statistics.median(theirs[1:])


def merge_unmerge_ms(base, adapters: dict[str, Path], peft_model, reps: int) -> dict[str, float]:
    """Median ms of one whole-model merge + unmerge: ours per variant (the adapter loaded, its index set
    seen before: the engine's steady state) and PEFT's merge_adapter + unmerge_adapter."""

    def median_ms(run) -> float:
        run()  # warm-up: the region cache, the factor check, PEFT's first call
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    result = {}
    for variant, directory in adapters.items():
        adapter, regions = load_adapter(directory), RegionCache()
        result[variant] = median_ms(lambda a=adapter, c=regions: merge_adapters(base.model, [a], c).unmerge())

    def peft_merge_unmerge() -> None:
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()

    result["peft_lora"] = median_ms(peft_merge_unmerge)
    return result


def cold_adapter_ms(base, sources: list[Path], prompt: list[int], root: Path, samples: int) -> dict[str, float]:
    """First-token ms of a request for an adapter the engine has never loaded, and of one still in its
    cache, after it has served adapters from REGISTERED ids (see the module docstring)."""
    from sbora_core.method.adapter_io import CONFIG_FILE, WEIGHTS_FILE
    from sbora_core.method.files import sha256_file

    sha = {src: sha256_file(src / WEIGHTS_FILE) for src in sources}
    registry: list[tuple[str, Path, str]] = []
    for i in range(REGISTERED):
        src, directory = sources[i % len(sources)], root / f"ad_{i:04d}"
        directory.mkdir(parents=True)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.link(src / name, directory / name)
        registry.append((f"ad_{i:04d}", directory, sha[src]))
    engine = Engine(base, max_batch_size=8)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def first_token_ms(entry: tuple[str, Path, str]) -> float:
        start = time.perf_counter()
        engine.generate(prompt, [engine.adapter(*entry)], params)
        return 1e3 * (time.perf_counter() - start)

    # Serve ids until the adapter cache has been full for a while: what stays is the recently used.
    served = 0
    while engine.cache.evictions <= len(engine.cache.entries) and served < REGISTERED - 2 * samples:
        first_token_ms(registry[served])
        served += 1
    warm, cold = [], []
    for k in range(samples):  # alternate, so drift hits both alike
        warm.append(first_token_ms(registry[served - 1 - k % 4]))  # seen a few requests ago, still cached
        cold.append(first_token_ms(registry[served + k]))
    hits, misses, evictions = engine.cache.hits, engine.cache.misses, engine.cache.evictions
    engine.close()
    return {"warm_first_token_ms": statistics.median(warm), "cold_first_token_ms": statistics.median(cold),
            "cold_extra_ms": statistics.median(cold) - statistics.median(warm), "ids_served_before": served,
            "cache_hits": hits, "cache_misses": misses, "cache_evictions": evictions}


def http_concurrency(new_tokens: int, clients: int, per_client: int) -> tuple[float, float]:
    """Tokens/s of `clients` concurrent /v1/completions callers vs the same calls one at a time."""
    import httpx
    from support import serve_default_model

    with serve_default_model() as (url, key):
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": DEFAULT_MODEL, "prompt": "Tell me a story about a robot.", "max_tokens": new_tokens,
                "temperature": 0, "ignore_eos": True}

        def call(client: httpx.Client) -> int:
            r = client.post(f"{url}/v1/completions", json=body, headers=headers, timeout=600)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        with httpx.Client() as client:
            call(client)  # warm-up: loads the model into the engine
            start = time.perf_counter()
            tokens = sum(call(client) for _ in range(per_client * 2))
            sequential = tokens / (time.perf_counter() - start)
        counts: list[int] = []

        def worker() -> None:
            with httpx.Client() as client:
                for _ in range(per_client):
                    counts.append(call(client))

        threads = [threading.Thread(target=worker) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent = sum(counts) / (time.perf_counter() - start)
    return sequential, concurrent


LONG_PREFILL_TARGET = {"ttft_short_during_long_prefill_vs_idle": ("<=", 3.0)}


def first_token_s(engine: Engine, prompt: list[int], tenant: str) -> float:
    """Seconds from submitting a 3-token request to its first text piece."""
    start = time.perf_counter()
    handle = engine.submit(prompt, [], SamplingParams(max_new_tokens=3, ignore_eos=True), tenant=tenant)
    for _ in handle:
        break
    elapsed = time.perf_counter() - start
    handle.result()
    return elapsed


def long_prefill(base, long_tokens: int, every_s: float, window_s: float) -> dict:
    """First-token times of short requests, idle and while a `long_tokens` prompt is read (for at most
    `window_s`: then the read is cancelled, and how far it got is recorded)."""
    tok = base.tokenizer
    short = tok(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                        add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    long = (tok("hello " * long_tokens, add_special_tokens=False)["input_ids"])[:long_tokens]
    engine = Engine(base, max_batch_size=8)
    try:
        for _ in range(3):
            first_token_s(engine, short, "other")  # warm-up
        idle = [first_token_s(engine, short, "other") for _ in range(10)]
        start = time.perf_counter()
        reading = engine.submit(long, [], SamplingParams(max_new_tokens=2, ignore_eos=True), tenant="long")
        busy: list[float] = []
        read = len(long)
        while not any(isinstance(item, Completion) for item in list(reading.events.queue)):
            time.sleep(every_s)
            if any(isinstance(item, Completion) for item in list(reading.events.queue)):
                break
            if time.perf_counter() - start > window_s:
                read = engine.prefilled.get(id(reading), (None, len(long)))[1]
                reading.cancel()
                break
            busy.append(first_token_s(engine, short, "other"))
            print(f"  {time.perf_counter() - start:6.1f} s into the read: first token in {busy[-1] * 1e3:.0f} ms",
                  file=sys.stderr, flush=True)
        reading.result()
        read_s = time.perf_counter() - start
        chunks = engine.stats["prefill_chunks"]
    finally:
        engine.close()
    ratio = statistics.median(busy) / statistics.median(idle)
    return {"long_prompt_tokens": len(long), "long_tokens_read": read, "short_prompt_tokens": len(short),
            "long_read_s": read_s,
            "long_prefill_chunks": chunks, "idle_first_token_ms": 1e3 * statistics.median(idle),
            "busy_first_token_ms": 1e3 * statistics.median(busy), "busy_first_token_ms_max": 1e3 * max(busy),
            "busy_samples": len(busy), "ratios": {"ttft_short_during_long_prefill_vs_idle": ratio},
            "targets": LONG_PREFILL_TARGET}


def main_long_prefill(args: argparse.Namespace) -> None:
    base = load_base_model(DEFAULT_MODEL, device="cpu")
    result = long_prefill(base, args.long_tokens, every_s=2.0, window_s=args.window_s)
    result["setup"] = {"model": DEFAULT_MODEL, "threads": args.threads, "dtype": "float32",
                       "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_long_prefill.json").write_text(json.dumps(result, indent=2))
    ratio = result["ratios"]["ttft_short_during_long_prefill_vs_idle"]
    print(f"\nFirst token of a 3-token request, {DEFAULT_MODEL}, fp32, {args.threads} threads\n")
    print("| measurement | value |\n|---|---:|")
    print(f"| idle engine (ms, median) | {result['idle_first_token_ms']:.1f} |")
    print(f"| while a {result['long_prompt_tokens']}-token prompt is read (ms, median of "
          f"{result['busy_samples']}) | {result['busy_first_token_ms']:.1f} |")
    print(f"| the same, worst (ms) | {result['busy_first_token_ms_max']:.1f} |")
    print(f"| reading {result['long_tokens_read']} tokens of it (s, {result['long_prefill_chunks']} chunks) | "
          f"{result['long_read_s']:.1f} |")
    print(f"\n| ratio | value | target |\n|---|---:|---|\n| ttft_short_during_long_prefill_vs_idle | {ratio:.2f} | "
          f"<= 3.0 ({'met' if ratio <= 3.0 else 'missed'}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--only", choices=["long-prefill"], help="run one measurement alone")
    parser.add_argument("--long-tokens", type=int, default=8000, help="the long prompt's tokens (--only long-prefill)")
    parser.add_argument("--window-s", type=float, default=200.0,
                        help="measure for at most this long while the long prompt is read (--only long-prefill)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only == "long-prefill":
        main_long_prefill(args)
        return
    os.environ["SBORA_TORCH_THREADS"] = str(args.threads)  # the HTTP rows' engine process, alike
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    base = load_base_model(DEFAULT_MODEL, device="cpu")
    tok = base.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for p in PROMPTS]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        dirs = make_adapters(base, 8, args.r, tmp)
        adapters = [load_adapter(d) for d in dirs]
        peft_dirs = [export_peft(a, tmp / f"peft{i}", str(base.path)) for i, a in enumerate(adapters)]

        print("engine: base / merged / mixed ...", file=sys.stderr, flush=True)
        engine = Engine(base, max_batch_size=8)  # the 8 requests of a run share one batch
        rows: dict[str, list[float]] = {}
        for _ in range(2):  # interleave the three modes twice against drift
            for key, sets in (("base", [[]] * 8), ("merged", [[adapters[0]]] * 8),
                              ("mixed8", [[a] for a in adapters])):
                rows.setdefault(key, []).append(engine_tps(engine, prompts, sets, params, args.reps))
        engine.close()
        tps = {k: max(v) for k, v in rows.items()}

        print("PEFT mixed batch ...", file=sys.stderr, flush=True)
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in PROMPTS]
        peft_base = load_base_model(DEFAULT_MODEL, device="cpu")
        tps["peft_mixed8"] = peft_mixed_tps(peft_base.model, peft_base.tokenizer, texts, peft_dirs,
                                            args.new_tokens, args.reps)

        print("swap latency ...", file=sys.stderr, flush=True)

        def peft_factory():
            from peft import PeftModel

            return PeftModel.from_pretrained(load_base_model(DEFAULT_MODEL, device="cpu").model, peft_dirs[0],
                                             adapter_name="first")

        ours_swap, ours_cold_swap, peft_swap = swap_latencies(base, dirs, peft_factory, peft_dirs, args.reps + 2)

        print("merge + unmerge ...", file=sys.stderr, flush=True)
        fb_dir = make_adapters(base, 1, args.r, tmp, variant="sbora_fb")[0]
        merges = merge_unmerge_ms(base, {"sbora_fa": dirs[0], "sbora_fb": fb_dir}, peft_factory(), args.reps + 4)

        print(f"a cold adapter among {REGISTERED} ...", file=sys.stderr, flush=True)
        cold = cold_adapter_ms(base, dirs, prompts[0], tmp / "registry", samples=8)

    print("HTTP concurrency ...", file=sys.stderr, flush=True)
    sequential, concurrent = http_concurrency(args.new_tokens // 2, args.clients, 2)

    ratios = {
        "merged_vs_base_tps": tps["merged"] / tps["base"],
        "mixed8_vs_base_tps": tps["mixed8"] / tps["base"],
        "mixed8_vs_peft_mixed8_tps": tps["mixed8"] / tps["peft_mixed8"],
        "swap_speedup_vs_peft": peft_swap / ours_swap,
        "concurrent16_vs_sequential": concurrent / sequential,
        "fa_merge_speedup_vs_peft": merges["peft_lora"] / merges["sbora_fa"],
        "fb_merge_speedup_vs_peft": merges["peft_lora"] / merges["sbora_fb"],
        "cold_adapter_first_token_ms": cold["cold_extra_ms"],
    }
    results = {
        "setup": {"model": DEFAULT_MODEL, "r": args.r, "variant": "sbora_fa", "batch": 8,
                  "new_tokens": args.new_tokens, "threads": args.threads, "dtype": "float32",
                  "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__},
        "tokens_per_s": tps,
        "swap_s": {"ours_load_and_merge": ours_swap, "ours_load_and_merge_cold_region_cache": ours_cold_swap,
                   "peft_load_set_merge": peft_swap},
        "merge_unmerge_ms": merges,
        "cold_adapter": {"registered_ids": REGISTERED, **cold},
        "http_tokens_per_s": {"sequential": sequential, f"concurrent{args.clients}": concurrent},
        "ratios": ratios,
        "targets": TARGETS,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(results, indent=2))

    print(f"\nServing, {DEFAULT_MODEL}, SBoRA-FA r={args.r}, batch 8, {args.new_tokens} new tokens, "
          f"fp32, {args.threads} threads\n")
    print("| measurement | value |\n|---|---:|")
    for key, label in (("base", "base model, batch of 8 (tokens/s)"),
                       ("merged", "one adapter merged, batch of 8 (tokens/s)"),
                       ("mixed8", "8 different adapters, unmerged per row (tokens/s)"),
                       ("peft_mixed8", "PEFT, 8 adapters via adapter_names (tokens/s)")):
        print(f"| {label} | {tps[key]:.1f} |")
    print(f"| swap: load + merge, ours, region cache warm (ms) | {ours_swap * 1e3:.1f} |")
    print(f"| swap: load + merge, ours, first swap to a new index set (ms) | {ours_cold_swap * 1e3:.1f} |")
    print(f"| swap: load_adapter + set_adapter + merge_adapter, PEFT (ms) | {peft_swap * 1e3:.1f} |")
    print(f"| merge + unmerge, SBoRA-FA, region cache warm (ms) | {merges['sbora_fa']:.1f} |")
    print(f"| merge + unmerge, SBoRA-FB, region cache warm (ms) | {merges['sbora_fb']:.1f} |")
    print(f"| merge_adapter + unmerge_adapter, PEFT LoRA (ms) | {merges['peft_lora']:.1f} |")
    print(f"| first token, adapter in the engine's cache, among {REGISTERED} ids (ms) | "
          f"{cold['warm_first_token_ms']:.1f} |")
    print(f"| first token, adapter never loaded, among {REGISTERED} ids (ms) | {cold['cold_first_token_ms']:.1f} |")
    print(f"| /v1/completions, one client at a time (tokens/s) | {sequential:.1f} |")
    print(f"| /v1/completions, {args.clients} concurrent clients (tokens/s) | {concurrent:.1f} |")
    print("\n| ratio | value | target |\n|---|---:|---|")
    for key, value in ratios.items():
        op, bound = TARGETS[key]
        ok = {">=": value >= bound, ">": value > bound, "<=": value <= bound}[op]
        print(f"| {key} | {value:.3f} | {op} {bound} ({'met' if ok else 'missed'}) |")


if __name__ == "__main__":
    main()
