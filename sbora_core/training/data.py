"""Fine-tuning datasets: formats, parsing, and line-numbered validation.

Four record shapes are accepted, one per file, as JSON Lines or as one JSON array:
- chat: `{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}`
  (the OpenAI fine-tuning format); the loss covers every assistant turn;
- prompt/completion: `{"prompt": "...", "completion": "..."}`; raw text, the
  loss covers the completion;
- instruction: `{"instruction": "...", "input": "...", "output": "..."}` (the
  SBoRA paper's data); rendered as a user turn, the loss covers the output;
- preference: pairs of a preferred and a non-preferred answer, for DPO
  (`preference_records.py`).

`validate_dataset` reports every problem with its line number before any
training starts, together with the statistics a user wants before paying for
a run. Parsed records are `tokenization.Example`s; `tokenization` turns them
into token ids and label masks.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sbora_core.training.preference import pair_lengths
from sbora_core.training.preference_records import (
    PREFERENCE,
    PreferencePair,
    is_preference,
    to_pair,
)
from sbora_core.training.tokenization import IGNORE_INDEX, ROLES, Example, tokenize_example

FORMATS = ("chat", "prompt_completion", "instruction", PREFERENCE)
MAX_PROBLEMS = 50
MAX_LINE_BYTES = 1 << 20  # a single record over 1 MiB is almost certainly not a training example
MAX_NESTING = 20


@dataclass
class Problem:
    line: int | None  # 1-based line in the file; None for whole-file problems
    message: str
    severity: str = "error"  # "error" blocks training, "warning" does not

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.message}"


@dataclass
class DatasetReport:
    format: str | None
    records: int
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    more_problems: int = 0  # problems beyond the cap, counted but not listed
    total_tokens: int | None = None
    mean_tokens: float | None = None
    max_tokens: int | None = None
    truncated_records: int | None = None
    steps_per_epoch: int | None = None
    # The fewest tokens any record has before its completion starts, and that record's line: a
    # max_seq_len at or below it cuts every completion off, leaving nothing to train on.
    min_prompt_tokens: int | None = None
    min_prompt_line: int | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


class DatasetError(ValueError):
    """A dataset failed validation; `report` lists every problem."""

    def __init__(self, report: DatasetReport) -> None:
        self.report = report
        shown = "; ".join(str(p) for p in report.errors[:5])
        more = len(report.errors) - 5 + report.more_problems
        super().__init__(f"dataset has {len(report.errors) + report.more_problems} problem(s): {shown}"
                         + (f"; and {more} more" if more > 0 else ""))


class _Collector:
    """Problems in line order, capped so a broken million-line file gives a short answer."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.dropped = 0

    def add(self, line: int | None, message: str, severity: str = "error") -> None:
        bucket = self.errors if severity == "error" else self.warnings
        if len(self.errors) + len(self.warnings) >= self.cap:
            self.dropped += 1
            # Still count errors so `ok` stays right when the list is full.
            if severity == "error" and not self.errors:
                self.errors.append(Problem(line, message, severity))
            return
        bucket.append(Problem(line, message, severity))


# -- reading --------------------------------------------------------------------------------
def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping once past `limit`."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _decode(data: bytes, problems: _Collector) -> str | None:
    if b"\x00" in data[:8192]:
        problems.add(None, "binary file, not JSON text: upload a UTF-8 JSONL or JSON file")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        problems.add(line, f"not UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); save the file as UTF-8")
        return None


def _parse_records(text: str, problems: _Collector) -> list[tuple[int, Any]]:
    """(line, value) for each record: JSON array elements, or JSON Lines."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _parse_array(text, problems)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line.encode()) > MAX_LINE_BYTES:
            problems.add(number, f"record longer than {MAX_LINE_BYTES // 1024} KiB; split or shorten it")
            continue
        try:
            records.append((number, json.loads(line)))
        except RecursionError:
            problems.add(number, f"JSON nested deeper than {MAX_NESTING} levels")
        except json.JSONDecodeError as exc:
            problems.add(number, f"not JSON ({exc.msg} at column {exc.colno})")
    return records


def _parse_array(text: str, problems: _Collector) -> list[tuple[int, Any]]:
    """Decode a JSON array element by element, so each record keeps its line number."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    pos = text.index("[") + 1

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return records
    while pos < len(text):
        line = text.count("\n", 0, pos) + 1
        try:
            value, end = decoder.raw_decode(text, pos)
        except RecursionError:
            problems.add(line, f"JSON nested deeper than {MAX_NESTING} levels")
            return records
        except json.JSONDecodeError as exc:
            problems.add(exc.lineno, f"not JSON ({exc.msg} at column {exc.colno})")
            return records
        records.append((line, value))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                problems.add(text.count("\n", 0, pos) + 1, "text after the closing ']'")
            return records
        else:
            problems.add(text.count("\n", 0, pos) + 1, "expected ',' or ']' between records")
            return records
    problems.add(text.count("\n") + 1, "JSON array is not closed with ']'")
    return records


# -- record shapes --------------------------------------------------------------------------
def record_shape(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if is_preference(record):
        return PREFERENCE
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "instruction" in record or "output" in record:
        return "instruction"
    return None


def lone_surrogate(text: str) -> str | None:
    """What is wrong with text holding half of a UTF-16 pair (JSON's "\\ud800" escape): no character,
    and the tokenizer cannot encode it; None when the text is valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start} is not a "
                "character; write valid Unicode")
    return None


def _text_field(record: dict, key: str, line: int, problems: _Collector, *, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            problems.add(line, f'missing field "{key}"')
        return None
    if not isinstance(value, str):
        problems.add(line, f'field "{key}" must be a string, got {type(value).__name__}')
        return None
    if (where := lone_surrogate(value)) is not None:
        problems.add(line, f'field "{key}": {where}')
        return None
    if required and not value.strip():
        problems.add(line, f'field "{key}" is empty')
        return None
    return value


def _to_example(shape: str, record: dict, line: int, problems: _Collector) -> Example | PreferencePair | None:
    before = len(problems.errors) + problems.dropped
    if shape == PREFERENCE:
        return to_pair(record, line, problems)
    if shape == "prompt_completion":
        prompt = _text_field(record, "prompt", line, problems)
        completion = _text_field(record, "completion", line, problems)
        if len(problems.errors) + problems.dropped > before:
            return None
        return Example(line=line, prompt=prompt, completion=completion)
    if shape == "instruction":
        instruction = _text_field(record, "instruction", line, problems)
        extra = _text_field(record, "input", line, problems, required=False) or ""
        output = _text_field(record, "output", line, problems)
        if len(problems.errors) + problems.dropped > before:
            return None
        assert instruction is not None and output is not None
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return Example(line=line, messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.add(line, 'field "messages" must be a non-empty list of {"role", "content"} objects')
        return None
    clean: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.add(line, f"messages[{i}] must be an object with role and content")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.add(line, f"messages[{i}]: unknown role {role!r}; use one of {', '.join(ROLES)}")
            continue
        if not isinstance(content, str):
            problems.add(line, f'messages[{i}]: field "content" must be a string')
            continue
        if (where := lone_surrogate(content)) is not None:
            problems.add(line, f'messages[{i}]: field "content": {where}')
            continue
        if not content.strip() and role != "system":
            problems.add(line, f"messages[{i}]: empty content")
            continue
        clean.append({"role": role, "content": content})
    if len(problems.errors) + problems.dropped > before:
        return None
    if not any(m["role"] == "assistant" for m in clean):
        problems.add(line, "no assistant turn: nothing to learn from this conversation")
        return None
    return Example(line=line, messages=clean)


def read_dataset(path: str | Path, *, max_problems: int = MAX_PROBLEMS) -> tuple[str | None, list[Any], _Collector]:
    """Parse and check a file's records; tokenizer-free (see `validate_dataset` for the rest)."""
    problems = _Collector(max_problems)
    text = _decode(Path(path).read_bytes(), problems)
    if text is None:
        return None, [], problems
    if not text.strip():
        problems.add(None, "the file is empty")
        return None, [], problems
    parsed = _parse_records(text, problems)
    fmt: str | None = None
    examples: list[Any] = []  # Examples, or PreferencePairs in a preference file
    seen: dict[str, int] = {}
    for line, record in parsed:
        if _depth(record, MAX_NESTING) > MAX_NESTING:
            problems.add(line, f"JSON nested deeper than {MAX_NESTING} levels")
            continue
        shape = record_shape(record)
        if shape is None:
            problems.add(
                line,
                "unrecognised record: expected an object with \"messages\" (chat), \"prompt\"/\"completion\", "
                "\"instruction\"/\"input\"/\"output\", or a preference pair (\"input\"/\"preferred_output\"/"
                "\"non_preferred_output\", or \"prompt\"/\"chosen\"/\"rejected\")",
            )
            continue
        if fmt is None:
            fmt = shape
        elif shape != fmt:
            problems.add(line, f"record is {shape} but the file started as {fmt}; one format per file")
            continue
        example = _to_example(shape, record, line, problems)
        if example is None:
            continue
        key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        if key in seen:
            problems.add(line, f"duplicate of the record on line {seen[key]}")
            continue
        seen[key] = line
        examples.append(example)
    return fmt, examples, problems


# -- validation -----------------------------------------------------------------------------
def validate_dataset(
    path: str | Path,
    tokenizer: Any | None = None,
    *,
    max_seq_len: int = 1024,
    min_records: int = 1,
    batch_size: int = 1,
    grad_accum: int = 1,
    max_problems: int = MAX_PROBLEMS,
) -> DatasetReport:
    """Every problem with its line number, plus token statistics when a tokenizer is given."""
    fmt, examples, problems = read_dataset(path, max_problems=max_problems)
    if len(examples) < min_records and not (problems.errors and fmt is None):
        problems.add(None, f"only {len(examples)} valid record(s); at least {min_records} needed")
    report = DatasetReport(format=fmt, records=len(examples))
    if tokenizer is not None and examples:
        lengths, truncated = [], 0
        for example in examples:
            if isinstance(example, PreferencePair):  # the longer side; a cut pair may lose what differs
                lengths.append(max(pair_lengths(tokenizer, example)))
                if lengths[-1] > max_seq_len:
                    problems.add(example.line, f"pair of {lengths[-1]} tokens (prompt and the longer answer), "
                                               f"longer than {max_seq_len}; shorten the prompt or the answers")
                continue
            tokenized, was_truncated = tokenize_example(tokenizer, example, max_seq_len=1 << 30)
            lengths.append(len(tokenized.input_ids))
            first = next((i for i, label in enumerate(tokenized.labels) if label != IGNORE_INDEX), None)
            if first is not None and (report.min_prompt_tokens is None or first < report.min_prompt_tokens):
                report.min_prompt_tokens, report.min_prompt_line = first, example.line
            if len(tokenized.input_ids) > max_seq_len:
                truncated += 1
                problems.add(
                    example.line,
                    f"{len(tokenized.input_ids)} tokens, longer than max_seq_len={max_seq_len}; "
                    "it will be truncated",
                    severity="warning",
                )
        report.total_tokens = sum(lengths)
        report.mean_tokens = report.total_tokens / len(lengths)
        report.max_tokens = max(lengths)
        report.truncated_records = truncated
    if examples:
        report.steps_per_epoch = math.ceil(len(examples) / (batch_size * grad_accum))
    def in_line_order(items: list[Problem]) -> list[Problem]:
        return sorted(items, key=lambda p: (p.line is not None, p.line or 0))

    report.errors, report.warnings = in_line_order(problems.errors), in_line_order(problems.warnings)
    report.more_problems = problems.dropped
    return report


def load_examples(path: str | Path, *, min_records: int = 1) -> list[Any]:
    """Records ready for tokenisation (Examples, or PreferencePairs); DatasetError if the file has any error."""
    return load_dataset(path, min_records=min_records)[1]


def load_dataset(path: str | Path, *, min_records: int = 1) -> tuple[str, list[Any]]:
    """The file's format and its records; DatasetError if the file has any error."""
    report = validate_dataset(path, min_records=min_records)
    if not report.ok:
        raise DatasetError(report)
    fmt, examples, _ = read_dataset(path)
    assert fmt is not None
    return fmt, examples
