"""Decoding on a fixed KV cache: one slot per row, each row writing at its own position.

transformers' dynamic cache grows by concatenation at every step, and rows of
different lengths share it only through left padding. A `SlotCache` holds keys
and values for `capacity` rows per layer, one slot per row: the running batch's
row i lives in slot i, its token at position p in column p. A decode step
writes each row's new key and value at that row's own position (one indexed
write per layer) and masks each row's attention to the columns it has filled,
so rows of any lengths share a step; a row that joins is a copy of its prompt's
keys and values into a free slot, a row that finishes frees its slot (the rows
behind it move up, as the adapter slots do).

Attention reads only the first `window` columns (the longest row's length
rounded up to a power of two, at least `MIN_WINDOW`); columns are allocated as
windows need them, up to `max_len`. For a given number of rows and window,
every tensor a step touches keeps its address and shape, which is what
replaying the step as a CUDA graph needs (`DecodeGraphs`).

Used for model families whose attention takes a prepared 4-D mask and reads
positions from `position_ids` (`supports_slot_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from sbora_core.serving.decoding import CACHE_FIELD, Batch, Row
from sbora_core.serving.generation import RequestHandle

log = logging.getLogger(__name__)

MIN_WINDOW = 64  # windows are powers of two from here: few distinct shapes, hence few graphs
SLOT_CACHE_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}  # rotary positions from position_ids, 4-D masks


def supports_slot_cache(model: nn.Module) -> bool:
    """Whether decoding on a slot cache answers as on the dynamic cache, and can be captured: a family
    that takes positions from position_ids and a prepared 4-D mask, an attention that honours that
    mask, no sliding window, and no rotary embedding that recomputes its frequencies from the
    positions it sees (dynamic and longrope scaling: a host sync, and state a graph would freeze)."""
    config: Any = model.config
    rope_types: set[str] = set()
    for module in model.modules():
        kind = getattr(module, "rope_type", None)  # a dict by layer type in some families (Gemma 3)
        rope_types.update(kind.values() if isinstance(kind, dict) else [kind] if kind else [])
    return (config.model_type in SLOT_CACHE_FAMILIES and not getattr(config, "sliding_window", None)
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and not any("dynamic" in str(t) or t == "longrope" for t in rope_types))


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values, (capacity, heads, columns, head_dim); allocated on the
    first prompt copied in, where its heads, head size and dtype are known."""

    is_compileable = True

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        capacity, columns = self.owner.capacity, self.owner.columns
        heads = key_states.shape[1]
        self.keys = key_states.new_zeros(capacity, heads, columns, key_states.shape[-1])
        self.values = value_states.new_zeros(capacity, heads, columns, value_states.shape[-1])
        self.is_initialized = True

    def grow(self, columns: int) -> None:
        """Room for `columns` positions per row, what the rows hold kept."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            if old is not None:
                new = old.new_zeros(*old.shape[:2], columns, old.shape[-1])
                new[:, :, : old.shape[2]] = old
                setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's key and value of each of the first n rows at its position; the first n rows'
        first `window` columns go to attention. key_states (n, heads, 1, head_dim)."""
        assert self.keys is not None and self.values is not None
        n, window = key_states.shape[0], self.owner.window
        rows, columns = self.owner.rows[:n], self.owner.positions[:n]
        self.keys[rows, :, columns] = key_states[:, :, 0]  # (n, heads, head_dim)
        self.values[rows, :, columns] = value_states[:, :, 0]
        return self.keys[:n, :, :window], self.values[:n, :, :window]

    def copy_in(self, slot: int, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Slot `slot`'s first `length` columns take these (heads, length, head_dim) keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(keys[None], values[None])
        assert self.keys is not None and self.values is not None
        self.keys[slot, :, :length] = keys
        self.values[slot, :, :length] = values

    def move(self, to: torch.Tensor, source: torch.Tensor) -> None:
        if self.keys is not None and self.values is not None:
            self.keys[to] = self.keys[source]
            self.values[to] = self.values[source]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.window, 0

    def get_seq_length(self) -> int:
        raise RuntimeError("a slot cache's rows have their own lengths: pass position_ids")

    def get_max_length(self) -> int:
        return self.owner.max_len


class SlotCache(Cache):
    """Keys and values of up to `capacity` rows of up to `max_len` positions each.

    Columns are allocated as the longest row needs them, doubling (a power of two, as the window), so
    memory follows the lengths served rather than `max_len`. Growing moves the tensors: `generation`
    counts the moves, and graphs captured before one are dropped."""

    def __init__(self, num_layers: int, capacity: int, max_len: int, device: torch.device) -> None:
        self.capacity, self.max_len = capacity, max_len
        self.slot_layers = [SlotLayer(self) for _ in range(num_layers)]
        super().__init__(layers=list(self.slot_layers))
        self.rows = torch.arange(capacity, device=device)
        self.positions = torch.zeros(capacity, dtype=torch.long, device=device)  # where each row writes next
        self.lengths = [0] * capacity  # the same, on the host: the window is chosen without a sync
        self.window = self.columns = min(MIN_WINDOW, max_len)
        self.generation = 0

    def span(self, columns: int) -> int:
        """`columns` rounded up to a power of two, at least MIN_WINDOW, at most max_len."""
        return min(self.max_len, max(MIN_WINDOW, 1 << (columns - 1).bit_length()))

    def reserve(self, columns: int) -> None:
        """At least `columns` positions allocated per row (up to max_len)."""
        if columns <= self.columns:
            return
        self.columns = self.span(columns)
        for layer in self.slot_layers:
            layer.grow(self.columns)
        self.generation += 1

    def load(self, slot: int, prefill: Any, row: int, length: int) -> None:
        """Slot `slot` takes a prompt's keys and values: row `row` of a prefill's dynamic cache, whose
        last `length` columns are the prompt (left padding before them)."""
        if length >= self.max_len:
            raise ValueError(f"a prompt of {length} tokens does not fit a cache of {self.max_len} positions")
        self.reserve(length + 1)
        for mine, theirs in zip(self.slot_layers, prefill.layers, strict=True):
            mine.copy_in(slot, theirs.keys[row, :, -length:], theirs.values[row, :, -length:], length)
        self.positions[slot] = length
        self.lengths[slot] = length

    def move(self, to: list[int], source: list[int]) -> None:
        """Slots `to` take the rows in slots `source` (rows behind finished ones move up)."""
        to_t, source_t = (torch.tensor(s, device=self.rows.device) for s in (to, source))
        for layer in self.slot_layers:
            layer.move(to_t, source_t)
        self.positions[to_t] = self.positions[source_t]
        lengths = list(self.lengths)
        for t, s in zip(to, source, strict=True):
            lengths[t] = self.lengths[s]
        self.lengths = lengths

    def free(self, slots: range) -> None:
        """These slots hold no row: they write at column 0 if a padded step runs them."""
        for slot in slots:
            self.lengths[slot] = 0
        self.positions[slots.start:slots.stop] = 0

    def set_window(self, n: int) -> int:
        """The columns the next step's n rows attend to: enough for the longest (the column it writes
        included), at most twice as many."""
        self.window = self.span(max(self.lengths[:n], default=0) + 1)
        self.reserve(self.window)
        return self.window

    def advance(self, n: int) -> None:
        """The first n rows took a step: their next write is one column on."""
        self.positions[:n] += 1
        for i in range(n):
            self.lengths[i] += 1

    def mask(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """(n, 1, 1, window) additive mask: row i attends to columns 0 .. positions[i]."""
        columns = torch.arange(self.window, device=self.rows.device)
        allowed = columns[None, :] <= self.positions[:n, None]
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None, None, :]


def decode_step(model: nn.Module, cache: SlotCache, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits (n, vocab) of one step for the first n = len(ids) rows; ids (n, 1). Writes their keys and
    values at their positions; `cache.advance` moves them on afterwards."""
    n = ids.shape[0]
    out = model(input_ids=ids, attention_mask=cache.mask(n, dtype), position_ids=cache.positions[:n, None],
                use_cache=True, **{CACHE_FIELD: cache})
    return out.logits[:, -1]


class DecodeGraphs:
    """Decode steps captured as CUDA graphs, one per (rows, window, adapter layout): a step copies its
    token ids into the graph's input buffer and replays it, one launch for the whole model.

    Rows are padded up to a power of two; the padding rows are free slots (position 0), whose outputs
    nobody reads. A graph is captured the first time its key is seen, after warm-up steps on a side
    stream, as PyTorch's CUDA graph notes prescribe. Warm-up and capture use this object's own
    stream (engines of other models capture on theirs) on the cache's device. Graphs that can no
    longer replay are dropped: all of them when the cache grows (its tensors moved), those of older
    adapter layouts when the row banks change theirs. A capture that fails turns capturing off: the
    steps then run eagerly, and the log says why. With `capture=False` the same padded steps run
    eagerly (the tests' way to check the padding on a machine without a GPU)."""

    def __init__(self, cache: SlotCache, step: Callable[[torch.Tensor], torch.Tensor], capacity: int,
                 capture: bool = True) -> None:
        self.cache, self.step, self.capacity, self.capture = cache, step, capacity, capture
        self.ids = torch.zeros(capacity, 1, dtype=torch.long, device=cache.rows.device)
        self.graphs: dict[tuple[int, int, Any], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None
        self.generation = cache.generation
        self.layout: Any = None  # the latest adapter layout a graph was captured for
        self.stream = torch.cuda.Stream(device=cache.rows.device) if capture else None

    def bucket(self, n: int) -> int:
        return min(self.capacity, 1 << (n - 1).bit_length())

    def run(self, ids: torch.Tensor, layout: Any) -> torch.Tensor:
        n = ids.shape[0]
        rows = self.bucket(n)
        self.cache.set_window(rows)
        if self.generation != self.cache.generation:  # the cache grew: its tensors moved
            self._drop(lambda key: True)
            self.generation = self.cache.generation
        if layout is not None and layout != self.layout:  # the row banks were added to or widened
            self._drop(lambda key: key[2] is not None)
            self.layout = layout
        self.ids[:n].copy_(ids)
        if not self.capture:
            return self.step(self.ids[:rows])[:n]
        key = (rows, self.cache.window, layout)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(rows)
            except Exception:  # a step that cannot be captured still decodes, eagerly
                log.exception("capturing a decode step as a CUDA graph failed; decoding eagerly from now on")
                self._drop(lambda key: True)
                self.capture = False
                return self.step(self.ids[:rows])[:n]
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]

    def _drop(self, which: Callable[[tuple[int, int, Any]], bool]) -> None:
        for key in [k for k in self.graphs if which(k)]:
            del self.graphs[key]
        if not self.graphs:
            self.pool = None  # a pool no graph uses any more cannot be shared by the next capture

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        assert self.stream is not None
        with torch.cuda.device(self.cache.rows.device):
            # Warm-up steps on the capture's own stream (lazy per-stream set-up, cuBLAS workspaces,
            # happens here, outside the graph's pool). They write keys and values at the rows'
            # current positions, as the replay will: the same columns, overwritten by the real step.
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                for _ in range(2):
                    self.step(self.ids[:rows])
            torch.cuda.current_stream().wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: request threads may load adapters onto the device meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                logits = self.step(self.ids[:rows])
            self.pool = graph.pool()
        return graph, logits


class SlotBatch:
    """The running batch on a `SlotCache`: row i in slot i (what `decoding.Batch` is on a dynamic cache)."""

    joinable = True

    def __init__(self, cache: SlotCache) -> None:
        self.cache = cache
        self.rows: list[Row] = []
        self.next_ids = torch.zeros((0, 1), dtype=torch.long, device=cache.rows.device)
        cache.free(range(cache.capacity))

    @property
    def handles(self) -> list[RequestHandle]:
        return [row.handle for row in self.rows]

    def add(self, fresh: Batch) -> None:
        """The rows of `fresh` (prompts just prefilled on a dynamic cache) take the next free slots."""
        n = len(self.rows)
        for j, row in enumerate(fresh.rows):
            self.cache.load(n + j, fresh.cache, j, len(row.handle.prompt_ids))
        self.rows = self.rows + fresh.rows
        self.next_ids = torch.cat([self.next_ids, fresh.next_ids])

    def keep(self, keep: list[int]) -> None:
        """Only these rows stay; the ones behind a finished row move up into its slot."""
        moves = [(i, source) for i, source in enumerate(keep) if i != source]
        if moves:
            self.cache.move([i for i, _ in moves], [s for _, s in moves])
        self.cache.free(range(len(keep), len(self.rows)))
        index = torch.tensor(keep, dtype=torch.long, device=self.next_ids.device)
        self.next_ids = self.next_ids.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
