"""Jobs on several ranks: throughput against one process, and what one rank holds of a 70B base.

    .venv/bin/python bench/distributed.py           # CPU: DDP throughput and the 70B measurement on paper
    .venv/bin/python bench/distributed.py --gpu     # a machine with several GPUs: tokens/s on 1..N ranks

CPU mode writes bench/results/distributed.json, with `ratios`:
- `ddp2_vs_single_throughput` (>= 0.85): tokens/s of the default model's job on 2 gloo ranks
  (one torch thread each) over the same job in one process with two threads, same global batch;
  the two alternate, round after round, so drift in machine speed hits both alike;
- `fsdp_70b_nf4_per_rank_gib_2ranks` (<= 19): a 70B-shaped LLaMA (Llama-2-70B's shapes: 80
  layers, hidden 8192, MLP 28672, 64/8 heads, vocab 32000) with an NF4 base stored as the
  sharded ranks load it (bf16 storage, double-quantised statistics), built on the meta device
  and sharded by the training code (`distributed.shard_frozen_base`) over 2, 4 and 8 ranks of a
  fake process group. A rank holds its shard of the frozen base, the quantisation statistics
  whole (no parameter: FSDP does not shard them) and the factors whole; the figure is their sum.
  Gradients and AdamW state of the factors (3x the factors) are reported beside it.

GPU mode writes bench/results/distributed_gpu.json: tokens/s of the same job on 1, 2, 4 ... N
GPUs (NCCL), the GPUs' names, and `ratios` `scaling_efficiency_Nranks` = tokens/s on N over N
times one GPU's. GPU figures come from GPUs only: this mode refuses to run without them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense" / "arc-easy_train.json"
TARGETS = {"ddp2_vs_single_throughput": (">=", 0.85), "fsdp_70b_nf4_per_rank_gib_2ranks": ("<=", 19.0)}
LLAMA2_70B: dict[str, Any] = {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False}
GIB = 2**30


# -- on paper: a 70B base on the meta device --------------------------------------------------------
def quant_state_bytes(state: Any) -> int:
    """Bytes bitsandbytes keeps beside a 4-bit weight: block maxima (quantised too) and code tables."""
    tensors = [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors)


def nf4_statistics_bytes(d_out: int, d_in: int) -> int:
    """`quant_state_bytes` of a (d_out, d_in) double-quantised NF4 weight (blocks of 64, nested per 256)."""
    blocks = -(-d_out * d_in // 64)
    return blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4


def check_statistics_formula() -> None:
    """The formula against bitsandbytes itself on a real weight."""
    import bitsandbytes.functional as bnbf

    weight = torch.randn(1024, 2048, dtype=torch.bfloat16)
    _, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.bfloat16)
    assert quant_state_bytes(state) == nf4_statistics_bytes(1024, 2048), quant_state_bytes(state)


def meta_nf4_linear(linear: torch.nn.Linear) -> torch.nn.Module:
    """A bitsandbytes NF4 layer on the meta device, its weight packed as `load_base_model(shardable=True)` stores it."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16, device="meta")
    packed = torch.empty(linear.out_features * linear.in_features // 4, 1, dtype=torch.bfloat16, device="meta")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16,
                                     bnb_quantized=True, module=layer)
    return layer


def paper_child(world_size: int, r: int) -> dict[str, Any]:
    """One world size, in a process of its own: build, shard, count."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaConfig, LlamaForCausalLM

    from sbora_core.method.config import SBoRAConfig
    from sbora_core.method.inject import inject_adapter
    from sbora_core.training.distributed import LossModule, parameter_bytes, shard_frozen_base

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_70B))
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())  # before packing: the model's own count
    statistics_bytes = 0
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, meta_nf4_linear(child))
                    statistics_bytes += nf4_statistics_bytes(child.out_features, child.in_features)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    inject_adapter(model, SBoRAConfig(variant="sbora_fa", r=r, alpha=2 * r), fast_path=False)
    factors = [p for p in model.parameters() if p.requires_grad]
    shard_frozen_base(LossModule(model, lambda m, b: (torch.zeros(()), torch.zeros(()))), model,
                      DeviceMesh.from_group(dist.distributed_c10d._get_default_group(), "cpu"), factors)
    held = parameter_bytes(model)
    per_rank = held["frozen"] + statistics_bytes + held["trainable"]
    return {"ranks": world_size, "frozen_base_whole_gib": whole / GIB, "frozen_base_shard_gib": held["frozen"] / GIB,
            "nf4_statistics_gib": statistics_bytes / GIB, "trainable_gib": held["trainable"] / GIB,
            "per_rank_gib": per_rank / GIB, "factor_grads_and_adamw_gib": 3 * held["trainable"] / GIB,
            "params_billion": params / 1e9}


def on_paper(r: int) -> list[dict[str, Any]]:
    check_statistics_formula()
    rows = []
    for world_size in (2, 4, 8):
        out = subprocess.run([sys.executable, __file__, "--paper-child", str(world_size), "--r", str(r)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"70B NF4 on {world_size} ranks: {rows[-1]['per_rank_gib']:.2f} GiB per rank "
              f"({rows[-1]['frozen_base_shard_gib']:.2f} base shard + {rows[-1]['nf4_statistics_gib']:.2f} "
              f"statistics + {rows[-1]['trainable_gib']:.2f} factors)", flush=True)
    return rows


# -- measured: tokens/s of one job on 1 and on N ranks -----------------------------------------------
def make_job(out: Path, model: str, devices: int, steps: int, batch: int, seq: int) -> Any:
    from sbora_core.method.config import SBoRAConfig
    from sbora_core.training.job import Hyperparameters, Resources, TrainJob

    return TrainJob(base_model=model, train_file=str(DATA), output_dir=str(out),
                    sbora=SBoRAConfig(variant="sbora_fa", r=32, alpha=64, dropout=0.0),
                    hyperparameters=Hyperparameters(max_steps=steps, batch_size=batch, max_seq_len=seq,
                                                    checkpoint_every=None, learning_rate=1e-4, seed=0),
                    resources=Resources(devices=devices))


def measure(model: str, devices: int, threads: int, steps: int, batch: int, seq: int) -> dict[str, Any]:
    """Tokens/s over every step but the first (which pays for warming up), from rank 0's progress."""
    from sbora_core.training.launch import LaunchSettings, train_on_ranks
    from sbora_core.training.train import Callbacks, train

    progress: list[Any] = []

    class Record(Callbacks):
        def on_progress(self, p: Any) -> None:
            progress.append(p)

    with tempfile.TemporaryDirectory() as tmp:
        job = make_job(Path(tmp) / "out", model, devices, steps, batch, seq)
        if devices == 1:
            torch.set_num_threads(threads)
            train(job, Record())
        else:
            train_on_ranks(job, Record(), Path(tmp) / "run", LaunchSettings(devices=devices,
                                                                            threads_per_rank=threads))
    first, last = progress[0], progress[-1]
    tps = (last.tokens - first.tokens) / (last.elapsed_s - first.elapsed_s)
    step_s = (last.elapsed_s - first.elapsed_s) / (last.step - first.step)
    return {"devices": devices, "threads_per_rank": threads, "tokens_per_s": tps, "step_s": step_s}


def cpu_throughput(model: str, rounds: int, steps: int, batch: int, seq: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "ddp2": []}
    for i in range(rounds):
        for name, devices, threads in (("single", 1, 2), ("ddp2", 2, 1)):
            runs[name].append(measure(model, devices, threads, steps, batch, seq))
            print(f"round {i + 1} {name}: {runs[name][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    median = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    return {"runs": runs, "median_tokens_per_s": median, "ratio": median["ddp2"] / median["single"]}


def gpu_scaling(model: str, steps: int, batch: int, seq: int) -> dict[str, Any]:
    count = torch.cuda.device_count()
    sizes = [n for n in (1, 2, 4, 8, 16) if n <= count]
    runs = [measure(model, n, 4, steps, batch, seq) for n in sizes]
    base = runs[0]["tokens_per_s"]
    return {"gpus": [torch.cuda.get_device_name(i) for i in range(count)], "runs": runs,
            "ratios": {f"scaling_efficiency_{r['devices']}ranks": r["tokens_per_s"] / (r["devices"] * base)
                       for r in runs[1:]}}


def verdicts(ratios: dict[str, float]) -> dict[str, str]:
    out = {}
    for key, value in ratios.items():
        op, bound = TARGETS[key]
        out[key] = "met" if (value >= bound if op == ">=" else value <= bound) else "missed"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="tokens/s on 1..N GPUs (needs CUDA GPUs)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="global batch (examples per step)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=32, help="rank of the 70B measurement's adapter")
    parser.add_argument("--paper-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paper_child:
        print(json.dumps(paper_child(args.paper_child, args.r)))
        return
    from sbora_core.method.models import resolve_model

    model = str(resolve_model(args.model))
    setup = {"model": args.model, "global_batch": args.batch, "seq": args.seq, "steps": args.steps,
             "variant": "sbora_fa", "r": 32, "torch": torch.__version__,
             "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available"}
    if args.gpu:
        if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
            sys.exit("--gpu needs at least two CUDA GPUs; GPU figures are measured on GPUs, never estimated")
        result = {"setup": setup, **gpu_scaling(model, args.steps, args.batch, args.seq)}
        path = RESULTS / "distributed_gpu.json"
    else:
        cpu = cpu_throughput(model, args.rounds, args.steps, args.batch, args.seq)
        paper = on_paper(args.r)
        ratios = {"ddp2_vs_single_throughput": cpu["ratio"],
                  "fsdp_70b_nf4_per_rank_gib_2ranks": next(p["per_rank_gib"] for p in paper if p["ranks"] == 2)}
        result = {"setup": {**setup, "rounds": args.rounds, "seventy_b": LLAMA2_70B, "seventy_b_r": args.r},
                  "ratios": ratios, "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
                  "verdicts": verdicts(ratios), "cpu_throughput": cpu, "seventy_b_nf4": paper}
        path = RESULTS / "distributed.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("ratios"), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
