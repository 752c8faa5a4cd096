"""Preference records (DPO data): two shapes, one normalised pair.

- OpenAI's DPO format: `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
  "content": ...}], "non_preferred_output": [{...}]}`; each output is exactly one assistant message
  (single turn: the answer to the input's conversation);
- `{"prompt", "chosen", "rejected"}` (TRL's form): the prompt as text or as a list of messages, each
  answer as text or as a one-message assistant list.

Problems name the line and the field, as the other formats' do (`data.py` collects them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sbora_core.training.tokenization import ROLES, Example

PREFERENCE = "preference"
OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")
PAIR_KEYS = ("chosen", "rejected")


class Problems(Protocol):
    def add(self, line: int | None, message: str, severity: str = "error") -> None: ...


@dataclass
class PreferencePair:
    """One prompt with a preferred and a non-preferred answer."""

    line: int
    chosen: str
    rejected: str
    messages: list[dict[str, str]] | None = None  # the prompt as a conversation
    prompt: str | None = None  # or as raw text

    def example(self, answer: str) -> Example:
        """The prompt with one answer, as the SFT tokenizer takes it."""
        if self.messages is not None:
            return Example(self.line, messages=[*self.messages, {"role": "assistant", "content": answer}])
        return Example(self.line, prompt=self.prompt, completion=answer)


def is_preference(record: dict) -> bool:
    """An instruction record has an `input` too, but as text: OpenAI's is an object."""
    return any(k in record for k in OPENAI_KEYS[1:] + PAIR_KEYS) or isinstance(record.get("input"), dict)


def _messages(value: Any, field: str, line: int, problems: Problems) -> list[dict[str, str]] | None:
    if not isinstance(value, list) or not value:
        problems.add(line, f'field "{field}" must be a non-empty list of {{"role", "content"}} objects')
        return None
    clean = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            problems.add(line, f"{field}[{i}]: unknown role {role!r}; use one of {', '.join(ROLES)}")
            return None
        if not isinstance(content, str) or (not content.strip() and role != "system"):
            problems.add(line, f'{field}[{i}]: field "content" must be a non-empty string')
            return None
        clean.append({"role": role, "content": content})
    return clean


def _answer(record: dict, field: str, line: int, problems: Problems) -> str | None:
    """One side: text, or exactly one assistant message."""
    value = record.get(field)
    if value is None:
        problems.add(line, f'missing field "{field}"')
        return None
    if isinstance(value, str):
        if not value.strip():
            problems.add(line, f'field "{field}" is empty')
            return None
        return value
    messages = _messages(value, field, line, problems)
    if messages is None:
        return None
    if len(messages) != 1:
        problems.add(line, f'field "{field}" has {len(messages)} messages; a preference output is a single '
                           "assistant turn (put earlier turns in the input)")
        return None
    if messages[0]["role"] != "assistant":
        problems.add(line, f'{field}[0]: role is {messages[0]["role"]!r}; an output must be the assistant\'s')
        return None
    return messages[0]["content"]


def to_pair(record: dict, line: int, problems: Problems) -> PreferencePair | None:
    """The record as a pair, or None after adding its problems."""
    openai = any(k in record for k in OPENAI_KEYS)
    sides = ("preferred_output", "non_preferred_output") if openai else PAIR_KEYS
    messages, prompt = None, None
    if openai:
        source = record.get("input")
        if not isinstance(source, dict) or "messages" not in source:
            problems.add(line, 'field "input" must be an object with "messages"')
            return None
        messages = _messages(source["messages"], "input.messages", line, problems)
        if messages is None:
            return None
    elif isinstance(record.get("prompt"), list):
        messages = _messages(record["prompt"], "prompt", line, problems)
        if messages is None:
            return None
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        prompt = record["prompt"]
    else:
        problems.add(line, 'field "prompt" must be non-empty text or a list of messages')
        return None
    if messages is not None and messages[-1]["role"] == "assistant":
        problems.add(line, f'{"input.messages" if openai else "prompt"}: the last message is the assistant\'s; '
                           "the prompt ends with the turn the outputs answer")
        return None
    chosen, rejected = (_answer(record, side, line, problems) for side in sides)
    if chosen is None or rejected is None:
        return None
    if chosen == rejected:
        problems.add(line, f'fields "{sides[0]}" and "{sides[1]}" are identical: nothing to prefer')
        return None
    return PreferencePair(line, chosen, rejected, messages=messages, prompt=prompt)
