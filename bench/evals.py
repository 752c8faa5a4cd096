"""Evaluations: batched scoring against one item at a time, the service against the library, and
lm-evaluation-harness against the service, on the default model, in one run.

- `mc_items_per_s_vs_one_at_a_time`: multiple-choice items per second of the harness's batched
  scoring (an item's choices share one row after the context, rows of several items per forward)
  against one item at a time, each choice in its own forward pass (what a loop over requests
  does); the same items, checked to pick the same choices;
- `service_vs_library_wall`: an evaluation of --items items through the API (POST /evaluations, a
  worker process loads the model, scores and stores every item; until GET says succeeded) against
  the library call on this machine (load the model, read the items, `harness.evaluate`), with the
  same torch threads;
- `lm_eval_vs_service_accuracy_diff`: lm-evaluation-harness's `local-completions` model scoring the
  same items through /v1/completions (echo + logprobs) against the service's own evaluation:
  the difference in accuracy, in points (acc and acc_norm; the larger).

Items: ARC-Easy test questions from ../shared/data (a fixed random subset, seed 0), written as
`{"question", "choices", "answer"}` records, the file both the service and lm-eval read.

    nice -n 10 .venv/bin/python bench/evals.py              # 300 items; about 25 min on 2 CPU cores
    nice -n 10 .venv/bin/python bench/evals.py --items 60 --speed-items 24   # a quick look

Writes bench/results/evals.json (top-level `ratios`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import serve_default_model  # noqa: E402

from sbora_core.method.models import DEFAULT_MODEL, load_base_model, resolve_model  # noqa: E402
from sbora_core.training.eval_items import read_eval_items  # noqa: E402
from sbora_core.training.harness import Candidate, EvalSpec, evaluate  # noqa: E402
from sbora_core.training.scoring import score_multiple_choice  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARGETS = {"mc_items_per_s_vs_one_at_a_time": (">=", 4.0), "service_vs_library_wall": ("<=", 1.15),
           "lm_eval_vs_service_accuracy_diff": ("==", 0.0)}


def write_items(source: Path, n: int, out: Path) -> Path:
    """The first n of a fixed random order of the task's items, as explicit multiple-choice records."""
    items = read_eval_items(source, "multiple_choice", limit=n, seed=0)
    out.write_text("".join(json.dumps({"question": (i.context or "").removeprefix("Question: ").removesuffix("\nAnswer:"),
                                       "choices": i.choices, "answer": i.gold}) + "\n" for i in items))
    return out


def scoring_speed(model, tokenizer, items, rounds: int) -> dict:
    """Items/s batched against one item at a time (each choice its own forward), interleaved rounds."""
    batched_s, single_s = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        batched = score_multiple_choice(model, tokenizer, items, batch_size=16)
        batched_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        single = [score_multiple_choice(model, tokenizer, [item], batch_size=1, share_context=False)[0]
                  for item in items]
        single_s.append(time.perf_counter() - start)
    same_picks = all(a.output["choice"] == b.output["choice"] and a.output["choice_norm"] == b.output["choice_norm"]
                     for a, b in zip(batched, single, strict=True))
    gap = max(abs(x - y) for a, b in zip(batched, single, strict=True)
              for x, y in zip(a.output["logprobs"], b.output["logprobs"], strict=True))
    b, s = statistics.median(batched_s), statistics.median(single_s)
    return {"items": len(items), "batched_s": batched_s, "one_at_a_time_s": single_s,
            "batched_items_per_s": len(items) / b, "one_at_a_time_items_per_s": len(items) / s,
            "same_choices": same_picks, "max_logprob_gap": gap, "ratio": s / b}


def library_run(path: Path, threads: int) -> tuple[float, dict]:
    """What `sbora eval` does: load the model, read the items, score them; (seconds, summary)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    base = load_base_model(DEFAULT_MODEL)
    items = read_eval_items(path, "multiple_choice")
    summary, _ = evaluate(base.model, base.tokenizer, items, EvalSpec(), [Candidate(DEFAULT_MODEL)], base.fingerprint)
    return time.perf_counter() - start, summary


def service_run(url: str, key: str, path: Path) -> tuple[float, dict]:
    """Upload the items, then POST /evaluations until it succeeded; (seconds from the POST, evaluation)."""
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=auth, timeout=120) as client:
        upload = client.post("/datasets", files={"file": (path.name, path.read_bytes())})
        upload.raise_for_status()
        start = time.perf_counter()
        created = client.post("/evaluations", json={"dataset_id": upload.json()["id"], "grader": "multiple_choice",
                                                    "candidates": [DEFAULT_MODEL]})
        created.raise_for_status()
        while True:
            evaluation = client.get(f"/evaluations/{created.json()['id']}").json()
            if evaluation["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if evaluation["status"] != "succeeded":
        raise SystemExit(f"the service's evaluation {evaluation['status']}: {evaluation['error']}")
    return wall, evaluation


def lm_eval_run(url: str, key: str, path: Path, work: Path) -> tuple[float, dict]:
    """lm-evaluation-harness's local-completions model on the same items through /v1/completions."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    (work / "sbora_arc.yaml").write_text(
        "task: sbora_arc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {path}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    os.environ["OPENAI_API_KEY"] = key
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    start = time.perf_counter()
    results = simple_evaluate(
        model="local-completions",
        model_args={"model": DEFAULT_MODEL, "base_url": f"{url}/v1/completions",
                    "tokenizer": str(resolve_model(DEFAULT_MODEL)), "tokenizer_backend": "huggingface",
                    "batch_size": 16, "max_retries": 1, "timeout": 600},
        tasks=["sbora_arc"], task_manager=TaskManager(include_path=str(work)), log_samples=False)
    return time.perf_counter() - start, results["results"]["sbora_arc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=300, help="items of the service, library and lm-eval runs")
    parser.add_argument("--speed-items", type=int, default=48, help="items of the scoring-speed comparison")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the scoring-speed comparison")
    parser.add_argument("--task", type=Path, default=DATA / "commonsense" / "arc-easy_test.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "evals.json")
    args = parser.parse_args()

    from app.core.config import Settings

    threads = Settings().resolved_torch_threads  # what a worker uses: the library gets the same
    device = f"CPU ({platform.processor() or platform.machine()}, {threads} torch threads)"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = write_items(args.task, args.items, work / "arc-easy.jsonl")
        print(f"{args.items} ARC-Easy items; {device}", flush=True)

        torch.set_num_threads(threads)
        base = load_base_model(DEFAULT_MODEL)
        speed_items = read_eval_items(path, "multiple_choice")[: args.speed_items]
        speed = scoring_speed(base.model, base.tokenizer, speed_items, args.rounds)
        print(f"scoring: {speed['batched_items_per_s']:.2f} items/s batched, "
              f"{speed['one_at_a_time_items_per_s']:.2f} one at a time (x{speed['ratio']:.1f})", flush=True)
        del base

        library_s, library = library_run(path, threads)
        print(f"library: {library_s:.1f} s", flush=True)
        os.environ["SBORA_ENGINE_WARM_START"] = "0"  # the engine loads only for lm-eval's requests, after
        with serve_default_model() as (url, key):
            from sbora_cli.server import worker_command_line

            worker = subprocess.Popen(worker_command_line(name="bench-evals"), env=dict(os.environ),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                # A running service has its workers up: time the evaluation, not the worker's start.
                deadline = time.monotonic() + 300
                while httpx.get(f"{url}/readyz").status_code != 200:
                    if time.monotonic() > deadline or worker.poll() is not None:
                        raise SystemExit("the worker did not come up")
                    time.sleep(0.5)
                service_s, evaluation = service_run(url, key, path)
                print(f"service: {service_s:.1f} s", flush=True)
                lm_eval_s, lm_eval = lm_eval_run(url, key, path, work)
                print(f"lm-eval: {lm_eval_s:.1f} s", flush=True)
            finally:
                worker.terminate()
                worker.wait(timeout=60)

    own = evaluation["result"]["candidates"][0]["metrics"]
    diffs = {"acc": 100 * abs(lm_eval["acc,none"] - own["accuracy"]["value"]),
             "acc_norm": 100 * abs(lm_eval["acc_norm,none"] - own["accuracy_norm"]["value"])}
    ratios = {"mc_items_per_s_vs_one_at_a_time": round(speed["ratio"], 2),
              "service_vs_library_wall": round(service_s / library_s, 3),
              "lm_eval_vs_service_accuracy_diff": round(max(diffs.values()), 4)}
    report = {
        "device": device, "model": DEFAULT_MODEL, "items": args.items, "targets": {k: f"{op} {v}" for k, (op, v) in
                                                                                      TARGETS.items()},
        "ratios": ratios,
        "scoring_speed": speed,
        "service_vs_library": {"library_s": library_s, "service_s": service_s,
                               "same_result": library["candidates"][0]["metrics"] == own,
                               "library_metrics": library["candidates"][0]["metrics"], "service_metrics": own},
        "lm_eval": {"wall_s": lm_eval_s, "acc": lm_eval["acc,none"], "acc_norm": lm_eval["acc_norm,none"],
                    "service_accuracy": own["accuracy"]["value"], "service_accuracy_norm": own["accuracy_norm"]["value"],
                    "diff_points": diffs},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"ratios: {json.dumps(ratios)}\nwrote {args.out}")


if __name__ == "__main__":
    main()
