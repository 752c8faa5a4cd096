"""Dataset validation with line numbers, and label masks."""

import json

import pytest

from sbora_core.testing import build_byte_tokenizer
from sbora_core.training.data import DatasetError, load_examples, validate_dataset
from sbora_core.training.tokenization import IGNORE_INDEX, Example, tokenize_example


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(user, assistant):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})


def only_error(report):
    assert not report.ok
    assert len(report.errors) == 1, report.errors
    return report.errors[0]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not JSON"),
        ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}', "empty content"),
        ('{"messages": "hello"}', 'field "messages" must be a non-empty list'),
        ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', '"content" must be a string'),
        ('{"prompt": "p", "completion": "c"}', "record is prompt_completion but the file started as chat"),
        ('{"hello": "world"}', "unrecognised record"),
        ('[1, 2, 3]', "unrecognised record"),
    ],
)
def test_each_bad_record_is_named_by_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "d.jsonl", [chat("a", "b"), chat("c", "d"), bad_line, chat("e", "f")])
    problem = only_error(validate_dataset(path))
    assert problem.line == 3
    assert message in problem.message


def test_missing_and_empty_fields(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"instruction": "add", "input": "", "output": "2"}),
            json.dumps({"instruction": "add", "input": ""}),
            json.dumps({"instruction": " ", "input": "", "output": "3"}),
        ],
    )
    report = validate_dataset(path)
    assert [(p.line, p.message) for p in report.errors] == [
        (2, 'missing field "output"'),
        (3, 'field "instruction" is empty'),
    ]


def test_duplicates_name_the_first_occurrence(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat("a", "b"), chat("c", "d"), chat("a", "b")])
    problem = only_error(validate_dataset(path))
    assert (problem.line, problem.message) == (3, "duplicate of the record on line 1")


def test_not_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(chat("a", "b").encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    problem = only_error(validate_dataset(path))
    assert problem.line == 2 and "not UTF-8 (byte 0xe9" in problem.message


def test_binary_and_empty_files(tmp_path):
    (tmp_path / "bin").write_bytes(b"\x00\x01\x02PK\x03\x04" * 10)
    assert "binary file" in only_error(validate_dataset(tmp_path / "bin")).message
    (tmp_path / "empty").write_text("  \n")
    assert "empty" in only_error(validate_dataset(tmp_path / "empty")).message


def test_too_few_records(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat("a", "b")])
    problem = only_error(validate_dataset(path, min_records=3))
    assert problem.line is None and "only 1 valid record(s); at least 3 needed" in problem.message


def test_deep_nesting_is_rejected_not_crashing(tmp_path):
    deep = '{"prompt": ' + "[" * 5000 + "]" * 5000 + ', "completion": "x"}'
    path = write_lines(tmp_path / "d.jsonl", [deep])
    problem = only_error(validate_dataset(path))
    assert problem.line == 1 and "nested deeper" in problem.message


def test_json_array_keeps_line_numbers(tmp_path):
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    records[2]["output"] = ""
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, indent=2))
    problem = only_error(validate_dataset(path))
    text_lines = path.read_text().splitlines()
    assert text_lines[problem.line - 1].strip() == "{"
    assert '"q2"' in text_lines[problem.line]
    assert 'field "output" is empty' in problem.message


def test_statistics_and_truncation_warnings(tmp_path, tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [chat("short", "ok"), chat("x" * 300, "long one")])
    report = validate_dataset(path, tokenizer, max_seq_len=100, batch_size=1, grad_accum=2)
    assert report.ok and report.format == "chat" and report.records == 2
    assert report.truncated_records == 1
    assert [w.line for w in report.warnings] == [2]
    assert report.steps_per_epoch == 1
    assert report.max_tokens > 300 and report.total_tokens > report.max_tokens
    assert report.mean_tokens == report.total_tokens / 2


def test_problem_list_is_capped(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["{bad"] * 500)
    report = validate_dataset(path, max_problems=20)
    assert len(report.errors) == 20 and report.more_problems == 480
    with pytest.raises(DatasetError, match="500 problem"):
        load_examples(path)


def decoded_targets(tokenizer, tokenized):
    return tokenizer.decode([t for t in tokenized.labels if t != IGNORE_INDEX])


def test_chat_labels_cover_exactly_the_assistant_turns(tokenizer):
    example = Example(
        line=1,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."},
        ],
    )
    tokenized, truncated = tokenize_example(tokenizer, example, max_seq_len=1000)
    assert not truncated
    assert decoded_targets(tokenizer, tokenized) == "Hello!<|im_end|>\nSee you.<|im_end|>\n"
    full = tokenizer.apply_chat_template(example.messages, tokenize=False)
    assert tokenizer.decode(tokenized.input_ids) == full
    masked = tokenizer.decode([i for i, t in zip(tokenized.input_ids, tokenized.labels, strict=True) if t == IGNORE_INDEX])
    assert "Hello!" not in masked and "<|im_start|>assistant\n" in masked


def test_prompt_completion_labels_cover_the_completion(tokenizer):
    example = Example(line=1, prompt="2 + 2 =", completion=" 4")
    tokenized, _ = tokenize_example(tokenizer, example, max_seq_len=1000)
    assert decoded_targets(tokenizer, tokenized) == " 4<|im_end|>"
    assert tokenized.labels[: len("2 + 2 =")] == [IGNORE_INDEX] * len("2 + 2 =")


def test_instruction_records_become_a_user_turn(tmp_path, tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3", "answer": "3"}]))
    (example,) = load_examples(path)
    assert example.messages == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    tokenized, _ = tokenize_example(tokenizer, example, max_seq_len=1000)
    assert decoded_targets(tokenizer, tokenized) == "3<|im_end|>\n"
