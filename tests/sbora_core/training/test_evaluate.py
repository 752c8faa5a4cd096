"""Task evaluation: option parsing, number extraction, and counting on crafted sets."""

import json

import pytest
import torch

from sbora_core.training.evaluate import (
    evaluate_file,
    extract_last_number,
    generate_answers,
    load_task,
    parse_choices,
)


def test_parse_choices_on_the_data_formats():
    q, opts = parse_choices(
        "Please choose the correct answer to the question: Which is a fruit?\n\n"
        "Answer1: a car Answer2: an apple Answer3: a rock\n\nAnswer format: answer1/answer2/answer3"
    )
    assert q == "Which is a fruit?" and opts == {"answer1": "a car", "answer2": "an apple", "answer3": "a rock"}
    _, opts = parse_choices("Please choose the correct solution to the question: Open a jar?\n\n"
                            "Solution1: twist the lid\n\nSolution2: hit it\n\nAnswer format: solution1/solution2")
    assert opts == {"solution1": "twist the lid", "solution2": "hit it"}
    _, opts = parse_choices("Please choose the correct answer to fill in the blank to complete the given sentence: "
                            "A _ B.\n\nOption1: x Option2: y Answer format: option1/option2")
    assert opts == {"option1": "x", "option2": "y"}
    q, opts = parse_choices("Please answer the following question with true or false, question: is ice cold?"
                            "\n\nAnswer format: true/false")
    assert q == "is ice cold?" and opts == {"true": "true", "false": "false"}


@pytest.mark.parametrize(
    ("text", "value"),
    [("so 3 + 4 = 7. The answer is 7.", 7.0), ("The answer is 1,234.5.", 1234.5), ("It is -3", -3.0), ("none", None)],
)
def test_extract_last_number(text, value):
    assert extract_last_number(text) == value


def reference_option_scores(model, tokenizer, context, options):
    """Mean log-likelihood of each option, one unbatched forward pass per option."""
    scores = {}
    for label, text in options.items():
        ctx = tokenizer(context)["input_ids"]
        cont = tokenizer(f" {text}", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        scores[label] = sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)) / len(cont)
    return scores


def test_multiple_choice_counts_exactly_the_items_the_model_prefers(tiny, tmp_path):
    questions = [f"Question number {i} about things?" for i in range(6)]
    options = {"answer1": "a short one", "answer2": "something much longer here", "answer3": "xyz"}
    records = []
    expected_correct = 0
    for i, q in enumerate(questions):
        scores = reference_option_scores(tiny.model, tiny.tokenizer, f"Question: {q}\nAnswer:", options)
        preferred = max(scores, key=scores.get)
        gold = preferred if i % 2 == 0 else next(lbl for lbl in options if lbl != preferred)
        expected_correct += gold == preferred
        opts = " ".join(f"Answer{n + 1}: {t}" for n, t in enumerate(options.values()))
        records.append({"instruction": f"Please choose the correct answer to the question: {q}\n\n{opts}\n\n"
                        "Answer format: answer1/answer2/answer3", "input": "", "output": "", "answer": gold})
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(records))
    result = evaluate_file(tiny.model, tiny.tokenizer, path, protocol="option_text", batch_size=4)
    assert result["kind"] == "multiple_choice" and result["items"] == 6
    assert result["correct"] == expected_correct == 3
    assert result["outcomes"] == [True, False] * 3


def test_arithmetic_compares_the_last_generated_number(tiny, tmp_path):
    prompts = [f"What is {i} plus {i}?" for i in range(4)]
    answers = generate_answers(tiny.model, tiny.tokenizer, prompts, max_new_tokens=12, batch_size=4)
    unbatched = [generate_answers(tiny.model, tiny.tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert answers == unbatched, "left-padded batches must not change greedy answers"
    records = []
    for prompt, text in zip(prompts, answers, strict=True):
        number = extract_last_number(text)
        # Gold is what the model said where it said a number, else something it did not say.
        gold = number if number is not None else 123456.0
        records.append({"instruction": prompt, "input": "", "output": "", "answer": str(gold)})
    records.append({"instruction": prompts[0], "input": "", "output": "", "answer": "987654.0"})
    path = tmp_path / "math.json"
    path.write_text(json.dumps(records))
    result = evaluate_file(tiny.model, tiny.tokenizer, path, max_new_tokens=12, batch_size=4)
    said_numbers = sum(extract_last_number(t) is not None for t in answers)
    assert result["kind"] == "arithmetic" and result["correct"] == said_numbers
    assert result["outcomes"][-1] is False


def test_limit_takes_a_fixed_subset(tmp_path):
    records = [{"instruction": f"q{i}", "input": "", "output": "", "answer": str(i)} for i in range(50)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(records))
    _, a = load_task(path, limit=10, seed=1)
    _, b = load_task(path, limit=10, seed=1)
    assert [i.prompt for i in a] == [i.prompt for i in b] and len(a) == 10
