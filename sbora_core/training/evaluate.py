"""Evaluation: validation loss, multiple-choice accuracy and arithmetic accuracy.

Task files are the instruction-format sets in `../shared/data` (`instruction`,
`input`, `output`, `answer`). Multiple-choice items (answers `answerN`,
`solutionN`, `optionN`, `true`/`false`) are scored by log-likelihood, under one
of two protocols:
- `label`: the full training target (`the correct answer is answer2`) after
  the chat-rendered instruction, as the adapter was trained;
- `option_text`: the mean log-likelihood of each option's own text after
  `Question: ...\\nAnswer:` (the usual protocol for small models).
Arithmetic items are answered by greedy generation; the last number in the
answer is compared with `answer` numerically.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sbora_core.training.tokenization import IGNORE_INDEX, TokenizedExample, collate, render_chat

ProgressFn = Callable[[int, int], None]
PROTOCOLS = ("label", "option_text")
_OPTION = re.compile(r"\b(Answer|Solution|Option)(\d+):\s*")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


@torch.no_grad()
def validation_loss(model, examples: list[TokenizedExample], batch_size: int, pad_id: int,
                    progress: ProgressFn | None = None) -> float:
    """Mean next-token loss over every target token of `examples` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start, chunk in _batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:].reshape(-1)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels,
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
        if progress:
            progress(start + len(chunk), len(examples))
    model.train(was_training)
    return total / max(1, count)


# -- task files --------------------------------------------------------------------------------
@dataclass
class TaskItem:
    prompt: str  # the instruction (and input), as in training
    answer: str  # gold label: "answer2", "true", "4.0", ...
    question: str | None = None  # multiple choice: the bare question
    options: dict[str, str] | None = None  # multiple choice: label -> option text


def parse_choices(instruction: str) -> tuple[str, dict[str, str]]:
    """The question and its labelled options, from the data's instruction text."""
    head, _, tail = instruction.partition("\n\n")
    question = head.split(": ", 1)[1] if ": " in head else head
    tail = tail.split("Answer format:")[0]
    parts = _OPTION.split(tail)  # ['', 'Answer', '1', 'text', 'Answer', '2', 'text', ...]
    options = {parts[i].lower() + parts[i + 1]: parts[i + 2].strip() for i in range(1, len(parts) - 2, 3)}
    if not options and "true or false" in instruction.lower():
        options = {"true": "true", "false": "false"}
    return question.strip(), options


def load_task(path: str | Path, limit: int | None = None, seed: int = 0) -> tuple[str, list[TaskItem]]:
    """(kind, items) for a task file; `limit` takes a fixed random subset."""
    records = json.loads(Path(path).read_text())
    if limit is not None and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    items = []
    for r in records:
        prompt = r["instruction"] if not r.get("input") else f"{r['instruction']}\n\n{r['input']}"
        items.append(TaskItem(prompt=prompt, answer=str(r["answer"]).strip()))
    kind = "arithmetic" if all(_is_number(i.answer) for i in items) else "multiple_choice"
    if kind == "multiple_choice":
        for item in items:
            item.question, item.options = parse_choices(item.prompt)
            if item.answer not in item.options:
                raise ValueError(f"{path}: answer {item.answer!r} is not among the parsed options {list(item.options)}")
    return kind, items


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def extract_last_number(text: str) -> float | None:
    """The last number in a generated answer ("... The answer is 1,234.5." -> 1234.5)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


# -- scoring -----------------------------------------------------------------------------------
@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8,
                          progress: ProgressFn | None = None) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each continuation given its context."""
    device = next(model.parameters()).device
    encoded = []
    for context, continuation in pairs:
        ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        encoded.append((ctx, cont))
    results: list[tuple[float, int]] = []
    pad = tokenizer.pad_token_id
    for start, chunk in _batches(encoded, batch_size):
        longest = max(len(c) + len(k) for c, k in chunk)
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (c, k) in enumerate(chunk):
            ids[row, : len(c) + len(k)] = torch.tensor(c + k)
            mask[row, : len(c) + len(k)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, (c, k) in enumerate(chunk):
            positions = torch.arange(len(c) - 1, len(c) + len(k) - 1, device=device)  # predict k from one step before
            targets = torch.tensor(k, device=device)
            results.append((float(logprobs[row, positions, targets].sum()), len(k)))
        if progress:
            progress(start + len(chunk), len(encoded))
    return results


def _chat_prompt(tokenizer, text: str) -> str:
    return render_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


def evaluate_multiple_choice(model, tokenizer, items: list[TaskItem], protocol: str = "option_text",
                             batch_size: int = 8, progress: ProgressFn | None = None) -> list[bool]:
    """Whether the highest-scoring option of each item is the gold one."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: must be one of {', '.join(PROTOCOLS)}")
    pairs, owners = [], []
    for n, item in enumerate(items):
        assert item.options is not None
        for label, text in item.options.items():
            if protocol == "label":
                pairs.append((_chat_prompt(tokenizer, item.prompt), f"the correct answer is {label}"))
            else:
                pairs.append((f"Question: {item.question}\nAnswer:", f" {text}"))
            owners.append((n, label))
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size, progress)
    best: dict[int, tuple[float, str]] = {}
    for (n, label), (total, count) in zip(owners, scores, strict=True):
        score = total if protocol == "label" else total / max(1, count)
        if n not in best or score > best[n][0]:
            best[n] = (score, label)
    return [best[n][1] == item.answer for n, item in enumerate(items)]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8,
                     progress: ProgressFn | None = None) -> list[str]:
    """Greedy answers to chat-rendered prompts, batched with left padding."""
    device = next(model.parameters()).device
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start, chunk in _batches(prompts, batch_size):
            texts = [_chat_prompt(tokenizer, p) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
            if progress:
                progress(start + len(chunk), len(prompts))
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate_arithmetic(model, tokenizer, items: list[TaskItem], max_new_tokens: int = 256,
                        batch_size: int = 8, progress: ProgressFn | None = None) -> list[bool]:
    answers = generate_answers(model, tokenizer, [i.prompt for i in items], max_new_tokens, batch_size, progress)
    correct = []
    for item, text in zip(items, answers, strict=True):
        value = extract_last_number(text)
        gold = float(item.answer)
        correct.append(value is not None and math.isclose(value, gold, rel_tol=1e-4, abs_tol=1e-4))
    return correct


def evaluate_file(model, tokenizer, path: str | Path, *, protocol: str = "option_text", limit: int | None = None,
                  seed: int = 0, batch_size: int = 8, max_new_tokens: int = 256,
                  progress: ProgressFn | None = None) -> dict[str, Any]:
    """Accuracy of `model` on a task file, with the per-item outcomes for confidence intervals."""
    kind, items = load_task(path, limit, seed)
    model.eval()
    if kind == "arithmetic":
        correct = evaluate_arithmetic(model, tokenizer, items, max_new_tokens, batch_size, progress)
        used = "generate_last_number"
    else:
        correct = evaluate_multiple_choice(model, tokenizer, items, protocol, batch_size, progress)
        used = protocol
    return {
        "task": Path(path).stem,
        "kind": kind,
        "protocol": used,
        "items": len(items),
        "correct": sum(correct),
        "accuracy": sum(correct) / max(1, len(items)),
        "outcomes": correct,
    }
