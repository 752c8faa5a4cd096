"""GPU training benchmark: SBoRA and QSBoRA against the frozen-model floor, LoRA, PEFT LoRA and PEFT QLoRA.

Models are built from a config (random weights: a step's speed does not depend
on them), at two LLaMA shapes: about 1B parameters (hidden 2048, intermediate
8192, 16 layers, 32/8 heads, vocab 32000) and LLaMA-3-8B's (hidden 4096,
intermediate 14336, 32 layers, 32/8 heads, vocab 128256). For each shape the
methods run in turn, each on a freshly loaded model, r=32 on all seven
projections, no dropout:
- bf16 base: the floor (frozen base, gradients to the inputs only), SBoRA-FA,
  SBoRA-FB and LoRA through the product's own training step (`sbora_core.training.train`:
  `prepare` and `Run.step`), and PEFT LoRA in the same step (`backward_pass`);
- NF4 base (bf16 compute): QSBoRA-FA, and PEFT QLoRA;
- the 8B shape on NF4 at batch 4 x 512 with gradient checkpointing: the peak
  memory of an 8B fine-tune (the 12 GB consumer GPU case).
Each method's figure is the median step time after warm-up steps, and
`torch.cuda.max_memory_allocated` over loading and stepping.

    python bench/gpu_train.py                       # on a GPU; writes bench/results/gpu_train.json
    python bench/gpu_train.py --shapes 1b           # one shape
    python bench/gpu_train.py --smoke --out /tmp/x.json   # tiny shapes on the CPU, under a minute

The JSON has a top-level `ratios` object (targets in `targets`), the GPU's name
and the torch, CUDA, transformers, peft and bitsandbytes versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from support import timed

from sbora_core.method.config import LLAMA_PROJECTIONS, SBoRAConfig
from sbora_core.method.models import default_dtype
from sbora_core.testing import build_byte_tokenizer
from sbora_core.training.data import load_examples
from sbora_core.training.job import Hyperparameters, TrainJob
from sbora_core.training.tokenization import collate, tokenize_examples
from sbora_core.training.train import autocast_for, backward_pass, prepare

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "fa_step_vs_floor_bf16": "<= 1.05 (both shapes)",
    "fb_step_vs_floor_bf16": "<= 1.10 (both shapes)",
    "fa_step_vs_peft_lora_bf16": "<= 0.80",
    "fa_mem_vs_peft_lora_bf16": "<= 0.65",
    "qsbora_fa_step_vs_qlora": "<= 0.75",
    "qsbora_fa_mem_vs_qlora": "<= 0.85",
    "qsbora_fa_8b_peak_gib": "<= 8",
}


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int


SHAPES = {
    "1b": Shape("1b", 2048, 8192, 16, 32, 8, 32000, batch=8, seq=1024),
    "8b": Shape("8b", 4096, 14336, 32, 32, 8, 128256, batch=8, seq=1024),
}
SMOKE_SHAPES = {
    "1b": Shape("tiny-a", 64, 128, 2, 4, 2, 512, batch=2, seq=32),
    "8b": Shape("tiny-b", 96, 192, 2, 4, 2, 512, batch=2, seq=32),
}


def build_model_dir(shape: Shape, directory: Path, dtype: torch.dtype, device: torch.device) -> Path:
    """A randomly initialised LLaMA of `shape`, saved with a byte-level tokenizer (ids fit any vocab)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=max(2048, shape.seq),
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    free_memory()
    return directory


def write_dataset(path: Path, shape: Shape, records: int) -> Path:
    """prompt/completion records whose completions fill `seq` tokens (the byte tokenizer: a token a letter)."""
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(records):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(shape.seq + 16))
            f.write(json.dumps({"prompt": "Q", "completion": text}) + "\n")
    return path


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# -- the contenders ------------------------------------------------------------------------------
# Each `*_step` builds one method's model and returns (one training step, its trainable parameter
# count); `bench/gpu_profile.py` profiles the same steps this script times.
def ours_step(model_dir: Path, data: Path, shape: Shape, variant: str, quantization: str, device: torch.device,
              r: int, checkpointing: bool = False) -> tuple[Callable[[], object], int]:
    """The product's own step: load_base_model, inject_adapter and the optimiser through `prepare`."""
    hp = Hyperparameters(max_steps=10**6, batch_size=shape.batch, max_seq_len=shape.seq, learning_rate=1e-4,
                         warmup_ratio=0.0, checkpoint_every=None, gradient_checkpointing=checkpointing)
    job = TrainJob(base_model=str(model_dir), train_file=str(data), output_dir=str(model_dir.parent / "run"),
                   sbora=SBoRAConfig(variant=variant, r=r, alpha=2.0 * r, dropout=0.0),
                   hyperparameters=hp, quantization=quantization, device=str(device))
    run = prepare(job)
    run.start()
    return run.step, sum(p.numel() for p in run.params)


def plain_model(model_dir: Path, quantization: str, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = default_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": str(device)}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def baseline_step(model_dir: Path, data: Path, shape: Shape, kind: str, quantization: str, device: torch.device,
                  r: int) -> tuple[Callable[[], object], int]:
    """`floor` (frozen, gradients to the inputs) or `peft` (PEFT LoRA), in the product's backward pass."""
    model = plain_model(model_dir, quantization, device)
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    if kind == "floor":
        model.enable_input_require_grads()
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                 target_modules=list(LLAMA_PROJECTIONS)))
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = tokenize_examples(tokenizer, load_examples(data), shape.seq)[: shape.batch]
    autocast = autocast_for(device)

    def step() -> None:
        batch = collate(examples, tokenizer.pad_token_id)  # per step, as the product's step does
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss, _, _ = backward_pass(model, [batch], autocast, device)
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            float(loss)
            optimizer.step()
        else:
            float(loss)

    return step, sum(p.numel() for p in params)


def method_steps(model_dir: Path, data: Path, shape: Shape, device: torch.device,
                 r: int) -> dict[str, Callable[[], tuple[Callable[[], object], int]]]:
    """Every row of a shape: its name -> a builder of (step, trainable parameters)."""
    plan: dict[str, Callable[[], tuple[Callable[[], object], int]]] = {
        "floor": lambda: baseline_step(model_dir, data, shape, "floor", "none", device, r),
        "sbora_fa": lambda: ours_step(model_dir, data, shape, "sbora_fa", "none", device, r),
        "sbora_fb": lambda: ours_step(model_dir, data, shape, "sbora_fb", "none", device, r),
        "lora": lambda: ours_step(model_dir, data, shape, "lora", "none", device, r),
        "peft_lora": lambda: baseline_step(model_dir, data, shape, "peft", "none", device, r),
        "qsbora_fa": lambda: ours_step(model_dir, data, shape, "sbora_fa", "nf4", device, r),
        "peft_qlora": lambda: baseline_step(model_dir, data, shape, "peft", "nf4", device, r),
    }
    if shape.name in ("8b", "tiny-b"):
        small = replace(shape, batch=4 if shape.name == "8b" else 2, seq=512 if shape.name == "8b" else 32)
        plan["qsbora_fa_checkpointed"] = lambda: ours_step(model_dir, data, small, "sbora_fa", "nf4", device, r,
                                                           checkpointing=True)
    return plan


def measure_shape(shape: Shape, device: torch.device, args: argparse.Namespace,
                  rows: dict[str, dict[str, Any]], save: Callable[[], None]) -> None:
    """Fill `rows` method by method, saving after each: a later failure or timeout keeps what was measured.
    A method that fails gets its error recorded and the others still run."""
    wanted = args.methods_8b if shape.name == "8b" and args.methods_8b else args.methods
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        model_dir = build_model_dir(shape, Path(scratch) / "model", default_dtype(device), device)
        data = write_dataset(Path(scratch) / "data.jsonl", shape, records=4 * shape.batch)
        for key, build in method_steps(model_dir, data, shape, device, args.r).items():
            if wanted and key not in wanted:
                continue
            print(f"  {shape.name} {key} ...", file=sys.stderr, flush=True)
            reset_peak(device)
            try:
                step, trainable = build()
                seconds = timed(step, device, args.warmup, args.steps)
                rows[key] = {"step_s": seconds, "peak_gib": peak_gib(device), "trainable": trainable}
            except Exception as exc:  # noqa: BLE001 - one method's failure is a result too
                rows[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            step = None  # type: ignore[assignment]  # the method's model goes with its step
            free_memory()
            print(f"    {rows[key]}", file=sys.stderr, flush=True)
            save()


def ratios_of(by_shape: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    def ratio(shape: str, a: str, b: str, what: str = "step_s") -> float | None:
        rows = by_shape.get(shape, {})
        if rows.get(a, {}).get(what) and rows.get(b, {}).get(what):
            return round(rows[a][what] / rows[b][what], 3)
        return None

    out: dict[str, float] = {}
    for shape in by_shape:
        for key, value in (
            (f"fa_step_vs_floor_bf16_{shape}", ratio(shape, "sbora_fa", "floor")),
            (f"fb_step_vs_floor_bf16_{shape}", ratio(shape, "sbora_fb", "floor")),
            (f"fa_step_vs_peft_lora_bf16_{shape}", ratio(shape, "sbora_fa", "peft_lora")),
            (f"fa_mem_vs_peft_lora_bf16_{shape}", ratio(shape, "sbora_fa", "peft_lora", "peak_gib")),
            (f"qsbora_fa_step_vs_qlora_{shape}", ratio(shape, "qsbora_fa", "peft_qlora")),
            (f"qsbora_fa_mem_vs_qlora_{shape}", ratio(shape, "qsbora_fa", "peft_qlora", "peak_gib")),
        ):
            if value is not None:
                out[key] = value
    # The headline keys: the worst shape for the floor ratios, the 1B shape for the comparisons.
    for key in ("fa_step_vs_floor_bf16", "fb_step_vs_floor_bf16"):
        values = [v for k, v in out.items() if k.startswith(key + "_")]
        if values:
            out[key] = max(values)
    first = next(iter(by_shape), None)
    for key in ("fa_step_vs_peft_lora_bf16", "fa_mem_vs_peft_lora_bf16", "qsbora_fa_step_vs_qlora",
                "qsbora_fa_mem_vs_qlora"):
        if first and f"{key}_{first}" in out:
            out[key] = out[f"{key}_{first}"]
    for shape, rows in by_shape.items():
        checkpointed = rows.get("qsbora_fa_checkpointed", {}).get("peak_gib")
        if checkpointed is not None:
            out[f"qsbora_fa_{shape}_peak_gib"] = round(checkpointed, 2)
    return out


def versions() -> dict[str, Any]:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script works")
    parser.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=[], help="only these rows (default: all)")
    parser.add_argument("--methods-8b", nargs="+", default=[],
                        help="only these rows at the 8B shape (default: --methods)")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--scratch", type=Path, default=None, help="where the config-built models are saved")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_train.json")
    args = parser.parse_args()

    if args.smoke:
        device, shapes = torch.device("cpu"), SMOKE_SHAPES
        args.warmup, args.steps, args.r = 1, 2, 4
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU: run on a GPU machine, or --smoke to check the script on the CPU")
        device, shapes = torch.device("cuda"), SHAPES
    by_shape: dict[str, dict[str, dict[str, Any]]] = {}
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "smoke": args.smoke,
        "versions": versions(),
        "settings": {"r": args.r, "alpha": 2 * args.r, "dropout": 0.0, "targets": LLAMA_PROJECTIONS,
                     "warmup_steps": args.warmup, "timed_steps": args.steps,
                     "shapes": {s.name: vars(s) for s in (shapes[n] for n in args.shapes)}},
        "targets": TARGETS,
        "ratios": {},
        "rows": by_shape,
    }

    def save() -> None:
        report["ratios"] = ratios_of(by_shape)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))

    for name in args.shapes:
        print(f"{shapes[name].name}:", file=sys.stderr, flush=True)
        by_shape[shapes[name].name] = {}
        measure_shape(shapes[name], device, args, by_shape[shapes[name].name], save)
    save()
    print("| shape | method | step (s) | peak (GiB) | trainable |\n|---|---|---:|---:|---:|")
    for shape, rows in by_shape.items():
        for key, row in rows.items():
            if "error" in row:
                print(f"| {shape} | {key} | failed: {row['error'][:80]} | | |")
                continue
            peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
            print(f"| {shape} | {key} | {row['step_s']:.4f} | {peak} | {row['trainable']:,} |")
    print(f"\nratios: {json.dumps(report['ratios'])}\nwrote {args.out}")


if __name__ == "__main__":
    main()
