"""Tokenisation: normalised records to token ids with label masks, and padded batches.

An `Example` is one record as the parser leaves it: a conversation (chat and
instruction records) or raw prompt/completion text. `tokenize_example` renders
it (the tokenizer's chat template, or a plain layout without one) and masks
every token that is not a target with -100: the loss covers assistant turns,
or the completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One record, normalised: a conversation, or raw prompt/completion text."""

    line: int
    messages: list[dict[str, str]] | None = None  # chat and instruction records
    prompt: str | None = None  # prompt/completion records
    completion: str | None = None


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    line: int
    position_ids: list[int] | None = None  # packed rows: positions restart at each example

    @property
    def n_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _fallback_render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """A plain layout for tokenizers without a chat template."""
    parts = [f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages]
    if add_generation_prompt:
        parts.append("### Assistant:\n")
    return "".join(parts)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _fallback_render(messages, add_generation_prompt)


def _chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_target) pieces: assistant turns are targets.

    Assistant turn k spans from the end of the rendering of messages[:k] with a
    generation prompt to the end of the rendering of messages[:k+1], so the end
    token (e.g. <|im_end|>) is learnt as well.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:k], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations incrementally")
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    return [(text, target) for text, target in segments if text]


def tokenize_example(tokenizer: Any, example: Example, max_seq_len: int) -> tuple[TokenizedExample, bool]:
    """Token ids and labels for one example; the flag says whether it was truncated."""
    if example.messages is not None:
        segments = _chat_segments(tokenizer, example.messages)
    else:
        assert example.prompt is not None and example.completion is not None
        eos = tokenizer.eos_token or ""
        segments = [(example.prompt, False), (example.completion + eos, True)]
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, is_target) in enumerate(segments):
        ids = tokenizer(text, add_special_tokens=(i == 0), return_attention_mask=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if is_target else [IGNORE_INDEX] * len(ids))
    truncated = len(input_ids) > max_seq_len
    return TokenizedExample(input_ids[:max_seq_len], labels[:max_seq_len], example.line), truncated


def tokenize_examples(tokenizer: Any, examples: list[Example], max_seq_len: int) -> list[TokenizedExample]:
    """Tokenised examples, dropping any whose targets were all cut off by truncation."""
    out = []
    for example in examples:
        tokenized, _ = tokenize_example(tokenizer, example, max_seq_len)
        if tokenized.n_target_tokens:
            out.append(tokenized)
    return out


def pack_examples(examples: list[TokenizedExample], max_seq_len: int) -> list[TokenizedExample]:
    """Examples concatenated, in order, into rows of at most `max_seq_len` tokens.

    Each example keeps its own positions (they restart at 0), which is how the model tells the
    examples of a row apart: attention stays within an example. The first label of each example
    is masked: in a row it would be predicted from the previous example's last token.
    """
    rows: list[TokenizedExample] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    first_line = 0
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > max_seq_len:
            rows.append(TokenizedExample(ids, labels, first_line, positions))
            ids, labels, positions = [], [], []
        if not ids:
            first_line = example.line
        ids.extend(example.input_ids)
        labels.extend([IGNORE_INDEX, *example.labels[1:]])
        positions.extend(range(len(example.input_ids)))
    if ids:
        rows.append(TokenizedExample(ids, labels, first_line, positions))
    return rows


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask and labels (-100 on padding); packed rows
    also get position_ids (the padding counts as one more sequence, which no token attends to)."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    positions = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(example.position_ids or list(range(n)))
            positions[row, n:] = torch.arange(longest - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    return batch


