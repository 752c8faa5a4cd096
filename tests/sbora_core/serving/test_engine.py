"""The inference engine: merged vs unmerged application, mixed batches, cache, composition, queue bound."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from sbora_core.method.adapter import SparseAdapter
from sbora_core.method.adapter_io import AdapterMismatchError, save_adapter
from sbora_core.method.merge import merge_adapters
from sbora_core.method.models import load_base_model
from sbora_core.serving.engine import AdapterIntegrityError, Engine, QueueFull
from sbora_core.serving.generation import Completion, SamplingParams
from sbora_core.testing import build_tiny_model, random_adapter

PROMPTS = ["Once upon a time", "The capital of", "SBoRA adapters are", "x"]


@pytest.fixture(scope="module")
def peaky_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("engine") / "peaky", initializer_range=0.3, seed=3)


@pytest.fixture
def base(peaky_model_dir):
    return load_base_model(str(peaky_model_dir), device="cpu")


@pytest.fixture
def engine(base):
    engine = Engine(base, max_batch_size=8)
    yield engine
    engine.close()


def ids(engine, text):
    return engine.tokenizer(text)["input_ids"]


def greedy(n=12):
    return SamplingParams(max_new_tokens=n)


def run_together(engine, requests):
    """Submit all requests before the scheduler can take any, so they share one batch."""
    with engine.cv:
        handles = [engine.submit(ids(engine, p), a, greedy()) for p, a in requests]
    return [h.result() for h in handles]


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_merged_and_unmerged_application_give_the_same_tokens(base, variant):
    adapter = random_adapter(base, variant)
    merged = Engine(base, merge_single=True)
    plain_base = base.model(input_ids=torch.tensor([ids(merged, PROMPTS[0])])).logits
    try:
        a = [merged.generate(ids(merged, p), [adapter], greedy()).text for p in PROMPTS]
    finally:
        merged.close()
    unmerged = Engine(base, merge_single=False)
    try:
        b = [unmerged.generate(ids(unmerged, p), [adapter], greedy()).text for p in PROMPTS]
        none = unmerged.generate(ids(unmerged, PROMPTS[0]), [], greedy()).text
    finally:
        unmerged.close()
    # One engine merged its adapter (once: consecutive requests keep it merged), the other never did.
    assert merged.stats["merged_batches"] >= 1 and merged.stats["mixed_batches"] == 0
    assert unmerged.stats["mixed_batches"] >= 1
    assert a == b
    assert a[0] != none, "the adapter must change what the model says"
    assert torch.equal(base.model(input_ids=torch.tensor([ids(merged, PROMPTS[0])])).logits, plain_base)


def test_mixed_batch_gives_each_request_its_solo_tokens(engine, base):
    adapters = [random_adapter(base, "sbora_fa", index_seed=1, seed=1), random_adapter(base, "sbora_fb", index_seed=2, seed=2),
                random_adapter(base, "lora", seed=3), None]
    requests = [(p, [a] if a else []) for p, a in zip(PROMPTS, adapters, strict=True)]
    alone = [engine.generate(ids(engine, p), a, greedy()).text for p, a in requests]
    together = run_together(engine, requests)
    assert engine.stats["mixed_batches"] == 1
    assert [c.text for c in together] == alone
    assert len(set(alone)) == len(alone)


def test_swap_then_unmerge_leaves_every_weight_bit_identical(engine, base):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    first, second = random_adapter(base, index_seed=1, seed=1), random_adapter(base, index_seed=2, seed=2)
    for adapter in (first, second, first):
        engine.generate(ids(engine, PROMPTS[1]), [adapter], greedy(4))
    assert engine.stats["merged_batches"] == 3
    engine.close()  # the last unmerge runs after the result is delivered; wait for the scheduler to stop
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_composition_of_disjoint_adapters_equals_merging_one_after_the_other(engine, base, peaky_model_dir):
    first = random_adapter(base, index_seed=1, seed=1)
    taken = {n: set(d.indices.tolist()) for n, d in first.modules.items()}
    free = {n: torch.tensor([i for i in range(d.shape[1]) if i not in taken[n]][:8]) for n, d in first.modules.items()}
    second = random_adapter(base, index_seed=2, seed=2, indices=free)
    composed = [engine.generate(ids(engine, p), [first, second], greedy()).text for p in PROMPTS]

    sequential = load_base_model(str(peaky_model_dir), device="cpu")
    merge_adapters(sequential.model, [first])
    merge_adapters(sequential.model, [second])
    reference = Engine(sequential)
    try:
        assert composed == [reference.generate(ids(reference, p), [], greedy()).text for p in PROMPTS]
    finally:
        reference.close()


def test_overlapping_composition_is_rejected_naming_the_layer(engine, base):
    first, second = random_adapter(base, index_seed=1, seed=1), random_adapter(base, index_seed=1, seed=2)
    with pytest.raises(ValueError, match=r"^adapters #1 and #2 overlap in model\.layers\.0\.\S+, in columns"):
        engine.submit(ids(engine, "x"), [first, second])


def test_adapter_cache_evicts_least_recently_used_by_bytes(base, tmp_path):
    adapters = [random_adapter(base, index_seed=i, seed=i) for i in range(3)]
    for i, adapter in enumerate(adapters):
        save_adapter(adapter, tmp_path / f"a{i}")
    engine = Engine(base, cache_bytes=int(adapters[0].nbytes() * 2.5))
    try:
        engine.adapter("a0", tmp_path / "a0")
        engine.adapter("a1", tmp_path / "a1")
        engine.adapter("a0", tmp_path / "a0")  # a0 is now the most recently used
        engine.adapter("a2", tmp_path / "a2")  # over capacity: a1 goes
        assert list(engine.cache.entries) == ["a0", "a2"]
        assert (engine.cache.hits, engine.cache.misses, engine.cache.evictions) == (1, 3, 1)
        assert engine.cache.bytes <= engine.cache.capacity_bytes
    finally:
        engine.close()


def test_region_cache_keeps_recent_index_sets_within_its_bytes_and_swaps_stay_exact(base):
    """Six index sets through an engine whose region cache holds two: old entries go, a swap back to
    an evicted index set reads its region again and answers as before, and the weights end bit-exact."""
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    adapters = [random_adapter(base, index_seed=i, seed=i) for i in range(6)]
    engine = Engine(base, cache_bytes=int(adapters[0].nbytes() * 2.5))
    try:
        first = [engine.generate(ids(engine, PROMPTS[0]), [a], greedy(6)).text for a in adapters]
        layers = len(adapters[0].modules)  # one entry per layer and index set
        assert engine.regions.evictions >= 3 * layers and len(engine.regions) <= 3 * layers
        assert engine.regions.nbytes <= engine.regions.capacity_bytes
        again = [engine.generate(ids(engine, PROMPTS[0]), [a], greedy(6)).text for a in adapters]
        assert again == first and len(set(first)) > 1
    finally:
        engine.close()
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_a_thousand_registered_adapters_are_served_through_a_small_cache(base, tmp_path):
    """Requests spread over 1,000 adapters on disk, with room in memory for 24: every adapter is
    loaded on first use, the least recently used go, and one loaded again answers as it did."""
    seeds = [random_adapter(base, index_seed=i, seed=i) for i in range(8)]
    for k in range(1000):  # distinct weights without 1,000 injections: seed adapters, scaled factors
        source = seeds[k % len(seeds)]
        factor = 0.5 + k / 1000
        modules = {n: replace(d, **{f: t * factor for f, t in d.factors().items()}) for n, d in source.modules.items()}
        save_adapter(SparseAdapter(source.config, modules), tmp_path / f"ad{k}")
    engine = Engine(base, max_batch_size=8, cache_bytes=seeds[0].nbytes() * 24)
    try:
        first: dict[int, str] = {}
        for start in range(0, 1000, 8):
            keys = range(start, start + 8)
            requests = [(PROMPTS[k % len(PROMPTS)], [engine.adapter(f"ad{k}", tmp_path / f"ad{k}")]) for k in keys]
            first.update(zip(keys, (c.text for c in run_together(engine, requests)), strict=True))
        assert engine.cache.misses == 1000 and engine.cache.hits == 0
        assert len(engine.cache.entries) <= 24 and engine.cache.evictions >= 1000 - 24
        assert len(set(first.values())) > 8, "the scaled copies must answer differently"
        for k in (0, 1, 137, 500):  # evicted long ago, loaded again from disk
            assert f"ad{k}" not in engine.cache
            again = engine.adapter(f"ad{k}", tmp_path / f"ad{k}")
            assert engine.generate(ids(engine, PROMPTS[k % len(PROMPTS)]), [again], greedy()).text == first[k]
    finally:
        engine.close()


def test_rows_joining_freed_slots_and_adapters_loaded_again_answer_as_if_alone(base, tmp_path):
    """Unmerged, two slots, six requests of different lengths: each request that joins takes the slot
    a finished one left (a wider adapter's before a narrower one's); adapters evicted from the cache
    and loaded again answer as before. Every answer equals the request served alone, merged."""
    adapters = {"fa8": random_adapter(base, "sbora_fa", r=8, index_seed=1, seed=1),
                "fb": random_adapter(base, "sbora_fb", r=8, index_seed=2, seed=2),
                "fa4": random_adapter(base, "sbora_fa", r=4, index_seed=3, seed=3),
                "lora": random_adapter(base, "lora", r=4, seed=4)}
    for key, adapter in adapters.items():
        save_adapter(adapter, tmp_path / key)
    requests = [(PROMPTS[0], "fa8", 24), (PROMPTS[1], "fb", 4), (PROMPTS[2], "fa4", 6), (PROMPTS[3], "lora", 5),
                (PROMPTS[1], "fa4", 3), (PROMPTS[2], "fa8", 7)]
    reference = Engine(base, merge_single=True)
    try:
        alone = [reference.generate(ids(reference, p), [adapters[k]], greedy(n)).text for p, k, n in requests]
    finally:
        reference.close()
    engine = Engine(base, max_batch_size=2, merge_single=False, cache_bytes=adapters["fa8"].nbytes() + 1)
    try:
        answers, loaded = [], []
        for _wave in range(2):  # the second wave loads every adapter again: the small cache evicted it
            with engine.cv:
                handles = []
                for prompt, key, n in requests:
                    loaded.append(engine.adapter(key, tmp_path / key))
                    handles.append(engine.submit(ids(engine, prompt), [loaded[-1]], greedy(n)))
            answers.append([h.result().text for h in handles])
        assert answers == [alone, alone]
        assert engine.stats["joined"] >= 4 and engine.cache.evictions >= 6
        assert loaded[0] is not loaded[len(requests)], "fa8 should have been loaded afresh in the second wave"
        assert engine.banks.copied_rows == 2 * len(requests)  # one copy per request, none per step
    finally:
        engine.close()

def test_mismatched_or_corrupted_adapters_are_rejected(engine, base, tmp_path, tiny_model_dir):
    other = load_base_model(str(tiny_model_dir), device="cpu")
    save_adapter(random_adapter(other), tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match="was trained on base model"):
        engine.adapter("other", tmp_path / "other")
    save_adapter(random_adapter(base), tmp_path / "mine")
    with pytest.raises(AdapterIntegrityError, match="do not match their sha256"):
        engine.adapter("mine", tmp_path / "mine", weights_sha256="0" * 64)
    assert "other" not in engine.cache and "mine" not in engine.cache


def test_queue_bound_answers_queue_full_with_a_retry_time(base):
    engine = Engine(base, max_queue=2)
    try:
        with engine.cv:  # the scheduler cannot take anything while we hold its lock
            engine.submit(ids(engine, "a"), [], greedy(2))
            engine.submit(ids(engine, "b"), [], greedy(2))
            with pytest.raises(QueueFull) as info:
                engine.submit(ids(engine, "c"), [], greedy(2))
        assert info.value.retry_after_s >= 1
    finally:
        engine.close()


def test_sampling_parameters_per_request(engine):
    prompt = ids(engine, PROMPTS[0])
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert engine.generate(prompt, [], sampled).text == engine.generate(prompt, [], sampled).text
    short = engine.generate(prompt, [], SamplingParams(max_new_tokens=3))
    assert short.completion_tokens == 3 and short.finish_reason == "length"
    full = engine.generate(prompt, [], greedy(12)).text
    stop = full[3:5]
    stopped = engine.generate(prompt, [], SamplingParams(max_new_tokens=12, stop=[stop]))
    assert stopped.finish_reason == "stop" and stopped.text == full[: full.find(stop)]


def test_streaming_and_cancellation(engine):
    handle = engine.submit(ids(engine, PROMPTS[0]), [], greedy(200))
    pieces = []
    for piece in handle:
        pieces.append(piece)
        if len(pieces) == 2:
            handle.cancel()
    assert handle.completion.finish_reason == "cancelled"
    assert handle.completion.completion_tokens < 200
    whole = engine.generate(ids(engine, PROMPTS[0]), [], greedy(12))
    streamed = "".join(engine.submit(ids(engine, PROMPTS[0]), [], greedy(12)))
    assert streamed == whole.text


def test_many_threads_share_batches(engine, base):
    adapters = [random_adapter(base, index_seed=i, seed=i) for i in range(4)]
    results: dict[int, str] = {}

    def client(i):
        results[i] = engine.generate(ids(engine, PROMPTS[i % 4]), [adapters[i % 4]], greedy(8)).text

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == results[i % 4] for i in range(12))
    assert engine.stats["batches"] < 12


# -- continuous batching --------------------------------------------------------------------------
def first_pieces(handle, n):
    """Wait for `n` text pieces of a running request (they stay queued for its reader)."""
    import time

    deadline = time.monotonic() + 60
    while handle.events.qsize() < n:
        assert time.monotonic() < deadline, "the request produced too little"
        time.sleep(0.005)


@pytest.mark.parametrize("same_adapter", [True, False], ids=["same-adapter", "other-adapter"])
def test_a_request_joins_the_running_batch_and_answers_as_if_alone(engine, base, same_adapter):
    first = random_adapter(base, index_seed=1, seed=1)
    other = first if same_adapter else random_adapter(base, "sbora_fb", index_seed=2, seed=2)
    long_alone = engine.generate(ids(engine, PROMPTS[0]), [first], greedy(120)).text
    short_alone = engine.generate(ids(engine, PROMPTS[1]), [other], greedy(10)).text

    running = engine.submit(ids(engine, PROMPTS[0]), [first], greedy(120))
    first_pieces(running, 3)
    joined = engine.submit(ids(engine, PROMPTS[1]), [other], greedy(10)).result()
    assert engine.stats["joined"] >= 1
    still_running = not any(isinstance(item, Completion) for item in list(running.events.queue))
    assert still_running, "the joined request had to wait for the running batch to end"
    assert joined.text == short_alone
    assert running.result().text == long_alone  # the switch of adapter mode did not change its answer


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes(base):
    engine = Engine(base, max_batch_size=8, prefill_chunk=8)
    try:
        long_prompt = ids(engine, "SBoRA adapters are regional updates of a few columns. " * 3)
        assert len(long_prompt) > 40
        alone = engine.generate(long_prompt, [], greedy(6)).text
        running = engine.submit(ids(engine, PROMPTS[0]), [], greedy(150))
        first_pieces(running, 2)
        before = running.events.qsize()
        joined = engine.submit(long_prompt, [], greedy(6))
        text = joined.result().text
        # The running stream kept producing while the long prompt was read chunk by chunk.
        assert running.events.qsize() - before >= len(long_prompt) // 8 - 1
        assert text == alone
        running.cancel()
    finally:
        engine.close()


def test_one_tenant_s_burst_does_not_starve_another(base):
    engine = Engine(base, max_batch_size=1, max_queue=64)
    try:
        with engine.cv:  # queue everything before the scheduler takes any
            burst = [engine.submit(ids(engine, PROMPTS[0]), [], greedy(8), tenant="busy") for _ in range(8)]
            quiet = engine.submit(ids(engine, PROMPTS[1]), [], greedy(8), tenant="quiet")
        quiet.result()
        finished_before = sum(1 for h in burst if any(isinstance(i, Completion) for i in list(h.events.queue)))
        assert finished_before <= 2, "the quiet tenant waited behind the whole burst"
        for handle in burst:
            handle.result()
    finally:
        engine.close()


@torch.no_grad()
def direct_prompt_logprobs(model, prompt_ids):
    """Each prompt token's log-probability from one plain forward of the prompt alone."""
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids])).logits[0].float(), -1)
    return [logprobs[i - 1, t].item() for i, t in enumerate(prompt_ids) if i > 0]


def test_prompt_logprobs_are_the_model_s_own_in_batches_chunks_and_with_adapters(base):
    """Echo's scores: every prompt token's log-probability (the first has none), whether the prompt is
    read beside others of other lengths, in chunks, or with an adapter merged or applied per row;
    max_new_tokens 0 generates nothing."""
    adapter = random_adapter(base, seed=4)
    prompts = [ids_of(base, "The capital of France is Paris, a city"), ids_of(base, "x y"),
               ids_of(base, "SBoRA adapters are regional updates of a few columns. " * 2)]
    plain = [direct_prompt_logprobs(base.model, p) for p in prompts]
    handle = merge_adapters(base.model, [adapter])
    adapted = [direct_prompt_logprobs(base.model, p) for p in prompts]
    handle.unmerge()
    score = SamplingParams(max_new_tokens=0, prompt_logprobs=2)
    engine = Engine(base, max_batch_size=8, prefill_chunk=16)  # the third prompt is read in chunks
    try:
        with engine.cv:  # one batch: left-padded rows of different lengths, half of them adapted (mixed mode)
            handles = [engine.submit(p, a, score) for p in prompts for a in ([], [adapter])]
        done = [h.result() for h in handles]
        for n, (p, completion) in enumerate(zip([p for p in prompts for _ in (0, 1)], done, strict=True)):
            expected = (plain if n % 2 == 0 else adapted)[n // 2]
            assert completion.completion_tokens == 0 and completion.text == "" and completion.finish_reason == "length"
            assert completion.prompt_logprobs[0].logprob is None and len(completion.prompt_logprobs) == len(p)
            got = [t.logprob for t in completion.prompt_logprobs[1:]]
            assert got == pytest.approx(expected, abs=1e-4)
            assert all(len(t.top) == 2 and t.top[0][1] >= t.logprob - 1e-5 for t in completion.prompt_logprobs[1:])
        # Alone, merged (one adapter set in flight), and with a token generated after the prompt.
        one = engine.generate(prompts[0], [adapter], SamplingParams(max_new_tokens=1, prompt_logprobs=0, logprobs=0))
        assert [t.logprob for t in one.prompt_logprobs[1:]] == pytest.approx(adapted[0], abs=1e-4)
        assert one.completion_tokens == 1 and len(one.logprobs) == 1
        assert engine.generate(prompts[0], [], greedy(3)).prompt_logprobs is None  # not asked: not computed
    finally:
        engine.close()


def ids_of(base, text):
    return base.tokenizer(text)["input_ids"]
