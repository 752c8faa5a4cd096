"""A generation request as its caller sees it: sampling parameters, the stream of text pieces, the
completion (with per-token log-probabilities when asked for)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sbora_core.method.adapter import SparseAdapter


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)
    # The prompt's own tokens too (OpenAI's `echo` with `logprobs`): each token's log-probability
    # given the ones before it, and this many alternatives; None: off. The first token has none.
    prompt_logprobs: int | None = None
    # OpenAI's logit adjustments: `logit_bias` is added to those tokens' logits; each token already
    # generated lowers its logit by `frequency_penalty` per time drawn and `presence_penalty` once.
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class TokenLogprob:
    """One generated token with its log-probability, and the most likely alternatives at its place."""

    token: str
    logprob: float | None  # None for a prompt's first token: nothing precedes it
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length" or "cancelled"
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first has no logprob)


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

    def __init__(self, prompt_ids: list[int], adapters: list[SparseAdapter], params: SamplingParams,
                 tenant: str = "") -> None:
        super().__init__()
        self.prompt_ids = prompt_ids
        self.adapters = adapters
        self.params = params
        self.tenant = tenant  # whose request: the engine admits tenants in turn
        self.cancelled = threading.Event()
        self.submitted_at = time.monotonic()
        self.on_finish: Callable[[], None] | None = None  # called once, before the last event (admission)
        # Filled while the prompt is read, when params.prompt_logprobs asks for it.
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] * len(prompt_ids) if params.prompt_logprobs is not None else None)

    def emit(self, item: object) -> None:
        if isinstance(item, (Completion, BaseException)) and self.on_finish is not None:
            on_finish, self.on_finish = self.on_finish, None
            on_finish()
        super().emit(item)

    @property
    def adapter_set(self) -> tuple[int, ...]:
        """Identifies the adapters it applies (requests with equal sets can share merged weights)."""
        return tuple(id(a) for a in self.adapters)

    def cancel(self) -> None:
        self.cancelled.set()
