"""The graders: per-item scores of one model on a list of items, batched.

- `multiple_choice`: the log-likelihood of each choice after the context, encoded as
  lm-evaluation-harness encodes it (the context's trailing spaces move to the continuation; the
  whole text is encoded and split at the context's own length). `accuracy` takes the choice with
  the highest sum, `accuracy_norm` the highest sum per unit of length (characters, as lm-eval's
  `acc_norm`, or tokens). On LLaMA-like families an item's choices share one row: the context once,
  then every choice, each attending to the context and itself (a 4-D mask), so the context is read
  once per item instead of once per choice, and logits are made only where a choice's tokens are
  predicted.
- `exact_match`: greedy generation after the chat-rendered prompt; numbers compare numerically
  (the last number of the answer), other answers after case, space and final-stop normalisation.
- `loss`: mean next-token loss and token accuracy over each record's targets (token-weighted).

Each item's result carries, per metric, a numerator and a denominator, so a metric over any set of
items (a bootstrap resample, say) is a ratio of sums.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sbora_core.training.eval_items import EvalItem, chat_prompt, extract_last_number, is_number
from sbora_core.training.tokenization import IGNORE_INDEX, collate, tokenize_example

METRICS = {"multiple_choice": ("accuracy", "accuracy_norm"), "exact_match": ("accuracy",),
           "loss": ("loss", "token_accuracy")}
LENGTH_UNITS = ("chars", "tokens")
# Families whose logits are exactly lm_head(last hidden state) and whose attention takes a custom
# 4-D mask: their choices share the context's row. Others read one row per choice.
SHARED_CONTEXT_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class ItemResult:
    index: int
    correct: bool | None  # None where the grader has no right or wrong (loss)
    values: dict[str, tuple[float, float]]  # metric -> (numerator, denominator)
    output: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0  # tokens read (and generated) to score it


def _device(model) -> torch.device:
    return next(model.parameters()).device


# -- multiple choice ---------------------------------------------------------------------------
def encode_choices(tokenizer, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context and of each continuation, as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    moved = context[len(context) - spaces:] if spaces else ""
    context = context[: len(context) - spaces]
    ctx = tokenizer(context)["input_ids"]
    return ctx, [tokenizer(context + moved + c)["input_ids"][len(ctx):] for c in continuations]


@dataclass
class _Row:
    """One forward row: a context then continuations, each continuation seeing the context and itself."""

    ids: list[int]
    positions: list[int]
    segment: list[int]  # -1: the context; k: continuation k
    targets: list[list[tuple[int, int]]]  # per continuation: (row index predicting it, token id)


def _row(ctx: list[int], conts: list[list[int]]) -> _Row:
    ids, positions, segment = list(ctx), list(range(len(ctx))), [-1] * len(ctx)
    targets = []
    for k, cont in enumerate(conts):
        start = len(ids)
        targets.append([(len(ctx) - 1 if j == 0 else start + j - 1, t) for j, t in enumerate(cont)])
        ids.extend(cont)
        positions.extend(range(len(ctx), len(ctx) + len(cont)))
        segment.extend([k] * len(cont))
    return _Row(ids, positions, segment, targets)


def _mask(rows: list[_Row], length: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: causal within the context and within each continuation, every
    continuation sees the context; padding sees only itself (a fully masked row would give NaN)."""
    allowed = torch.zeros((len(rows), length, length), dtype=torch.bool)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    for b, row in enumerate(rows):
        seg = torch.tensor(row.segment)
        n = len(row.ids)
        same = (seg[:, None] == seg[None, :]) | (seg[None, :] == -1)  # (n, n)
        allowed[b, :n, :n] = same & causal[:n, :n]
        pad = torch.arange(n, length)
        allowed[b, pad, pad] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@torch.no_grad()
def _row_logprobs(model, rows: list[_Row], pad_id: int, shared: bool) -> list[list[tuple[float, int]]]:
    """Per row, per continuation: (sum of log-probabilities, tokens)."""
    device = _device(model)
    length = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    positions = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row.ids)] = torch.tensor(row.ids)
        positions[b, : len(row.ids)] = torch.tensor(row.positions)
    picks = [(b, i, t) for b, row in enumerate(rows) for cont in row.targets for i, t in cont]
    b_idx = torch.tensor([p[0] for p in picks], device=device)
    i_idx = torch.tensor([p[1] for p in picks], device=device)
    tokens = torch.tensor([p[2] for p in picks], device=device)
    if shared:
        dtype = model.get_input_embeddings().weight.dtype
        hidden = model.get_decoder()(input_ids=ids.to(device), position_ids=positions.to(device),
                                     attention_mask=_mask(rows, length, dtype).to(device),
                                     use_cache=False).last_hidden_state  # (B, T, H)
        logits = model.get_output_embeddings()(hidden[b_idx, i_idx]).float()  # (P, V): only where needed
    else:
        mask = (torch.arange(length)[None] < torch.tensor([len(r.ids) for r in rows])[:, None]).long()
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       use_cache=False).logits[b_idx, i_idx].float()  # (P, V)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0].tolist()
    out, at = [], 0
    for row in rows:
        sums = []
        for cont in row.targets:
            sums.append((float(sum(logprobs[at: at + len(cont)])), len(cont)))
            at += len(cont)
        out.append(sums)
    return out


def _item_rows(tokenizer, item: EvalItem, shared: bool) -> list[tuple[list[int], _Row]]:
    """The rows scoring one item, each with the choices it holds: one row for all of them, or one each."""
    assert item.choices is not None and item.context is not None
    context = chat_prompt(tokenizer, item.prompt) if item.prompt is not None else item.context
    ctx, conts = encode_choices(tokenizer, context, [item.delimiter + c for c in item.choices])
    if shared:
        return [(list(range(len(conts))), _row(ctx, conts))]
    return [([k], _row(ctx, [cont])) for k, cont in enumerate(conts)]


def score_multiple_choice(model, tokenizer, items: list[EvalItem], *, batch_size: int = 16,
                          length_unit: str = "chars", share_context: bool | None = None) -> list[ItemResult]:
    """Each item's choices by log-likelihood; rows sorted by length so a batch pads little."""
    if length_unit not in LENGTH_UNITS:
        raise ValueError(f"length_unit: must be one of {', '.join(LENGTH_UNITS)}, got {length_unit!r}")
    shared = (model.config.model_type in SHARED_CONTEXT_FAMILIES) if share_context is None else share_context
    rows = [(n, ks, row) for n, item in enumerate(items) for ks, row in _item_rows(tokenizer, item, shared)]
    rows.sort(key=lambda r: len(r[2].ids))  # stable: equal lengths keep the items' order
    scores: dict[tuple[int, int], tuple[float, int]] = {}
    read = [0] * len(items)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        for (n, ks, row), per_choice in zip(batch, _row_logprobs(model, [r for _, _, r in batch], pad, shared),
                                            strict=True):
            scores.update({(n, k): s for k, s in zip(ks, per_choice, strict=True)})
            read[n] += len(row.ids)
    results = []
    for n, item in enumerate(items):
        assert item.choices is not None and item.gold is not None
        mine = [scores[(n, k)] for k in range(len(item.choices))]
        sums = [s for s, _ in mine]
        lengths = [float(len(c)) if length_unit == "chars" else float(max(1, t))
                   for c, (_, t) in zip(item.choices, mine, strict=True)]
        pick = max(range(len(sums)), key=lambda k: sums[k])
        pick_norm = max(range(len(sums)), key=lambda k: sums[k] / lengths[k])
        results.append(ItemResult(
            index=item.index, correct=pick == item.gold,
            values={"accuracy": (float(pick == item.gold), 1.0), "accuracy_norm": (float(pick_norm == item.gold), 1.0)},
            output={"choice": pick, "choice_norm": pick_norm, "gold": item.gold, "logprobs": sums,
                    "tokens": [t for _, t in mine]},
            tokens=read[n]))
    return results


# -- exact match -----------------------------------------------------------------------------------
def normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!").strip()


def answers_match(generated: str, gold: str) -> tuple[bool, str | float | None]:
    """Whether a generated answer is the gold one, and what was compared: numbers by value (the
    last number generated), anything else as normalised text."""
    if is_number(gold):
        value = extract_last_number(generated)
        return value is not None and math.isclose(value, float(gold), rel_tol=1e-4, abs_tol=1e-4), value
    said = normalise_answer(generated)
    return said == normalise_answer(gold), said


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                     batch_size: int = 8) -> list[tuple[str, int, int]]:
    """Greedy answers to chat-rendered prompts, batched with left padding: (text, prompt tokens,
    generated tokens) each."""
    device = _device(model)
    answers: list[tuple[str, int, int]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p) for p in prompts[start: start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for row, text in enumerate(tokenizer.batch_decode(new, skip_special_tokens=True)):
                generated = int((new[row] != tokenizer.pad_token_id).sum())
                answers.append((text, int(enc["attention_mask"][row].sum()), generated))
    finally:
        tokenizer.padding_side = side
    return answers


def score_exact_match(model, tokenizer, items: list[EvalItem], *, max_new_tokens: int = 256,
                      batch_size: int = 8) -> list[ItemResult]:
    answers = generate_answers(model, tokenizer, [i.prompt or "" for i in items], max_new_tokens, batch_size)
    results = []
    for item, (text, prompt_tokens, generated) in zip(items, answers, strict=True):
        assert item.answer is not None
        correct, compared = answers_match(text, item.answer)
        results.append(ItemResult(index=item.index, correct=correct, values={"accuracy": (float(correct), 1.0)},
                                  output={"text": text, "extracted": compared, "gold": item.answer},
                                  tokens=prompt_tokens + generated))
    return results


# -- loss ------------------------------------------------------------------------------------------
@torch.no_grad()
def score_loss(model, tokenizer, items: list[EvalItem], *, max_seq_len: int = 1024,
               batch_size: int = 8) -> list[ItemResult]:
    """Summed next-token loss and correct argmax predictions over each record's target tokens."""
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = []
    for item in items:
        assert item.example is not None
        examples.append(tokenize_example(tokenizer, item.example, max_seq_len)[0])
    results = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, T-1)
        targets = labels != IGNORE_INDEX
        hits = (logits.argmax(-1) == labels) & targets
        for row, example in enumerate(chunk):
            n = int(targets[row].sum())
            item = items[start + row]
            results.append(ItemResult(index=item.index, correct=None,
                                      values={"loss": (float(nll[row].sum()), float(n)),
                                              "token_accuracy": (float(hits[row].sum()), float(n))},
                                      output={"loss": float(nll[row].sum()) / max(1, n), "target_tokens": n},
                                      tokens=len(example.input_ids)))
    return results
