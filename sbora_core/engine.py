"""Inference engine: one resident base model, an adapter cache, batched generation with adapters.

Requests are queued and served in batches by one scheduler thread per engine
(step-wise batching: a batch runs until its last request ends; requests that
finish early leave the batch at once). For each batch the engine picks how to
apply adapters:
- every request uses the same adapter set (or none): merge it regionally into
  the live weights (r columns or rows per layer, original regions cached so a
  swap only writes), decode, unmerge bit-exactly;
- requests use different adapters, or the base is quantised: leave the weights
  alone and apply each row's adapters unmerged (`row_adapters`).
Each request has its own sampling parameters, stop strings, token budget and
seed, streams text as it is decoded, and can be cancelled at any step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from sbora_core.adapter import SparseAdapter
from sbora_core.adapter_io import WEIGHTS_FILE, AdapterMismatchError, load_adapter
from sbora_core.files import sha256_file
from sbora_core.merge import RegionCache, check_disjoint, merge_adapters
from sbora_core.models import BaseModel
from sbora_core.row_adapters import RowAdapterHooks, build_banks

# The KV cache's name in a forward's arguments and outputs: `cache` in recent transformers 5.x,
# `past_key_values` before (an older name now a deprecated alias).
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class QueueFull(RuntimeError):
    """The engine's queue is at its bound; try again after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the generation queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class AdapterIntegrityError(ValueError):
    """The adapter's weights file does not match its recorded sha256."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)


@dataclass
class TokenLogprob:
    """One generated token with its log-probability, and the most likely alternatives at its place."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length" or "cancelled"
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them


class EventStream:
    """What a request produces, in order: text pieces (str), then one Completion, or an exception.

    Read it by iterating (blocking), or hand it a callback with `listen` (for an
    event loop or another process), which first receives what is already queued."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self._listener: Callable[[object], None] | None = None
        self._listen_lock = threading.Lock()

    def emit(self, item: object) -> None:
        with self._listen_lock:
            if self._listener is None:
                self.events.put(item)
                return
        self._listener(item)

    def listen(self, callback: Callable[[object], None]) -> None:
        with self._listen_lock:
            while True:
                try:
                    callback(self.events.get_nowait())
                except queue.Empty:
                    break
            self._listener = callback

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.events.get()
            if isinstance(item, Completion):
                self.completion = item
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self) -> Completion:
        for _ in self:
            pass
        return self.completion


class RequestHandle(EventStream):
    """A request submitted to an Engine."""

    def __init__(self, prompt_ids: list[int], adapters: list[SparseAdapter], params: SamplingParams) -> None:
        super().__init__()
        self.prompt_ids = prompt_ids
        self.adapters = adapters
        self.params = params
        self.cancelled = threading.Event()
        self.submitted_at = time.monotonic()

    def cancel(self) -> None:
        self.cancelled.set()


class AdapterCache:
    """Loaded adapters, least recently used evicted first once their bytes pass the capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[str, SparseAdapter] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> SparseAdapter | None:
        with self.lock:
            adapter = self.entries.get(key)
            if adapter is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return adapter

    def put(self, key: str, adapter: SparseAdapter) -> None:
        with self.lock:
            if key in self.entries:
                self.bytes -= self.entries.pop(key).nbytes()
            self.entries[key] = adapter
            self.bytes += adapter.nbytes()
            while self.bytes > self.capacity_bytes and len(self.entries) > 1:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= evicted.nbytes()
                self.evictions += 1

    def __contains__(self, key: str) -> bool:
        return key in self.entries


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, handle: RequestHandle, device: torch.device) -> None:
        self.handle = handle
        self.params = handle.params
        self.produced: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.params.seed if self.params.seed is not None else torch.seed())

    def sample(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int, tokenizer, eos: set[int]) -> None:
        """Take one token: emit the text that is safe to show, or finish."""
        if token in eos and not self.params.ignore_eos:
            self.finish = "stop"
            return
        self.produced.append(token)
        self.text = tokenizer.decode(self.produced, skip_special_tokens=True)
        stops = [s for s in self.params.stop if s]
        cut = min((self.text.find(s) for s in stops if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"
            return
        if len(self.produced) >= self.params.max_new_tokens:
            self.finish = "length"
            return
        # Hold back a tail that may begin a stop string, and a half-decoded UTF-8 character.
        safe = len(self.text) - max((len(s) - 1 for s in stops), default=0)
        if self.text.endswith("\ufffd"):
            safe = min(safe, len(self.text) - 1)
        if safe > self.emitted:
            self.handle.emit(self.text[self.emitted:safe])
            self.emitted = safe

    def close(self, reason: str | None = None) -> None:
        finish = reason or self.finish or "length"
        if len(self.text) > self.emitted and finish != "cancelled":
            self.handle.emit(self.text[self.emitted:])
        self.handle.emit(Completion(self.text, len(self.handle.prompt_ids), len(self.produced), finish,
                                    self.logprobs))

    def record_logprob(self, token: int, logprobs: torch.Tensor, tokenizer) -> None:
        """Keep the log-probability of `token` (already in `produced`) and the top alternatives."""
        assert self.logprobs is not None and self.params.logprobs is not None
        top = logprobs.topk(self.params.logprobs) if self.params.logprobs else None
        alternatives = [] if top is None else [(tokenizer.decode([int(t)]), float(v))
                                               for v, t in zip(top.values, top.indices, strict=True)]
        self.logprobs.append(TokenLogprob(tokenizer.decode([token]), float(logprobs[token]), alternatives))


class Engine:
    def __init__(self, base: BaseModel, *, max_batch_size: int = 8, max_queue: int = 64,
                 cache_bytes: int = 1 << 30, merge_single: bool = True) -> None:
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.device = base.device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.merge_single = merge_single and base.quantization == "none"
        self.cache = AdapterCache(cache_bytes)
        self.regions = RegionCache()
        self.hooks = RowAdapterHooks(self.model)
        self.pending: deque[RequestHandle] = deque()
        self.cv = threading.Condition()
        self.running = True
        self.stats = {"batches": 0, "merged_batches": 0, "mixed_batches": 0, "generated_tokens": 0}
        self.step_seconds = 0.05  # running estimate, for Retry-After
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        self.eos = {t for t in [self.tokenizer.eos_token_id, *configured] if t is not None}
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"engine-{base.name}")
        self.thread.start()

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
               params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; QueueFull when the queue is at its bound, ValueError for overlapping adapters."""
        adapters = list(adapters)
        if len(adapters) > 1:
            check_disjoint(adapters)
        handle = RequestHandle(list(prompt_ids), adapters, params or SamplingParams())
        with self.cv:
            if len(self.pending) >= self.max_queue:
                batches_ahead = len(self.pending) / self.max_batch_size + 1
                raise QueueFull(max(1, round(batches_ahead * self.step_seconds * handle.params.max_new_tokens)))
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
                while self.running and not self.pending:
                    self.cv.wait()
                if not self.running:
                    return
                batch: list[RequestHandle] = []
                while self.pending and len(batch) < self.max_batch_size:
                    handle = self.pending.popleft()
                    if handle.cancelled.is_set():
                        handle.emit(Completion("", len(handle.prompt_ids), 0, "cancelled"))
                    else:
                        batch.append(handle)
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as exc:  # the batch fails, the engine keeps serving
                for handle in batch:
                    handle.emit(exc)

    def _run(self, batch: list[RequestHandle]) -> None:
        self.stats["batches"] += 1
        sets = {tuple(id(a) for a in h.adapters) for h in batch}
        if len(sets) == 1 and (self.merge_single or not batch[0].adapters):
            self.stats["merged_batches"] += 1
            merged = merge_adapters(self.model, batch[0].adapters, self.regions) if batch[0].adapters else None
            try:
                self._decode(batch)
            finally:
                if merged is not None:
                    merged.unmerge()
            return
        self.stats["mixed_batches"] += 1
        self.hooks.active = build_banks([h.adapters for h in batch], self.hooks.shapes(), self.device)
        try:
            self._decode(batch)
        finally:
            self.hooks.active = {}

    @torch.no_grad()
    def _decode(self, batch: list[RequestHandle]) -> None:
        rows = [_Row(h, self.device) for h in batch]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(len(h.prompt_ids) for h in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, h in enumerate(batch):  # left padding: every row's next token sits in the last column
            ids[i, longest - len(h.prompt_ids):] = torch.tensor(h.prompt_ids)
            mask[i, longest - len(h.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        while rows:
            started = time.perf_counter()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{CACHE_FIELD: cache})
            cache = getattr(out, CACHE_FIELD)
            logits = out.logits[:, -1]  # (B, V)
            greedy = logits.argmax(-1).tolist()
            for i, row in enumerate(rows):
                if row.handle.cancelled.is_set():
                    row.finish = "cancelled"
                    continue
                token = greedy[i] if row.params.temperature <= 0 else row.sample(logits[i])
                produced = len(row.produced)
                row.push(token, self.tokenizer, self.eos)
                if row.logprobs is not None and len(row.produced) > produced:  # a token kept, not EOS
                    row.record_logprob(token, torch.log_softmax(logits[i].float(), dim=-1), self.tokenizer)
            self.stats["generated_tokens"] += len(rows)
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * (time.perf_counter() - started)
            keep = [i for i, row in enumerate(rows) if row.finish is None]
            for row in rows:
                if row.finish is not None:
                    row.close(row.finish)
            if not keep:
                return
            next_tokens = torch.tensor([[rows[i].produced[-1]] for i in keep], device=self.device)
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, positions = mask.index_select(0, index), positions.index_select(0, index)
                if self.hooks.active:
                    self.hooks.select_rows(index)
                rows = [rows[i] for i in keep]
            ids = next_tokens
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
