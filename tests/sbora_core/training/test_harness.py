"""The evaluation harness on the tiny model: multiple-choice rows that share their context score as
one forward per choice does, a resumed run equals an uninterrupted one, candidates are applied and
taken off exactly, the loss grader agrees with validation, and the paired interval is right on data
whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import adapter_from_model, inject_adapter, remove_adapter
from sbora_core.training.eval_items import EvalDataError, read_eval_items, validate_eval_dataset
from sbora_core.training.eval_stats import paired_difference, score_with_interval
from sbora_core.training.evaluate import validation_metrics
from sbora_core.training.harness import (
    Candidate,
    EvalSpec,
    MemorySink,
    evaluate,
    run_evaluation,
    summarise,
)
from sbora_core.training.scoring import answers_match, encode_choices, score_multiple_choice
from sbora_core.training.tokenization import Example, tokenize_examples


def mc_file(tmp_path, n: int = 10):
    records = [{"question": f"Which word fits item {i}?", "choices": ["red", "a green tree", "blue sky", "x"],
                "answer": i % 4} for i in range(n)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@torch.no_grad()
def one_forward_per_choice(model, tokenizer, context: str, choice: str) -> float:
    """The plain reference: context + choice in one unbatched forward, full logits."""
    ctx, (cont,) = encode_choices(tokenizer, context, [" " + choice])
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_shared_context_rows_score_as_one_forward_per_choice(tiny, tmp_path):
    items = read_eval_items(mc_file(tmp_path), "multiple_choice")
    shared = score_multiple_choice(tiny.model, tiny.tokenizer, items, batch_size=4, share_context=True)
    apart = score_multiple_choice(tiny.model, tiny.tokenizer, items, batch_size=3, share_context=False)
    for item, a, b in zip(items, shared, apart, strict=True):
        reference = [one_forward_per_choice(tiny.model, tiny.tokenizer, item.context, c) for c in item.choices]
        assert a.output["logprobs"] == pytest.approx(reference, abs=1e-4)
        assert b.output["logprobs"] == pytest.approx(reference, abs=1e-4)
        assert a.output["choice"] == b.output["choice"] == int(np.argmax(reference))
        norm = [lp / len(c) for lp, c in zip(reference, item.choices, strict=True)]
        assert a.output["choice_norm"] == int(np.argmax(norm))
        assert a.correct == (a.output["choice"] == item.gold)
        # Sharing reads the context once: fewer tokens than one row per choice.
        assert a.tokens < b.tokens


def test_a_resumed_run_scores_only_the_rest_and_equals_an_uninterrupted_one(tiny, tmp_path):
    items = read_eval_items(mc_file(tmp_path, 10), "multiple_choice")
    spec = EvalSpec(chunk_size=4, batch_size=3)
    whole, _ = evaluate(tiny.model, tiny.tokenizer, items, spec)

    class Stopping(MemorySink):
        def __init__(self) -> None:
            super().__init__(1)
            self.chunks = 0

        def should_cancel(self) -> bool:
            return self.chunks == 1  # stop after the first chunk, as a killed worker would

        def store(self, candidate, results) -> None:
            super().store(candidate, results)
            self.chunks += 1

    sink = Stopping()
    assert run_evaluation(tiny.model, tiny.tokenizer, None, [Candidate("m")], items, spec, sink) is False
    assert [r.index for r in sink.results[0]] == [0, 1, 2, 3]
    scored_again: list[int] = []

    class Resuming(MemorySink):
        def store(self, candidate, results) -> None:
            scored_again.extend(r.index for r in results)
            super().store(candidate, results)

    resumed = Resuming(1)
    resumed.results[0] = list(sink.results[0])
    assert run_evaluation(tiny.model, tiny.tokenizer, None, [Candidate("m")], items, spec, resumed) is True
    assert scored_again == list(range(4, 10)), "no item is scored twice"
    assert summarise(resumed.results, ["model"], spec) == whole


def test_an_adapter_candidate_is_applied_then_taken_off_exactly(tiny, tmp_path):
    items = read_eval_items(mc_file(tmp_path, 6), "multiple_choice")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    config = SBoRAConfig(variant="sbora_fa", r=4, alpha=8, base_fingerprint=tiny.fingerprint)
    layers = inject_adapter(tiny.model, config)
    torch.manual_seed(0)
    for layer in layers.values():
        for p in layer.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.5)
    adapter = adapter_from_model(tiny.model, config)
    remove_adapter(tiny.model)
    spec = EvalSpec()
    summary, results = evaluate(tiny.model, tiny.tokenizer, items, spec,
                                [Candidate("base"), Candidate("adapter", [adapter]), Candidate("half", [adapter], [0.5])],
                                fingerprint=tiny.fingerprint)
    base, full, half = ([r.output["logprobs"] for r in rows] for rows in results)
    assert base != full and full != half and half != base
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items()), "unmerged bit for bit"
    assert [p["candidate"] for p in summary["paired"]] == ["adapter", "half", "half"]
    again, _ = evaluate(tiny.model, tiny.tokenizer, items, spec, [Candidate("base")])
    assert again["candidates"][0] == summary["candidates"][0]


def test_the_loss_grader_agrees_with_validation(tiny, tmp_path):
    records = [{"prompt": f"Count to {i}:", "completion": " " + " ".join(str(k) for k in range(i))} for i in range(2, 9)]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    items = read_eval_items(path, "loss")
    summary, _ = evaluate(tiny.model, tiny.tokenizer, items, EvalSpec(grader="loss", batch_size=3))
    examples = tokenize_examples(tiny.tokenizer, [Example(line=i + 1, prompt=r["prompt"], completion=r["completion"])
                                                  for i, r in enumerate(records)], 1024)
    expected = validation_metrics(tiny.model, examples, 4, tiny.tokenizer.pad_token_id)
    metrics = summary["candidates"][0]["metrics"]
    assert metrics["loss"]["value"] == pytest.approx(expected["loss"], rel=1e-5)
    assert metrics["token_accuracy"]["value"] == pytest.approx(expected["mean_token_accuracy"], abs=1e-9)
    assert summary["candidates"][0]["correct"] is None


def test_paired_interval_on_data_with_a_known_answer():
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2, 400).astype(float)
    ones = np.ones(400)
    # Every item gains exactly 0.25: the difference is 0.25 on every resample, whatever the items.
    shifted = paired_difference((base + 0.25, ones), (base, ones))
    assert shifted["difference"] == pytest.approx(0.25) and shifted["ci95"] == pytest.approx([0.25, 0.25])
    # Independent scores: the interval is about the normal one, mean ± 1.96 sd / sqrt(n).
    a, b = rng.normal(1.0, 2.0, 4000), rng.normal(0.0, 1.0, 4000)
    diff = paired_difference((a, np.ones(4000)), (b, np.ones(4000)))
    half_width = 1.96 * np.std(a - b) / np.sqrt(4000)
    assert diff["difference"] == pytest.approx(np.mean(a - b))
    assert diff["ci95"] == pytest.approx([np.mean(a - b) - half_width, np.mean(a - b) + half_width], abs=0.02)
    # The unpaired intervals of two correlated scores are wider than their paired difference's.
    noisy = rng.normal(0, 1, 4000)
    c, d = noisy + 0.1, noisy
    paired = paired_difference((c, np.ones(4000)), (d, np.ones(4000)))["ci95"]
    alone = score_with_interval(c, np.ones(4000))["ci95"]
    assert paired[1] - paired[0] < 0.01 < alone[1] - alone[0]
    with pytest.raises(ValueError, match="same items"):
        paired_difference((ones[:3], ones[:3]), (ones, ones))


@pytest.mark.parametrize(("generated", "gold", "match"), [
    ("so 3 + 4 = 7. The answer is 7.", "7", True), ("The answer is 1,234.5", "1234.5", True),
    ("It is 8", "7.0", False), ("  Paris. ", "paris", True), ("Paris is big", "paris", False)])
def test_exact_match_normalises_numbers_and_text(generated, gold, match):
    assert answers_match(generated, gold)[0] is match


def test_items_that_do_not_fit_the_grader_name_their_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n"
                    + json.dumps({"prompt": "3+3?", "answer": ""}) + "\n")
    with pytest.raises(EvalDataError, match="line 1: no options"):
        read_eval_items(path, "multiple_choice")
    with pytest.raises(EvalDataError, match='line 2: field "answer"'):
        read_eval_items(path, "exact_match")
    report = validate_eval_dataset(path)
    assert report is not None and report.format == "exact_match" and [p.line for p in report.errors] == [2]
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(EvalDataError, match='line 1: field "answer" must be the index'):
        read_eval_items(bad, "multiple_choice")
    training = tmp_path / "t.jsonl"
    training.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert validate_eval_dataset(training) is None  # a training set: data.validate_dataset's to check
