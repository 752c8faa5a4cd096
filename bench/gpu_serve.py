"""GPU serving benchmark: the engine against transformers `generate` and PEFT, on a model built from a config.

A LLaMA-shaped model of about 1B parameters (hidden 2048, intermediate 8192, 16
layers, 32/8 heads, vocab 32000) with random weights (decoding speed does not
depend on them), bf16 on a GPU. Prompts are 128 random tokens, every request
generates exactly 128 tokens (greedy, EOS ignored). Measured side by side in
one run:
- the engine's tokens/s at batch 8 and 32: base (no adapter), one SBoRA-FA
  adapter merged (every row the same), 8 different adapters (unmerged, per row);
- transformers `generate` on the same model, prompts and lengths;
- whole-model merge + unmerge of one SBoRA-FA adapter (r=32, seven
  projections, region cache warm) against PEFT's merge_adapter + unmerge_adapter
  of a LoRA adapter of the same rank;
- continuous batching: requests arrive at Poisson times, at the rate that keeps
  32 streams in flight; the median time to first token against a lone
  request's, and how many requests joined a batch already running.

    python bench/gpu_serve.py                              # on a GPU; writes bench/results/gpu_serve.json
    python bench/gpu_serve.py --smoke --out /tmp/x.json    # a tiny shape on the CPU, under a minute

The JSON has a top-level `ratios` object (targets in `targets`), the device's
name and the torch, CUDA, transformers and peft versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from support import synchronize, timed

from sbora_core.method.merge import RegionCache, merge_adapters
from sbora_core.method.models import BaseModel, default_dtype
from sbora_core.serving.engine import Engine
from sbora_core.serving.generation import SamplingParams
from sbora_core.testing import random_adapter

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "b32_engine_vs_hf_generate": ">= 10",
    "base_vs_merged_tps": ">= 0.97",
    "merged_vs_base_tps": ">= 0.97",
    "mixed8_vs_base_tps": ">= 0.85",
    "fa_merge_unmerge_ms": "<= 2",
    "fa_merge_speedup_vs_peft": ">= 20",
    "ttft_p50_vs_idle": "<= 2",
}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    prompt: int
    new_tokens: int
    r: int
    arrivals: int  # requests in the continuous-batching run


FULL = Shape(2048, 8192, 16, 32, 8, 32000, prompt=128, new_tokens=128, r=32, arrivals=128)
SMOKE = Shape(64, 128, 2, 4, 2, 512, prompt=16, new_tokens=8, r=4, arrivals=12)


def word_tokenizer(vocab: int):
    """A tokenizer whose every id is a whole word ("w17"): random ids decode to text at once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="w1", pad_token="w0")


def build_base(shape: Shape, device: torch.device) -> BaseModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, bos_token_id=None,
                         eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype=default_dtype(device))  # type: ignore[call-arg]  # transformers wraps .to narrowly
    model.eval()
    return BaseModel(name="llama-config", path=Path("."), fingerprint="config-built", quantization="none",
                     model=model, tokenizer=word_tokenizer(shape.vocab))


def engine_tps(engine: Engine, prompts: list[list[int]], adapter_sets: list[list], params: SamplingParams,
               reps: int) -> float:
    """Generated tokens per second, all prompts submitted together; the median of `reps` after a warm-up."""
    rates = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        with engine.cv:  # every request queued before the scheduler takes any: one batch
            handles = [engine.submit(p, a, params) for p, a in zip(prompts, adapter_sets, strict=True)]
        tokens = sum(h.result().completion_tokens for h in handles)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def hf_generate_tps(base: BaseModel, prompts: list[list[int]], new_tokens: int, reps: int) -> float:
    ids = torch.tensor(prompts, device=base.device)
    mask = torch.ones_like(ids)
    rates = []
    with torch.no_grad():
        for _ in range(reps + 1):
            synchronize(base.device)
            start = time.perf_counter()
            out = base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            synchronize(base.device)
            rates.append((out.shape[1] - ids.shape[1]) * len(prompts) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def merge_ms(base: BaseModel, adapter, reps: int) -> float:
    regions = RegionCache()

    def once() -> None:
        merge_adapters(base.model, [adapter], regions).unmerge()

    return 1e3 * timed(once, base.device, 1, reps)


def peft_merge_ms(base: BaseModel, adapter, reps: int) -> float:
    """PEFT's merge_adapter + unmerge_adapter of a LoRA adapter of the same rank and targets."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=adapter.config.r, lora_alpha=adapter.config.alpha, lora_dropout=0.0,
                        target_modules=sorted({n.split(".")[-1] for n in adapter.modules}), init_lora_weights=False)
    model = get_peft_model(base.model, config)

    def once() -> None:
        model.merge_adapter()
        model.unmerge_adapter()

    try:
        return 1e3 * timed(once, base.device, 1, reps)
    finally:
        model.unload()  # the base model back, without the LoRA layers


def first_token_s(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[object, threading.Event, list]:
    """Submit; the returned list receives the seconds from submission to the first event."""
    arrived: list[float] = []
    done = threading.Event()
    start = time.perf_counter()

    def listen(item: object) -> None:
        if not arrived:
            arrived.append(time.perf_counter() - start)
        if not isinstance(item, str):
            done.set()

    handle = engine.submit(prompt, [], params)
    handle.listen(listen)
    return handle, done, arrived


def continuous_batching(engine: Engine, prompts: list[list[int]], params: SamplingParams, tps32: float,
                        arrivals: int) -> dict:
    """Open-loop Poisson arrivals at the rate that keeps 32 streams in flight (Little's law with the
    batch-32 stream duration); TTFT of each against a lone request's."""
    idle = []
    for _ in range(5):
        _, done, arrived = first_token_s(engine, prompts[0], params)
        done.wait()
        idle.append(arrived[0])
    stream_s = 32 * params.max_new_tokens / tps32
    rate = 32 / stream_s
    rng = random.Random(0)
    joined_before = engine.stats["joined"]
    waits = []
    start = time.perf_counter()
    due = 0.0
    for i in range(arrivals):
        due += rng.expovariate(rate)
        pause = start + due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        waits.append(first_token_s(engine, prompts[i % len(prompts)], params))
    for _, done, _ in waits:
        done.wait()
    ttft = sorted(arrived[0] for _, _, arrived in waits)
    return {"idle_ttft_ms": 1e3 * statistics.median(idle), "ttft_p50_ms": 1e3 * statistics.median(ttft),
            "ttft_p99_ms": 1e3 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "stream_s": stream_s, "arrival_rate_per_s": rate, "requests": arrivals,
            "joined_running_batch": engine.stats["joined"] - joined_before}


def ratios_of(tps: dict[str, float], merges: dict[str, float], arrivals: dict) -> dict[str, float]:
    """The issue's ratios, each once both of its figures are measured."""
    pairs = {
        "b32_engine_vs_hf_generate": (tps.get("b32_base"), tps.get("b32_hf_generate")),
        "base_vs_merged_tps": (tps.get("b32_base"), tps.get("b32_merged")),
        "merged_vs_base_tps": (tps.get("b32_merged"), tps.get("b32_base")),
        "mixed8_vs_base_tps": (tps.get("b32_mixed8"), tps.get("b32_base")),
        "fa_merge_speedup_vs_peft": (merges.get("peft_lora_ms"), merges.get("sbora_fa_ms")),
        "ttft_p50_vs_idle": (arrivals.get("ttft_p50_ms"), arrivals.get("idle_ttft_ms")),
    }
    out = {key: a / b for key, (a, b) in pairs.items() if a and b}
    if "sbora_fa_ms" in merges:
        out["fa_merge_unmerge_ms"] = merges["sbora_fa_ms"]
    return {key: out[key] for key in TARGETS if key in out}


def versions(device: torch.device) -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on whatever device is here")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_serve.json")
    args = parser.parse_args()
    shape = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("no GPU here: run with --smoke to check the script on the CPU")
    base = build_base(shape, device)
    rng = random.Random(0)
    prompts = [[rng.randrange(2, shape.vocab) for _ in range(shape.prompt)] for _ in range(32)]
    params = SamplingParams(max_new_tokens=shape.new_tokens, ignore_eos=True)
    adapters = [random_adapter(base, "sbora_fa", r=shape.r, seed=i, index_seed=i, std=0.02) for i in range(8)]
    for i, a in enumerate(adapters):
        a.name = f"a{i}"
        a.place(device)  # as the engine's adapter cache places what it loads
    params_count = sum(p.numel() for p in base.model.parameters())
    tps: dict[str, float] = {}
    merges: dict[str, float] = {}
    arrivals: dict = {}
    ratios: dict[str, float] = {}
    report = {
        "smoke": args.smoke,
        "setup": {**shape.__dict__, "parameters": params_count, "dtype": str(default_dtype(device)),
                  "device": str(device)},
        "versions": versions(device),
        "tokens_per_s": tps,
        "merge_unmerge": merges,
        "continuous_batching": arrivals,
        "ratios": ratios,
        "targets": TARGETS,
        "errors": {},
    }

    def section(name: str, work) -> None:
        """Run one part; a failure is recorded and the later parts still run. Saves after each."""
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - a failed part is a finding, not the end of the run
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"  failed: {report['errors'][name]}", file=sys.stderr, flush=True)
        ratios.update(ratios_of(tps, merges, arrivals))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))

    def engine_rows() -> None:
        # On a GPU the engine's default: the slot cache, steps replayed as CUDA graphs; the smoke run takes
        # the slot cache eagerly (the CPU's default is the dynamic cache).
        engine = Engine(base, max_batch_size=32, slot_cache=True if args.smoke else None)
        report["setup"]["decode"] = ("slot cache, CUDA graphs" if engine.graphs else
                                     "slot cache, eager" if engine.slots else "dynamic cache")
        try:
            for batch in (8, 32):
                rows = prompts[:batch]
                for key, sets in (("base", [[]] * batch), ("merged", [[adapters[0]]] * batch),
                                  ("mixed8", [[adapters[i % 8]] for i in range(batch)])):
                    tps[f"b{batch}_{key}"] = engine_tps(engine, rows, sets, params, args.reps)
            print("continuous batching ...", file=sys.stderr, flush=True)
            arrivals.update(continuous_batching(engine, prompts, params, tps["b32_base"], shape.arrivals))
        finally:
            engine.close()

    def dynamic_cache() -> None:
        dynamic = Engine(base, max_batch_size=32, slot_cache=False)  # what the slot cache replaced, for the record
        try:
            tps["b32_base_dynamic_cache"] = engine_tps(dynamic, prompts, [[]] * 32, params, args.reps)
        finally:
            dynamic.close()

    def hf_generate() -> None:
        tps["b32_hf_generate"] = hf_generate_tps(base, prompts, shape.new_tokens, args.reps)

    def merge_rows() -> None:
        merges["sbora_fa_ms"] = merge_ms(base, adapters[0], args.reps + 4)
        merges["peft_lora_ms"] = peft_merge_ms(base, adapters[0], args.reps + 4)

    section("engine tokens/s", engine_rows)
    section("dynamic cache", dynamic_cache)
    section("transformers generate", hf_generate)
    section("merge + unmerge", merge_rows)

    print(f"\nGPU serving, {params_count / 1e9:.2f}B parameters on {report['versions']['device']}\n")
    print("| measurement | value |\n|---|---:|")
    for key, value in tps.items():
        print(f"| {key} (tokens/s) | {value:.1f} |")
    for key, value in {**merges, **arrivals}.items():
        print(f"| {key} | {value:.3f} |")
    print("\n| ratio | value | target |\n|---|---:|---|")
    for key, value in ratios.items():
        print(f"| {key} | {value:.3f} | {TARGETS[key]} |")
    for name, error in report["errors"].items():
        print(f"{name} failed: {error}")


if __name__ == "__main__":
    main()
