"""Reading a long prompt in chunks bounded by time, into a KV cache that grows without recopying.

A chunk of a fixed token count costs more the further into the prompt it is (each
token attends to every earlier one), so at 8,000 tokens a 256-token chunk held the
engine for seconds and every running stream and waiting tenant with it. The sizer
picks each chunk's length from the time the previous chunk took per token, so that
one chunk takes about `budget_s`: decode steps and short prompts get the engine
between chunks at a steady cadence however long the prompt is.

transformers' dynamic cache concatenates every chunk onto the keys and values read
so far, which copies the whole cache per chunk (quadratic in the prompt's length:
minutes for 8,000 tokens in small chunks). `GrowingCache` keeps each layer in a
buffer of doubling capacity and hands the model views of it.
"""

from __future__ import annotations

from typing import Any

import torch


class ChunkSizer:
    """The next prefill chunk's length in tokens, so that it takes about `budget_s`.

    A forward costs `overhead_s` however few tokens it reads (a decode step's time, which the engine
    sets) plus a cost per token that grows with the position. Where the overhead alone nears the
    budget (a small model on a busy CPU), chunks are sized to take about two decode steps instead:
    chunks of a token or two would spend the engine on overhead and read the prompt at a crawl."""

    def __init__(self, budget_s: float = 0.075, max_tokens: int = 256, min_tokens: int = 8) -> None:
        self.budget_s, self.max_tokens, self.min_tokens = budget_s, max_tokens, max(1, min(min_tokens, max_tokens))
        self.overhead_s = 0.0
        self.seconds_per_token: float | None = None  # past the overhead, in the last chunk

    def next(self, remaining: int) -> int:
        if self.seconds_per_token is None:
            size = self.max_tokens
        else:
            room = max(self.budget_s - self.overhead_s, self.overhead_s)
            size = int(room / max(self.seconds_per_token, 1e-9) + 1e-6)  # 49.9999 is 50
        return max(1, min(remaining, max(self.min_tokens, min(self.max_tokens, size))))

    def observe(self, tokens: int, seconds: float) -> None:
        self.seconds_per_token = max(seconds - self.overhead_s, 0.1 * seconds) / max(1, tokens)


class _Growing:
    """GrowingLayer, defined on first use: transformers is imported only when a prompt is read."""

    layer: Any = None


def _growing_layer() -> Any:
    if _Growing.layer is not None:
        return _Growing.layer
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """Keys and values (B, H, T, D) kept in a buffer of doubling capacity; `keys`/`values` are views."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buffers = [key_states[..., :0, :], value_states[..., :0, :]]
                self.length = 0
            new = key_states.shape[-2]
            if self.length + new > self.buffers[0].shape[-2]:  # grow: one copy per doubling
                capacity = max(2 * (self.length + new), 64)
                grown = []
                for old, fresh in zip(self.buffers, (key_states, value_states), strict=True):
                    buffer = fresh.new_empty((*fresh.shape[:-2], capacity, fresh.shape[-1]))
                    buffer[..., : self.length, :] = old[..., : self.length, :]
                    grown.append(buffer)
                self.buffers = grown
            end = self.length + new
            self.buffers[0][..., self.length:end, :] = key_states
            self.buffers[1][..., self.length:end, :] = value_states
            self.length = end
            self.keys, self.values = self.buffers[0][..., :end, :], self.buffers[1][..., :end, :]
            return self.keys, self.values

    _Growing.layer = GrowingLayer
    return GrowingLayer


def growing_cache(config: Any) -> Any:
    """A dynamic cache for `config`'s model whose layers append into buffers instead of concatenating;
    None where the model's cache has layers of other kinds (sliding windows), which keep their own."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [_growing_layer()() for _ in cache.layers]
    return cache


def settle(cache: Any) -> Any:
    """The same keys and values in plain dynamic layers, as the running batch joins and trims them."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(getattr(cache, "layers", None) or []):
        if not isinstance(layer, _growing_layer()) or not layer.is_initialized:
            continue
        plain = DynamicLayer()
        plain.lazy_initialization(layer.keys, layer.values)
        plain.keys, plain.values = layer.keys.contiguous(), layer.values.contiguous()
        cache.layers[i] = plain
    return cache
