"""Evaluation items: what a grader scores, read from a dataset file with line-numbered errors.

Three graders read the records of one file (JSON Lines or one JSON array):
- `multiple_choice`: `{"prompt": "...", "choices": ["...", ...], "answer": 1}` (the context each
  choice continues, after a space; `answer` is the right choice's index or text), or
  `{"question": ...}` instead of `prompt` (read as `Question: ...\\nAnswer:`), or the SBoRA
  paper's instruction records, whose options are parsed from the instruction (`answer2`,
  `solution1`, `option2`, `true`/`false`);
- `exact_match`: `{"prompt": "...", "answer": "42"}` (or `question`, or an instruction record with
  `answer`); the prompt is sent as a user turn and the generated answer compared with `answer`;
- `loss`: training records (chat, prompt/completion, instruction), scored on their targets.

A file of `choices` records, or of `prompt`/`answer` records without a training target, is an
evaluation set: `validate_eval_dataset` checks it on upload as `data.validate_dataset` checks
training sets.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sbora_core.training.data import (
    MAX_NESTING,
    MAX_PROBLEMS,
    DatasetReport,
    _Collector,
    _decode,
    _depth,
    _parse_records,
    read_dataset,
)
from sbora_core.training.tokenization import Example

GRADERS = ("multiple_choice", "exact_match", "loss")
PROTOCOLS = ("option_text", "label")  # how instruction records' options are scored (multiple choice)
EVAL_FORMATS = ("multiple_choice", "exact_match")  # dataset formats that hold evaluation items only
TRAINING_KEYS = ("messages", "completion", "output")
_OPTION = re.compile(r"\b(Answer|Solution|Option)(\d+):\s*")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class EvalDataError(ValueError):
    """A record cannot be scored by the grader asked for; `line` is where (None: the whole file)."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line, self.message = line, message


@dataclass
class EvalItem:
    index: int  # position among the items scored (stable across runs: results are keyed by it)
    line: int  # where the record is in its file
    context: str | None = None  # multiple choice: the text every choice continues
    choices: list[str] | None = None  # multiple choice: each scored after `delimiter`
    gold: int | None = None  # multiple choice: index of the right choice
    delimiter: str = " "
    prompt: str | None = None  # exact match: the user turn
    answer: str | None = None  # exact match: the gold answer
    example: Example | None = None  # loss: the record as training reads it


# -- the SBoRA paper's instruction records -------------------------------------------------------
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


def is_number(text: str) -> bool:
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


def _instruction_prompt(record: dict[str, Any]) -> str:
    extra = record.get("input") or ""
    return record["instruction"] if not str(extra).strip() else f"{record['instruction']}\n\n{extra}"


def chat_prompt(tokenizer: Any, text: str) -> str:
    from sbora_core.training.tokenization import render_chat

    return render_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


# -- records to items ----------------------------------------------------------------------------
def _text(record: dict, key: str, line: int) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise EvalDataError(line, f'field "{key}" must be a non-empty string')
    return value


def _multiple_choice(record: dict, line: int, protocol: str) -> tuple[str, list[str], int]:
    """(context, choices, gold index) of one record."""
    if "choices" in record:
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvalDataError(line, 'field "choices" must be a list of at least two non-empty strings')
        context = record["prompt"] if "prompt" in record else f"Question: {_text(record, 'question', line)}\nAnswer:"
        if not isinstance(context, str) or not context:
            raise EvalDataError(line, 'field "prompt" must be a non-empty string')
        answer = record.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            return context, choices, answer
        if isinstance(answer, str) and answer in choices:
            return context, choices, choices.index(answer)
        raise EvalDataError(line, f'field "answer" must be the index (0..{len(choices) - 1}) or the text of a '
                                  f"choice, got {answer!r}")
    if "instruction" not in record:
        raise EvalDataError(line, 'no options: a multiple_choice item needs "choices" (or an instruction '
                                  "record whose instruction lists them)")
    prompt = _instruction_prompt(record)
    question, options = parse_choices(prompt)
    if len(options) < 2:
        raise EvalDataError(line, 'no options: a multiple_choice item needs "choices" (or an instruction '
                                  "record whose instruction lists them)")
    answer = str(record.get("answer", "")).strip()
    if answer not in options:
        raise EvalDataError(line, f'field "answer": {answer!r} is not among the parsed options {list(options)}')
    labels = list(options)
    if protocol == "label":  # the training target after the chat-rendered instruction (set by the caller)
        return prompt, [f"the correct answer is {label}" for label in labels], labels.index(answer)
    return f"Question: {question}\nAnswer:", list(options.values()), labels.index(answer)


def _exact_match(record: dict, line: int) -> tuple[str, str]:
    if "instruction" in record:
        prompt = _instruction_prompt(record)
    else:
        prompt = _text(record, "prompt" if "prompt" in record else "question", line)
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        raise EvalDataError(line, 'field "answer" must be a non-empty string or a number')
    return prompt, str(answer).strip()


def _read_records(path: str | Path) -> list[tuple[int, Any]]:
    problems = _Collector(MAX_PROBLEMS)
    text = _decode(Path(path).read_bytes(), problems)
    records = _parse_records(text, problems) if text is not None else []
    if problems.errors:
        first = problems.errors[0]
        raise EvalDataError(first.line, first.message)
    if not records:
        raise EvalDataError(None, "the file has no records")
    return records


def _subset(records: list, limit: int | None, seed: int) -> list:
    """A fixed random subset of `limit` records (the same for every candidate and run)."""
    if limit is not None and limit < len(records):
        return random.Random(seed).sample(records, limit)
    return records


def read_eval_items(path: str | Path, grader: str, *, protocol: str = "option_text", limit: int | None = None,
                    seed: int = 0) -> list[EvalItem]:
    """The items of `path` for `grader`; EvalDataError naming the first record that does not fit."""
    if grader not in GRADERS:
        raise ValueError(f"grader: must be one of {', '.join(GRADERS)}, got {grader!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if grader == "loss":
        fmt, examples, problems = read_dataset(path)
        if problems.errors or fmt not in ("chat", "prompt_completion", "instruction"):
            first = problems.errors[0] if problems.errors else None
            raise EvalDataError(first.line if first else None,
                                first.message if first else "the loss grader needs training records (chat, "
                                                            "prompt/completion or instruction)")
        chosen = _subset(examples, limit, seed)
        return [EvalItem(index=i, line=e.line, example=e) for i, e in enumerate(chosen)]
    items = []
    for i, (line, record) in enumerate(_subset(_read_records(path), limit, seed)):
        if not isinstance(record, dict) or _depth(record, MAX_NESTING) > MAX_NESTING:
            raise EvalDataError(line, "a record must be a JSON object")
        if grader == "multiple_choice":
            context, choices, gold = _multiple_choice(record, line, protocol)
            label_protocol = protocol == "label" and "choices" not in record
            items.append(EvalItem(index=i, line=line, context=context, choices=choices, gold=gold,
                                  delimiter="" if label_protocol else " ",
                                  prompt=context if label_protocol else None))
        else:
            prompt, answer = _exact_match(record, line)
            items.append(EvalItem(index=i, line=line, prompt=prompt, answer=answer))
    return items


def load_task(path: str | Path, limit: int | None = None, seed: int = 0,
              protocol: str = "option_text") -> tuple[str, list[EvalItem]]:
    """(kind, items) of a paper task file: `arithmetic` when every answer is a number (exact match on
    the last number generated), else `multiple_choice`."""
    records = [r for _, r in _read_records(path)]
    numeric = all(isinstance(r, dict) and is_number(str(r.get("answer", "")).strip()) for r in records)
    grader = "exact_match" if numeric else "multiple_choice"
    return ("arithmetic" if numeric else "multiple_choice",
            read_eval_items(path, grader, protocol=protocol, limit=limit, seed=seed))


# -- upload validation ----------------------------------------------------------------------------
def eval_format(record: Any) -> str | None:
    """`multiple_choice` or `exact_match` for an evaluation record, None for anything else."""
    if not isinstance(record, dict):
        return None
    if "choices" in record:
        return "multiple_choice"
    if "answer" in record and not any(k in record for k in TRAINING_KEYS) and "instruction" not in record:
        return "exact_match"
    return None


def validate_eval_dataset(path: str | Path, *, min_records: int = 1) -> DatasetReport | None:
    """Every problem of an evaluation set with its line number; None when the file is not one (its
    first record is a training record, or the file does not parse: `validate_dataset` reports that)."""
    problems = _Collector(MAX_PROBLEMS)
    text = _decode(Path(path).read_bytes(), problems)
    records = _parse_records(text, problems) if text is not None else []
    fmt = eval_format(records[0][1]) if records and not problems.errors else None
    if fmt is None:
        return None
    count = 0
    for line, record in records:
        if eval_format(record) != fmt:
            problems.add(line, f"record is not a {fmt} item but the file started as one; one format per file")
            continue
        try:
            _multiple_choice(record, line, "option_text") if fmt == "multiple_choice" else _exact_match(record, line)
            count += 1
        except EvalDataError as exc:
            problems.add(line, exc.message)
    if count < min_records:
        problems.add(None, f"only {count} valid record(s); at least {min_records} needed")
    report = DatasetReport(format=fmt, records=count, errors=problems.errors, warnings=problems.warnings,
                           more_problems=problems.dropped)
    return report
