"""The engine's bounds: prefill chunks bounded by time, cancellation while a prompt is read, admission
limits (413-style OverLimit against 429-style QueueFull), and OpenAI's logit adjustments against a
direct computation."""

from __future__ import annotations

import pytest
import torch

from sbora_core.method.models import load_base_model
from sbora_core.serving.admission import OverLimit, QueueFull
from sbora_core.serving.engine import Engine
from sbora_core.serving.engine import QueueFull as EngineQueueFull
from sbora_core.serving.generation import SamplingParams
from sbora_core.serving.prefill import ChunkSizer, growing_cache, settle
from sbora_core.testing import build_tiny_model

LONG_TEXT = "SBoRA adapters are regional updates of a few columns. " * 7  # ~380 byte tokens


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = build_tiny_model(tmp_path_factory.mktemp("limits") / "peaky", initializer_range=0.3, seed=3)
    return load_base_model(str(directory), device="cpu")


def ids(base, text):
    return base.tokenizer(text)["input_ids"]


def greedy(n, **extra):
    return SamplingParams(max_new_tokens=n, **extra)


def test_chunk_sizer_fits_the_time_budget_and_its_bounds():
    sizer = ChunkSizer(budget_s=0.075, max_tokens=256, min_tokens=8)
    assert sizer.next(10_000) == 256  # nothing measured yet: the token bound
    sizer.observe(256, 2.56)  # 10 ms per token, as late in an 8,000-token prompt on a CPU
    assert sizer.next(10_000) == 8  # 75 ms / 10 ms is 7: the floor keeps chunks from becoming single tokens
    sizer.observe(8, 0.008)  # 1 ms per token
    assert sizer.next(10_000) == 75 and sizer.next(20) == 20
    # A forward's fixed cost is what a decode step costs: the budget is for what the tokens add.
    sizer.overhead_s = 0.025
    sizer.observe(50, 0.075)
    assert sizer.next(10_000) == 50
    # Overhead past the budget (a busy CPU): chunks of about two decode steps, not of single tokens.
    sizer.overhead_s = 0.4
    sizer.observe(8, 0.48)
    assert sizer.next(10_000) == 40


def test_growing_cache_grows_by_doubling_and_settles_into_plain_layers(base):
    from transformers.cache_utils import DynamicLayer

    cache = growing_cache(base.model.config)
    keys = torch.randn(1, 2, 300, 4)
    for start in range(0, 300, 10):  # 30 chunks, like a long prompt read piece by piece
        for layer in range(2):
            cache.layers[layer].update(keys[:, :, start:start + 10], -keys[:, :, start:start + 10])
    capacities = cache.layers[0].buffers[0].shape[-2]
    assert 300 <= capacities < 600  # doubling, not one buffer per chunk
    settle(cache)
    assert all(type(layer) is DynamicLayer for layer in cache.layers)
    assert torch.equal(cache.layers[1].keys, keys) and torch.equal(cache.layers[1].values, -keys)


def test_a_long_prompt_is_read_in_chunks_bounded_by_time_and_answers_as_if_read_at_once(base):
    prompt = ids(base, LONG_TEXT)
    at_once = Engine(base, prefill_chunk=512)
    try:
        expected = at_once.generate(prompt, [], greedy(8)).text
        assert at_once.stats.get("prefill_chunks", 0) == 0  # one forward: no chunks
    finally:
        at_once.close()
    engine = Engine(base, prefill_chunk=256, prefill_budget_s=1e-4)  # every chunk over budget: the floor
    try:
        assert engine.generate(prompt, [], greedy(8)).text == expected
        # With the token bound alone this prompt takes 2 chunks; bounded by time, after the first
        # (nothing measured yet: the token bound) the rest in chunks of the floor's 8 tokens.
        assert engine.stats["prefill_chunks"] >= 1 + (len(prompt) - 256) // 8
    finally:
        engine.close()


def test_a_prompt_cancelled_while_it_is_read_stops_between_chunks(base):
    engine = Engine(base, prefill_chunk=256, prefill_budget_s=1e-4)
    try:
        prompt = ids(base, LONG_TEXT)
        with engine.cv:
            handle = engine.submit(prompt, [], greedy(50))
            handle.cancel()  # before the scheduler read a chunk of it
        done = handle.result()
        assert done.finish_reason == "cancelled" and done.completion_tokens == 0
        assert engine.stats.get("prefill_chunks", 0) < len(prompt) // 8 - 1
        assert engine.admission.tokens == {}  # its tokens no longer count against its tenant
    finally:
        engine.close()


def test_limits_that_can_never_pass_are_over_limit_and_busy_ones_queue_full(base):
    assert EngineQueueFull is QueueFull  # still importable from the engine, where callers found it
    engine = Engine(base, max_queue=4, max_prompt_tokens=300, max_tenant_prompt_tokens=400)
    try:
        long = ids(base, LONG_TEXT)
        with pytest.raises(OverLimit) as per_request:
            engine.submit(long, [], greedy(2), tenant="a")
        assert per_request.value.setting == "SBORA_ENGINE_MAX_PROMPT_TOKENS" and per_request.value.field == "prompt"
        with pytest.raises(OverLimit) as queue:
            engine.admission.check_request(10, requests=5)
        assert queue.value.setting == "SBORA_ENGINE_MAX_QUEUE" and "at most 4" in str(queue)
        half = long[:250]
        with engine.cv:  # the scheduler cannot take anything while we hold its lock
            first = engine.submit(half, [], greedy(2), tenant="a")
            with pytest.raises(QueueFull) as busy:  # 500 tokens in flight > 400: later, not never
                engine.submit(half, [], greedy(2), tenant="a")
            other = engine.submit(half, [], greedy(2), tenant="b")  # another tenant is not held back
        assert "SBORA_ENGINE_MAX_TENANT_PROMPT_TOKENS" in str(busy.value) and busy.value.retry_after_s >= 1
        first.result(), other.result()
        assert engine.admission.tokens == {}
        engine.submit(half, [], greedy(2), tenant="a").result()  # released: the same request fits now
    finally:
        engine.close()


@torch.no_grad()
def direct_greedy(model, prompt, n, bias=None, presence=0.0, frequency=0.0):
    """Greedy tokens from full forwards, OpenAI's adjustments applied by hand."""
    tokens = list(prompt)
    produced: list[int] = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
        for token, value in (bias or {}).items():
            logits[token] += value
        for token in set(produced):
            logits[token] -= frequency * produced.count(token) + presence
        token = int(logits.argmax())
        produced.append(token)
        tokens.append(token)
    return produced


@pytest.mark.parametrize("adjustment", [{"presence_penalty": 2.0}, {"frequency_penalty": 1.0},
                                        {"presence_penalty": -2.0, "frequency_penalty": 0.5}, {"logit_bias": "first"}],
                         ids=["presence", "frequency", "both", "logit_bias"])
def test_logit_bias_and_penalties_match_a_direct_computation(tiny_model_dir, adjustment):
    # The flat tiny model repeats one token: every adjustment here changes its answer.
    base = load_base_model(str(tiny_model_dir), device="cpu")
    prompt = ids(base, "Once upon a time")
    plain = direct_greedy(base.model, prompt, 12)
    if adjustment.get("logit_bias") == "first":
        adjustment = {"logit_bias": {plain[0]: -100.0, (plain[0] + 7) % 256: 4.0}}
    expected = direct_greedy(base.model, prompt, 12, adjustment.get("logit_bias"),
                             adjustment.get("presence_penalty", 0.0), adjustment.get("frequency_penalty", 0.0))
    assert expected != plain  # the adjustment changes the answer, so the check below can fail
    engine = Engine(base)
    try:
        done = engine.generate(prompt, [], greedy(12, ignore_eos=True, **adjustment))
        assert done.text == base.tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        engine.close()
