"""Decoding on the slot cache answers as decoding on transformers' dynamic cache, token for token
(greedy): rows of different lengths in one step, rows joining and leaving, adapters merged or per row.

On the CPU the slot cache runs eagerly (opt in with `slot_cache=True`); on CUDA it is the default and
its steps replay as CUDA graphs, which the `cuda`-marked test compares with eager decoding."""

from __future__ import annotations

import pytest
import torch

from sbora_core.method.models import load_base_model
from sbora_core.serving.engine import Engine
from sbora_core.serving.generation import SamplingParams
from sbora_core.serving.static_decode import (
    DecodeGraphs,
    SlotBatch,
    decode_step,
    supports_slot_cache,
)
from sbora_core.testing import build_tiny_model, random_adapter

PROMPTS = ["Once upon a time", "The capital of", "SBoRA adapters are regional updates", "x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("slots") / "peaky", initializer_range=0.3, seed=3)


def serve(base, requests, *, slot_cache, padded=False, **engine_args):
    """(prompt, adapters, max_new_tokens) requests, all queued before the scheduler takes any.
    `padded`: steps run as the CUDA graphs replay them (rows padded to a power of two), eagerly."""
    engine = Engine(base, max_batch_size=4, slot_cache=slot_cache, **engine_args)
    if padded:
        engine.graphs = DecodeGraphs(engine.slots, lambda ids: decode_step(engine.model, engine.slots, ids, engine.dtype),
                                     4, capture=False)
    try:
        with engine.cv:
            handles = [engine.submit(engine.tokenizer(p)["input_ids"], a, SamplingParams(max_new_tokens=n))
                       for p, a, n in requests]
        results = [h.result() for h in handles]
        return results, engine
    finally:
        engine.close()


def test_the_slot_cache_answers_as_the_dynamic_cache_with_rows_joining_leaving_and_mixed_adapters(model_dir):
    base = load_base_model(str(model_dir), device="cpu")
    assert supports_slot_cache(base.model)
    fa, fb = random_adapter(base, "sbora_fa", index_seed=1, seed=1), random_adapter(base, "sbora_fb", index_seed=2, seed=2)
    # Six requests, four slots: prompts of different lengths share steps; short ones finish and the
    # queued ones join into the slots they free, behind rows that moved up; the first passes 64
    # positions (a wider attention window).
    requests = [(PROMPTS[0], [fa], 70), (PROMPTS[1], [fb], 5), (PROMPTS[2], [], 9), (PROMPTS[3], [fa], 3),
                (PROMPTS[1], [fa], 12), (PROMPTS[2], [fb], 7)]
    dynamic, _ = serve(base, requests, slot_cache=False)
    slotted, engine = serve(base, requests, slot_cache=True)
    assert [c.text for c in slotted] == [c.text for c in dynamic]
    assert [c.completion_tokens for c in slotted] == [n for _, _, n in requests]
    assert engine.stats["joined"] >= 2 and engine.stats["mixed_batches"] >= 1
    assert engine.slots is not None and engine.graphs is None  # eager on the CPU
    assert (engine.slots.columns, engine.slots.generation) == (128, 1)  # grown once, when a row passed 64

    # The steps the CUDA graphs replay, run eagerly: three rows run as four, the fourth a free slot
    # with a free adapter slot; what the live rows say does not change.
    padded, engine = serve(base, requests, slot_cache=True, padded=True)
    assert [c.text for c in padded] == [c.text for c in dynamic]

    merged = [(p, [fa], n) for p, _, n in requests]  # one adapter for all: merged, on the slot cache too
    assert [c.text for c in serve(base, merged, slot_cache=True)[0]] == \
        [c.text for c in serve(base, merged, slot_cache=False)[0]]


def test_a_long_prompt_read_in_chunks_joins_the_slot_cache_as_it_would_the_dynamic_one(model_dir):
    base = load_base_model(str(model_dir), device="cpu")
    long_prompt = "SBoRA adapters are regional updates of a few columns. " * 3
    requests = [(PROMPTS[0], [], 40), (long_prompt, [], 12), (PROMPTS[1], [], 5)]
    dynamic, _ = serve(base, requests, slot_cache=False, prefill_chunk=8)
    slotted, engine = serve(base, requests, slot_cache=True, prefill_chunk=8)
    assert [c.text for c in slotted] == [c.text for c in dynamic]
    assert engine.slots is not None and engine.slots.columns == 256  # the long row passed 128 positions


def test_a_row_stops_when_its_slot_is_full(model_dir):
    base = load_base_model(str(model_dir), device="cpu")
    prompt_ids = base.tokenizer(PROMPTS[0])["input_ids"]
    (completion,), _ = serve(base, [(PROMPTS[0], [], 100)], slot_cache=True, max_len=40)
    assert completion.finish_reason == "length"
    assert len(prompt_ids) + completion.completion_tokens == 40


def test_the_batch_keeps_each_row_in_the_slot_of_its_index(model_dir):
    """White-box: after rows 0 and 2 of four finish, rows 1 and 3 sit in slots 0 and 1 with their
    lengths, and the freed slots write at column 0."""
    base = load_base_model(str(model_dir), device="cpu")
    engine = Engine(base, max_batch_size=4, slot_cache=True)
    engine.close()  # only its cache and its prefill are used here
    assert engine.slots is not None
    batch = SlotBatch(engine.slots)
    lengths = [3, 5, 7, 9]
    for slot, n in enumerate(lengths):
        engine.slots.slot_layers[0].copy_in(slot, torch.full((2, n, 8), float(slot)), torch.zeros(2, n, 8), n)
        engine.slots.positions[slot], engine.slots.lengths[slot] = n, n
    batch.rows = [object()] * 4  # type: ignore[list-item]
    batch.next_ids = torch.arange(4)[:, None]
    batch.keep([1, 3])
    assert engine.slots.lengths == [5, 9, 0, 0] and engine.slots.positions.tolist() == [5, 9, 0, 0]
    keys = engine.slots.slot_layers[0].keys
    assert torch.all(keys[0, :, :5] == 1) and torch.all(keys[1, :, :9] == 3)
    assert batch.next_ids.flatten().tolist() == [1, 3]


def tiny_llama(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, **config))


def test_models_whose_decoding_a_slot_cache_would_change_keep_the_dynamic_cache():
    assert supports_slot_cache(tiny_llama())
    # Dynamic RoPE recomputes its frequencies from the longest position it has seen.
    assert not supports_slot_cache(tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": 10000.0}))
    assert not supports_slot_cache(tiny_llama(sliding_window=16))
    flash = tiny_llama()
    flash.config._attn_implementation = "flash_attention_2"  # would not honour the 4-D mask
    assert not supports_slot_cache(flash)


def cuda_requests(base, mixed):
    fa, fb = random_adapter(base, "sbora_fa", index_seed=1, seed=1), random_adapter(base, "sbora_fb", index_seed=2, seed=2)
    for adapter in (fa, fb):
        adapter.place("cuda")
    # The longest row passes 64 and 128 positions: the cache grows twice after graphs were captured.
    requests = [(PROMPTS[i % 4], [fa if mixed and i % 2 else fb], 6 + 5 * i) for i in range(5)]
    requests.append((PROMPTS[0], [fa if mixed else fb], 140))
    return requests


@pytest.mark.cuda
@pytest.mark.parametrize("mixed", [False, True], ids=["merged", "per-row adapters"])
def test_graph_replayed_decoding_equals_eager_decoding(model_dir, mixed):
    """Replayed graphs run the padded steps' own kernels: bf16 answers equal eager padded steps exactly."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and torch sees none")
    base = load_base_model(str(model_dir), device="cuda")
    requests = cuda_requests(base, mixed)
    eager, _ = serve(base, requests, slot_cache=True, padded=True)
    graphed, engine = serve(base, requests, slot_cache=True)
    assert engine.graphs is not None and engine.graphs.capture, "capturing failed and was turned off"
    assert engine.graphs.graphs, "no step was captured"
    assert engine.slots.generation >= 2
    assert [c.text for c in graphed] == [c.text for c in eager]


@pytest.mark.cuda
@pytest.mark.parametrize("mixed", [False, True], ids=["merged", "per-row adapters"])
def test_graph_replayed_slot_cache_answers_as_the_dynamic_cache_in_fp32(model_dir, mixed):
    """The slot cache and its graphs against transformers' dynamic cache, on the GPU. In fp32: in bf16 the
    two attention paths (a padded window with a mask against exact lengths) round differently, and a
    greedy choice between near-equal logits may flip after a hundred tokens (seen on an H200)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and torch sees none")
    base = load_base_model(str(model_dir), device="cuda", dtype=torch.float32)
    requests = cuda_requests(base, mixed)
    dynamic, _ = serve(base, requests, slot_cache=False)
    graphed, engine = serve(base, requests, slot_cache=True)
    assert engine.graphs is not None and engine.graphs.capture and engine.graphs.graphs
    assert [c.text for c in graphed] == [c.text for c in dynamic]
