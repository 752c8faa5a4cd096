"""Validation while training (loss and token accuracy), and task files scored through the harness.

`evaluate_file` is what `sbora eval` and the quality benchmarks call on the SBoRA paper's task
files (`instruction`, `input`, `output`, `answer`): multiple-choice sets by the log-likelihood of
each option, arithmetic sets by the last number of a greedy answer. It runs the same harness as
the service's evaluation jobs (`harness.run_evaluation`); there is no second scorer.
Multiple-choice protocols:
- `option_text`: each option's own text after `Question: ...\\nAnswer:`, by its mean
  log-likelihood per token (the usual protocol for small models);
- `label`: the full training target (`the correct answer is answer2`) after the chat-rendered
  instruction, as the adapter was trained, by its summed log-likelihood.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sbora_core.training.eval_items import (  # noqa: F401  (re-exported: the names callers import)
    PROTOCOLS,
    EvalItem,
    extract_last_number,
    load_task,
    parse_choices,
)
from sbora_core.training.harness import Candidate, EvalSpec, ResultSink, run_evaluation
from sbora_core.training.scoring import ItemResult
from sbora_core.training.scoring import generate_answers as _generate
from sbora_core.training.tokenization import IGNORE_INDEX, TokenizedExample, collate

ProgressFn = Callable[[int, int], None]


@torch.no_grad()
def validation_metrics(model, examples: list[TokenizedExample], batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean next-token loss and token accuracy (argmax = target) over every target token of
    `examples`, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start: start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:].reshape(-1)  # (B*(T-1),)
        flat = logits.reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
        total += torch.nn.functional.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        targets = labels != IGNORE_INDEX
        correct += int(((flat.argmax(-1) == labels) & targets).sum())
        count += int(targets.sum())
    model.train(was_training)
    return {"loss": total / max(1, count), "mean_token_accuracy": correct / max(1, count)}


def validation_loss(model, examples: list[TokenizedExample], batch_size: int, pad_id: int) -> float:
    """Mean next-token loss over every target token of `examples` (eval mode, no dropout)."""
    return validation_metrics(model, examples, batch_size, pad_id)["loss"]


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers to chat-rendered prompts, batched with left padding."""
    return [text for text, _, _ in _generate(model, tokenizer, prompts, max_new_tokens, batch_size)]


class _Progress(ResultSink):
    def __init__(self, progress: ProgressFn | None) -> None:
        self.results: list[ItemResult] = []
        self.callback = progress

    def scored(self, candidate: int) -> int:
        return len(self.results)

    def store(self, candidate: int, results: list[ItemResult]) -> None:
        self.results.extend(results)

    def progress(self, done: int, total: int) -> None:
        if self.callback:
            self.callback(done, total)


def evaluate_file(model, tokenizer, path: str | Path, *, protocol: str = "option_text", limit: int | None = None,
                  seed: int = 0, batch_size: int = 8, max_new_tokens: int = 256,
                  progress: ProgressFn | None = None) -> dict[str, Any]:
    """Accuracy of `model` on a task file, with the per-item outcomes for confidence intervals."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: must be one of {', '.join(PROTOCOLS)}")
    kind, items = load_task(path, limit, seed, protocol)
    grader = "exact_match" if kind == "arithmetic" else "multiple_choice"
    spec = EvalSpec(grader=grader, protocol=protocol, length_unit="tokens", max_new_tokens=max_new_tokens,
                    batch_size=batch_size, limit=limit, seed=seed)
    sink = _Progress(progress)
    run_evaluation(model, tokenizer, None, [Candidate("model")], items, spec, sink)
    # option_text: the mean log-likelihood per token; label: the summed one (the trained target).
    metric = "accuracy_norm" if grader == "multiple_choice" and protocol == "option_text" else "accuracy"
    correct = [bool(r.values[metric][0]) for r in sink.results]
    return {
        "task": Path(path).stem,
        "kind": kind,
        "protocol": "generate_last_number" if kind == "arithmetic" else protocol,
        "items": len(items),
        "correct": sum(correct),
        "accuracy": sum(correct) / max(1, len(items)),
        "outcomes": correct,
    }

