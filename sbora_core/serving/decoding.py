"""Decoding state for continuous batching: rows, the running batch and its KV cache, the fair queue.

The running batch holds one row per request and one KV cache for all of them,
left-padded so that every row's next token sits in the last column. A request
prefilled on its own (a long prompt, chunk by chunk) joins the batch by padding
the shorter of the two caches on the left and stacking them; a finished row
leaves at once, and columns no row needs any more are cut off the left. This
works on transformers' plain dynamic cache (one tensor of keys and values per
layer); models with other caches (sliding windows, say) are served one batch at
a time instead (`joinable`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from sbora_core.serving.generation import Completion, RequestHandle, TokenLogprob

# The KV cache's name in a forward's arguments and outputs: `cache` in recent transformers 5.x,
# `past_key_values` before (an older name now a deprecated alias).
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class Row:
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

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits (V) with its logit_bias and its presence and frequency penalties applied."""
        p = self.params
        adjusted = logits.float().clone()
        if p.logit_bias:
            tokens = torch.tensor(list(p.logit_bias), device=logits.device)
            adjusted[tokens] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        if self.produced and (p.presence_penalty or p.frequency_penalty):
            seen, counts = torch.tensor(self.produced, device=logits.device).unique(return_counts=True)
            adjusted[seen] -= p.frequency_penalty * counts.float() + p.presence_penalty
        return adjusted

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
                                    self.logprobs, self.handle.prompt_logprobs))

    def record_logprob(self, token: int, logprobs: torch.Tensor, tokenizer) -> None:
        """Keep the log-probability of the token drawn and the top alternatives."""
        assert self.logprobs is not None and self.params.logprobs is not None
        top = logprobs.topk(self.params.logprobs) if self.params.logprobs else None
        alternatives = [] if top is None else [(tokenizer.decode([int(t)]), float(v))
                                               for v, t in zip(top.values, top.indices, strict=True)]
        self.logprobs.append(TokenLogprob(tokenizer.decode([token]), float(logprobs[token]), alternatives))


def record_prompt_logprobs(handle: RequestHandle, logits: torch.Tensor, first: int, tokenizer) -> None:
    """Log-probabilities of prompt tokens first+1 .. first+len(logits) from logits (T, V) read at
    positions first .. (each position predicts the next prompt token; the last may predict none)."""
    assert handle.prompt_logprobs is not None and handle.params.prompt_logprobs is not None
    if first == 0:
        handle.prompt_logprobs[0] = TokenLogprob(tokenizer.decode([handle.prompt_ids[0]]), None)
    targets = handle.prompt_ids[first + 1: first + 1 + logits.shape[0]]
    if not targets:
        return
    logprobs = torch.log_softmax(logits[: len(targets)].float(), dim=-1)  # (n, V)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
    k = handle.params.prompt_logprobs
    top = logprobs.topk(k, dim=-1) if k else None
    for i, token in enumerate(targets):
        alternatives = [] if top is None else [(tokenizer.decode([int(t)]), float(v))
                                               for v, t in zip(top.values[i], top.indices[i], strict=True)]
        handle.prompt_logprobs[first + 1 + i] = TokenLogprob(tokenizer.decode([token]), chosen[i], alternatives)




def joinable(cache: Any) -> bool:
    """Whether rows can join and leave `cache` (every layer a plain dynamic layer of keys and values)."""
    from transformers.cache_utils import DynamicLayer

    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _pad_left(cache: Any, columns: int) -> None:
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, columns, 0))  # (B, H, T, D): zeros before the first column
        layer.values = F.pad(layer.values, (0, 0, columns, 0))


@dataclass
class Batch:
    """Rows decoded together: their cache, attention mask (B, T), next positions and tokens (B, 1)."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    next_ids: torch.Tensor

    @property
    def handles(self) -> list[RequestHandle]:
        return [row.handle for row in self.rows]

    @property
    def joinable(self) -> bool:
        return joinable(self.cache)

    def keep(self, keep: list[int]) -> None:
        """Only these rows stay (the others finished), and left columns none of them needs are cut."""
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions, self.next_ids = (t.index_select(0, index)
                                                        for t in (self.mask, self.positions, self.next_ids))
            self.rows = [self.rows[i] for i in keep]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if unused and joinable(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def join(self, other: Batch) -> None:
        """Take `other`'s rows in: the shorter cache is padded on the left, then the two are stacked."""
        short, long = sorted((self, other), key=lambda b: b.mask.shape[1])
        missing = long.mask.shape[1] - short.mask.shape[1]
        if missing:
            _pad_left(short.cache, missing)
            short.mask = F.pad(short.mask, (missing, 0))
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, other.mask])
        self.positions = torch.cat([self.positions, other.positions])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.rows = self.rows + other.rows


class FairQueue:
    """Waiting requests, one queue per tenant, taken in turn: a burst from one tenant does not starve
    the others."""

    def __init__(self) -> None:
        self.queues: OrderedDict[str, deque[RequestHandle]] = OrderedDict()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, handle: RequestHandle) -> None:
        self.queues.setdefault(handle.tenant, deque()).append(handle)
        self.size += 1

    def popleft(self) -> RequestHandle:
        """The oldest request of the tenant whose turn it is; that tenant goes to the back of the line."""
        tenant, waiting = next(iter(self.queues.items()))
        handle = waiting.popleft()
        self.size -= 1
        del self.queues[tenant]
        if waiting:
            self.queues[tenant] = waiting
        return handle
