"""Inference engine: one resident base model, an adapter cache, continuous batching with adapters.

One scheduler thread per engine runs the batch step by step. A request that
arrives joins the running batch at the next step (its prompt prefilled first:
short prompts together in one forward, a long one in chunks of at most
`prefill_chunk` tokens, each about `prefill_budget_s` long, between decode steps, so running
streams keep their pace); a request
that finishes leaves at once. Waiting requests are admitted tenant by tenant in
turn, within the admission limits (`admission`: the queue's bound, prompt tokens per request and
per tenant in flight). Long prompts are read in chunks bounded by time (`prefill`), so a
prompt of thousands of tokens does not stall the others. At every step the engine picks how to
apply adapters:
- every request in flight uses the same adapter set (or none): it is merged
  regionally into the live weights (r columns or rows per layer, original
  regions cached so a swap only writes), and unmerged bit-exactly when the set
  changes or the engine falls idle;
- requests use different adapters, or the base is quantised: the weights stay
  as they are and each row's adapters are applied unmerged (`row_adapters`).
Decode steps run on transformers' dynamic cache, or on CUDA on a slot cache
whose steps replay as CUDA graphs (`static_decode`). Each request has its own
sampling parameters, stop strings, token budget and seed, streams text as it is
decoded, and can be cancelled at any step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sbora_core.method.adapter import SparseAdapter
from sbora_core.method.adapter_io import WEIGHTS_FILE, AdapterMismatchError, load_adapter
from sbora_core.method.files import sha256_file
from sbora_core.method.merge import MergeHandle, RegionCache, check_disjoint, merge_adapters
from sbora_core.method.models import BaseModel
from sbora_core.serving.adapter_cache import AdapterCache
from sbora_core.serving.admission import Admission, AdmissionLimits, OverLimit, QueueFull
from sbora_core.serving.decoding import CACHE_FIELD, Batch, FairQueue, Row, record_prompt_logprobs
from sbora_core.serving.generation import Completion, RequestHandle, SamplingParams
from sbora_core.serving.prefill import ChunkSizer, growing_cache, settle
from sbora_core.serving.row_adapters import RowAdapterHooks, RowBanks
from sbora_core.serving.static_decode import (
    DecodeGraphs,
    SlotBatch,
    SlotCache,
    decode_step,
    supports_slot_cache,
)

__all__ = ["AdapterIntegrityError", "Engine", "OverLimit", "QueueFull"]  # the admission errors, where they were


class AdapterIntegrityError(ValueError):
    """The adapter's weights file does not match its recorded sha256."""


class Engine:
    def __init__(self, base: BaseModel, *, max_batch_size: int = 8, max_queue: int = 64,
                 cache_bytes: int = 1 << 30, merge_single: bool = True, prefill_chunk: int = 256,
                 slot_cache: bool | None = None, max_len: int | None = None, prefill_budget_s: float = 0.075,
                 max_prompt_tokens: int = 0, max_tenant_prompt_tokens: int = 0) -> None:
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.device = base.device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.admission = Admission(AdmissionLimits(max_queue, max_prompt_tokens, max_tenant_prompt_tokens))
        self.merge_single = merge_single and base.quantization == "none"
        self.cache = AdapterCache(cache_bytes)
        self.regions = RegionCache(cache_bytes)  # originals of the regions merged lately, as many bytes again
        self.hooks = RowAdapterHooks(self.model)
        self.banks = RowBanks(self.hooks.shapes(), max_batch_size, self.device)  # one slot per row in flight
        self.prefill_chunk = prefill_chunk
        self.prefill_budget_s = prefill_budget_s
        self.fresh = ChunkSizer(prefill_budget_s, prefill_chunk)  # prompts read from their first token
        self.dtype = self.model.get_input_embeddings().weight.dtype
        self.slots, self.graphs = self._slot_cache(slot_cache, max_len)
        self.pending = FairQueue()
        self.cv = threading.Condition()
        self.running = True
        # batches: runs from idle to idle; merged/mixed_batches: switches into each way of applying adapters
        self.stats = {"batches": 0, "merged_batches": 0, "mixed_batches": 0, "generated_tokens": 0, "joined": 0,
                      "prefill_chunks": 0}
        self.merged: tuple[tuple[int, ...], MergeHandle | None] | None = None  # the set merged now, and its handle
        self.mixed = False  # whether the rows' adapters are applied from the row banks now
        self.batch: Batch | SlotBatch | None = None
        self.joining: list[RequestHandle] = []  # admitted, prompts still being prefilled
        # a long prompt's cache so far, tokens done, and the sizer of its chunks
        self.prefilled: dict[int, tuple[Any, int, ChunkSizer]] = {}
        self.step_seconds = 0.05  # running estimate, for Retry-After
        self.decode_seconds = 0.0  # running estimate of a decode step alone: any forward's fixed cost
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        self.eos = {t for t in [self.tokenizer.eos_token_id, *configured] if t is not None}
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"engine-{base.name}")
        self.thread.start()

    def _slot_cache(self, wanted: bool | None, max_len: int | None) -> tuple[SlotCache | None, DecodeGraphs | None]:
        """A fixed KV cache for decoding (by default on CUDA, where it lets steps replay as CUDA graphs),
        rows of up to `max_len` positions (the model's context by default; memory follows the lengths
        served); None: transformers' dynamic cache."""
        on_cuda, supported = self.device.type == "cuda", supports_slot_cache(self.model)
        if wanted is None:
            wanted = on_cuda and supported and self.base.quantization == "none"
        if not wanted:
            return None, None
        if not supported:
            raise ValueError(f"slot_cache: {self.model.config.model_type} models decode on the dynamic cache only")
        context = self.base.context_length
        max_len = min(max_len or context, context)
        cache = SlotCache(self.model.config.num_hidden_layers, self.max_batch_size, max_len, self.device)
        if not on_cuda:
            return cache, None
        return cache, DecodeGraphs(cache, lambda ids: decode_step(self.model, cache, ids, self.dtype),
                                   self.max_batch_size)

    # -- adapters ------------------------------------------------------------------------------
    def adapter(self, key: str, directory: Path | Callable[[], Path], weights_sha256: str | None = None) -> SparseAdapter:
        """The adapter `key`, loaded from `directory` on first use and verified before it is cached."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        path = directory() if callable(directory) else directory
        if weights_sha256 is not None and sha256_file(path / WEIGHTS_FILE) != weights_sha256:
            raise AdapterIntegrityError(f"adapter {key}: its stored weights do not match their sha256")
        adapter = load_adapter(path)
        adapter.name = key
        if adapter.fingerprint != self.base.fingerprint:
            raise AdapterMismatchError(
                f"adapter {key} was trained on base model {adapter.fingerprint}, not {self.base.fingerprint}"
            )
        adapter.place(self.device)
        self.cache.put(key, adapter)
        return adapter

    def weighted(self, adapter: SparseAdapter, weight: float) -> SparseAdapter:
        """`adapter` scaled by `weight`, kept in the cache so that requests with the same weights share
        one object (and so a merged batch)."""
        if weight == 1.0:
            return adapter
        key = f"{adapter.name}*{weight!r}"
        cached = self.cache.get(key)
        if cached is None:
            cached = adapter.scaled(weight)
            self.cache.put(key, cached)
        return cached

    # -- requests ------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], adapters: Sequence[SparseAdapter] = (),
               params: SamplingParams | None = None, tenant: str = "") -> RequestHandle:
        """Queue a request; OverLimit when a limit can never let it in, QueueFull when the queue or the
        tenant's tokens in flight are at their bound now, ValueError for overlapping adapters."""
        adapters = list(adapters)
        if len(adapters) > 1:
            check_disjoint(adapters)
        handle = RequestHandle(list(prompt_ids), adapters, params or SamplingParams(), tenant)
        with self.cv:
            batches_ahead = len(self.pending) / self.max_batch_size + 1
            retry = max(1, round(batches_ahead * self.step_seconds * handle.params.max_new_tokens))
            self.admission.take(tenant, len(handle.prompt_ids), len(self.pending), retry)
            handle.on_finish = lambda: self.admission.release(tenant, len(handle.prompt_ids))
            self.pending.append(handle)
            self.cv.notify()
        return handle

    def generate(self, prompt_ids: Sequence[int], adapters: Sequence[SparseAdapter] = (),
                 params: SamplingParams | None = None) -> Completion:
        return self.submit(prompt_ids, adapters, params).result()

    def close(self) -> None:
        """Stop the scheduler after the batch in flight (its adapters unmerged) and detach the hooks."""
        if not self.running:
            return
        with self.cv:
            self.running = False
            self.cv.notify_all()
        self.thread.join(timeout=30)
        self.hooks.remove()

    # -- scheduling ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cv:
                while self.running and not self.pending and not self.joining and self.batch is None:
                    self._idle()
                    self.cv.wait()
                if not self.running and not self.joining and self.batch is None:
                    self._idle()
                    return
                if self.batch is None and not self.joining:
                    self.stats["batches"] += 1
                self._admit()
            try:
                self._step()
            except Exception as exc:  # the requests in flight fail, the engine keeps serving
                for handle in self.joining + (self.batch.handles if self.batch else []):
                    handle.emit(exc)
                self.batch, self.joining, self.prefilled = None, [], {}
                self._idle()

    def _admit(self) -> None:
        """Waiting requests join, tenant by tenant in turn, while the batch has room (called under cv);
        prompts cancelled while being read stop here, between two chunks."""
        for handle in [h for h in self.joining if h.cancelled.is_set()]:
            self.joining.remove(handle)
            self.prefilled.pop(id(handle), None)
            handle.emit(Completion("", len(handle.prompt_ids), 0, "cancelled"))
        room = self.max_batch_size - len(self.joining) - (len(self.batch.rows) if self.batch else 0)
        if self.batch is not None and not self.batch.joinable:
            room = 0  # this model's cache cannot take rows in mid-run: the next batch starts when it ends
        while self.pending and room > 0 and self.running:
            handle = self.pending.popleft()
            if handle.cancelled.is_set():
                handle.emit(Completion("", len(handle.prompt_ids), 0, "cancelled"))
                continue
            self.joining.append(handle)
            room -= 1

    def _idle(self) -> None:
        """Nothing in flight: the live weights go back to the base model's."""
        self._unmerge()
        self.hooks.active, self.mixed = {}, False
        self.banks.release()

    def _unmerge(self) -> None:
        if self.merged is not None and self.merged[1] is not None:
            self.merged[1].unmerge()
        self.merged = None

    @torch.no_grad()
    def _step(self) -> None:
        """One step: the adapters applied as the requests in flight need, at most one prefill forward,
        then one decode step for the running batch."""
        handles = self.joining + (self.batch.handles if self.batch else [])
        self._apply_adapters(handles)
        if self.joining:
            self._prefill()
        if self.batch is not None:
            self._decode_step()

    def _apply_adapters(self, handles: list[RequestHandle]) -> None:
        sets = {h.adapter_set for h in handles}
        first = handles[0].adapters if handles else []
        if len(sets) == 1 and (self.merge_single or not first):
            key = next(iter(sets))
            if self.merged is None or self.merged[0] != key:
                self._idle()
                self.stats["merged_batches"] += 1
                self.merged = (key, merge_adapters(self.model, first, self.regions) if first else None)
            return
        if self.merged is not None:
            self._unmerge()
        if not self.mixed:
            self.stats["mixed_batches"] += 1
            self.mixed = True
        self._bank([] if self.batch is None else self.batch.handles)

    def _bank(self, rows: list[RequestHandle], start: int = 0) -> None:
        """Slot i of the row banks holds rows[i]'s adapters; the hooks apply slots start.. (the rows of
        the next forward)."""
        self.banks.arrange([(h, h.adapters) for h in rows])
        self.hooks.active = self.banks.views(start, len(rows) - start)

    def _forward(self, handles: list[RequestHandle], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> tuple[torch.Tensor, Any]:
        """The model on these rows; in unmerged mode their own slots are active for it. Logits (B, T, V)."""
        prefill = self.mixed and (self.batch is None or handles != self.batch.handles)
        running = self.batch.handles if self.batch is not None else []
        if prefill:  # prompts read beside the running batch take the slots after its rows'
            self._bank(running + handles, start=len(running))
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{CACHE_FIELD: cache})
        finally:
            if prefill:
                self._bank(running)
        return out.logits, getattr(out, CACHE_FIELD)

    def _prefill(self) -> None:
        """Short prompts (each within this step's chunk): together in one forward. Otherwise the first
        long prompt, one chunk of it, sized to take about `prefill_budget_s`. A prompt fully read gives
        its first token and joins the running batch."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Short prompts are never split below 64 tokens: a chat turn is read in one forward.
        self.fresh.overhead_s = self.decode_seconds
        allowed = max(self.fresh.next(self.prefill_chunk), min(64, self.prefill_chunk))
        short: list[RequestHandle] = []
        for h in self.joining:
            if id(h) in self.prefilled or len(h.prompt_ids) > allowed:
                continue
            if short and max(len(h.prompt_ids), *(len(s.prompt_ids) for s in short)) * (len(short) + 1) > allowed:
                break  # the rest wait for the next step, so this forward stays within its time
            short.append(h)
        if short:
            longest = max(len(h.prompt_ids) for h in short)
            ids = torch.full((len(short), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(short), longest), dtype=torch.long)
            for i, h in enumerate(short):  # left padding: every row's next token sits in the last column
                ids[i, longest - len(h.prompt_ids):] = torch.tensor(h.prompt_ids)
                mask[i, longest - len(h.prompt_ids):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            started = time.perf_counter()
            self._start_rows(short, ids, mask, positions, None)
            self.fresh.observe(ids.numel(), time.perf_counter() - started)
            return
        handle = self.joining[0]  # a long prompt: one more chunk of it
        if id(handle) not in self.prefilled:
            sizer = ChunkSizer(self.prefill_budget_s, self.prefill_chunk)
            sizer.seconds_per_token = self.fresh.seconds_per_token
            self.prefilled[id(handle)] = (growing_cache(self.model.config), 0, sizer)
        cache, done, sizer = self.prefilled[id(handle)]
        sizer.overhead_s = self.decode_seconds
        end = done + sizer.next(len(handle.prompt_ids) - done)
        ids = torch.tensor([handle.prompt_ids[done:end]], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        positions = torch.arange(done, end, device=self.device)[None]
        started = time.perf_counter()
        self.stats["prefill_chunks"] += 1
        if end < len(handle.prompt_ids):
            logits, cache = self._forward([handle], ids, mask, positions, cache)
            if handle.prompt_logprobs is not None:
                record_prompt_logprobs(handle, logits[0], done, self.tokenizer)
            sizer.observe(end - done, time.perf_counter() - started)
            self.prefilled[id(handle)] = (cache, end, sizer)
            return
        self.prefilled.pop(id(handle), None)
        self._start_rows([handle], ids, mask, positions, cache, first=done)

    def _start_rows(self, handles: list[RequestHandle], ids: torch.Tensor, mask: torch.Tensor,
                    positions: torch.Tensor, cache: Any, first: int = 0) -> None:
        """The prompts' last forward (of their tokens from `first` on; left-padded rows): prompt
        log-probabilities where asked for, first tokens, then the rows join the running batch."""
        started = time.perf_counter()
        every, cache = self._forward(handles, ids, mask, positions, cache)  # (B, T, V)
        if cache is not None:
            cache = settle(cache)  # a long prompt's growing buffers become plain layers to join the batch
        for i, h in enumerate(handles):
            if h.prompt_logprobs is not None:
                read = len(h.prompt_ids) - first  # this forward's tokens of the prompt, in the last columns
                record_prompt_logprobs(h, every[i, every.shape[1] - read:], first, self.tokenizer)
        logits = every[:, -1]
        for h in handles:
            self.joining.remove(h)
        rows = [Row(h, self.device) for h in handles]
        fresh = Batch(rows, cache, mask, positions[:, -1:] + 1, torch.zeros((len(rows), 1), dtype=torch.long,
                                                                             device=self.device))
        self._take_tokens(fresh, logits, started)
        if not fresh.rows:
            return
        if self.batch is not None:
            self.stats["joined"] += len(fresh.rows)
        if self.slots is not None:  # the prompts' keys and values are copied into free slots
            if self.batch is None:
                self.batch = SlotBatch(self.slots)
            assert isinstance(self.batch, SlotBatch)
            self.batch.add(fresh)
        elif self.batch is None:
            self.batch = fresh
        else:
            assert isinstance(self.batch, Batch)
            self.batch.join(fresh)
        if self.mixed:
            self._bank(self.batch.handles)

    def _decode_step(self) -> None:
        batch = self.batch
        assert batch is not None
        started = time.perf_counter()
        if isinstance(batch, SlotBatch):
            logits = self._slot_step(batch)
        else:
            mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
            logits, batch.cache = self._forward(batch.handles, batch.next_ids, mask, batch.positions, batch.cache)
            logits = logits[:, -1]
            batch.mask, batch.positions = mask, batch.positions + 1
        self.decode_seconds = 0.9 * self.decode_seconds + 0.1 * (time.perf_counter() - started)
        self._take_tokens(batch, logits, started)
        if not batch.rows:
            self.batch = None
        elif self.mixed:
            self._bank(batch.handles)  # rows that finished leave their slots

    def _slot_step(self, batch: SlotBatch) -> torch.Tensor:
        """One decode step on the slot cache: replayed from a CUDA graph where there is one."""
        n = len(batch.rows)
        assert self.slots is not None
        if self.graphs is None:
            self.slots.set_window(n)
            logits = decode_step(self.model, self.slots, batch.next_ids, self.dtype)
        else:
            if self.mixed:  # a graph runs its padding rows through their (free) adapter slots too
                self.hooks.active = self.banks.views(0, self.graphs.bucket(n))
            logits = self.graphs.run(batch.next_ids, self.banks.layout if self.mixed else None)
        self.slots.advance(n)
        return logits

    def _take_tokens(self, batch: Batch | SlotBatch, logits: torch.Tensor, started: float) -> None:
        """Each row takes its token (B, V logits); finished rows leave the batch."""
        adjusted = [i for i, row in enumerate(batch.rows) if row.params.adjusts_logits]
        if adjusted:
            logits = logits.float().clone()
            for i in adjusted:
                logits[i] = batch.rows[i].adjust(logits[i])
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(batch.rows):
            if row.handle.cancelled.is_set():
                row.finish = "cancelled"
                continue
            if row.params.max_new_tokens <= 0:  # scoring only: the prompt's log-probabilities were the answer
                row.finish = "length"
                continue
            token = greedy[i] if row.params.temperature <= 0 else row.sample(logits[i])
            produced = len(row.produced)
            row.push(token, self.tokenizer, self.eos)
            if row.finish is None and self.slots is not None and \
                    len(row.handle.prompt_ids) + len(row.produced) >= self.slots.max_len:
                row.finish = "length"  # its slot is full
            kept = len(row.produced) > produced
            # Scoring clients (echo) expect one entry per token drawn, the end-of-text token included.
            if row.logprobs is not None and (kept or row.params.prompt_logprobs is not None):
                row.record_logprob(token, torch.log_softmax(logits[i].float(), dim=-1), self.tokenizer)
        self.stats["generated_tokens"] += len(batch.rows)
        self.step_seconds = 0.9 * self.step_seconds + 0.1 * (time.perf_counter() - started)
        keep = [i for i, row in enumerate(batch.rows) if row.finish is None]
        for row in batch.rows:
            if row.finish is not None:
                row.close(row.finish)
        batch.next_ids = torch.tensor([[row.produced[-1] if row.finish is None else 0] for row in batch.rows],
                                      dtype=torch.long, device=self.device)
        if keep:
            batch.keep(keep)
        else:
            batch.rows = []
