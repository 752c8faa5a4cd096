"""The generation engines in a process of their own, and the API's handle on it.

Decoding a small model is Python-bound: in the API process it would hold the
GIL for most of every step and stall every other request (under load, p99 of
plain GETs rose from milliseconds to seconds). So one child process holds the
base models and their `sbora_core.serving.engine.Engine`s; the API sends it requests
and receives text pieces over two multiprocessing queues:

    API -> engine  ("submit", rid, model_id, model_source, adapters, prompt, messages, params, tenant)
                   ("cancel", rid) | ("warm", model_id, model_source) | ("stop",)
    engine -> API  (rid, "accepted")  then  (rid, "text", str)...  (rid, "done", Completion)
                   or (rid, "invalid", field, message) | (rid, "queue_full", seconds, message)
                   | (rid, "over_limit", field, setting, message)
                   | (rid, "integrity", message) | (rid, "failed", message)
                   ("", "warm", model_id) once a model is loaded and has run a forward

A child that dies fails the requests in flight with an error, and the next
request starts a new one. The child imports sbora_core and nothing of the
service: no web framework, no database layer.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.config import get_settings
from app.core.processes import engine_start_context, exit_reason
from app.errors import Invalid, without_paths
from sbora_core.method.adapter_io import AdapterMismatchError
from sbora_core.serving.admission import OverLimit, QueueFull
from sbora_core.serving.engine import AdapterIntegrityError
from sbora_core.serving.generation import Completion, EventStream, SamplingParams

log = logging.getLogger("app.engine")


class EngineStopped(RuntimeError):
    """The engine process ended while a request was in flight."""


class RequestRejected(ValueError):
    """Raised in the child: the request cannot be served as asked; `field` names what to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclass
class EngineLimits:
    """What the child needs from the settings (passed explicitly: tests change settings in memory)."""

    max_batch_size: int
    max_queue: int
    cache_bytes: int
    torch_threads: int
    model_cache: Path | None = None  # where base models are kept (SBORA_MODEL_CACHE)
    max_prompt_tokens: int = 0  # per request (SBORA_ENGINE_MAX_PROMPT_TOKENS); 0: the model's context
    max_tenant_prompt_tokens: int = 0  # per tenant in flight (SBORA_ENGINE_MAX_TENANT_PROMPT_TOKENS); 0: none


@dataclass
class AdapterRef:
    id: str
    path: str
    weights_sha256: str | None
    weight: float = 1.0  # its update is multiplied by this (composition with per-adapter weights)


class RemoteRequest(EventStream):
    """A request in the engine process, as seen from the API: the same events as a local one."""

    def __init__(self, client: EngineProcess, rid: str) -> None:
        super().__init__()
        self.client, self.rid = client, rid
        self.reply: queue.Queue = queue.Queue(maxsize=1)  # None once accepted, or the refusal
        self.accepted = False

    def cancel(self) -> None:
        self.client.send(("cancel", self.rid))


class EngineProcess:
    """The API's client for one engine child process."""

    def __init__(self, limits: EngineLimits, models: list[str] | None = None) -> None:
        context = engine_start_context(models or [])
        self.requests = context.Queue()
        self.replies = context.Queue()
        self.process = context.Process(target=serve, args=(self.requests, self.replies, limits),
                                       name="sbora-engine", daemon=True)
        self.process.start()
        self.inflight: dict[str, RemoteRequest] = {}
        self.cache_stats: dict[str, int] = {}  # the child's adapter cache counters, sent after each submit
        self.warm: set[str] = set()  # models the child has loaded and run
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read_replies, name="engine-replies", daemon=True)
        self.reader.start()

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message: tuple) -> None:
        self.requests.put(message)

    def warm_up(self, models: dict[str, str]) -> None:
        """Load these models (id -> source) now, before any request asks for them."""
        for model_id, source in models.items():
            self.send(("warm", model_id, source))

    def submit(self, model_id: str, model_source: str, adapters: list[AdapterRef], prompt: str | list[int] | None,
               messages: list[dict[str, str]] | None, params: SamplingParams, tenant: str = "") -> RemoteRequest:
        """Queue a request; raises what the engine refused it for (blocking: call in a thread).
        `model_source` is what sbora_core loads `model_id` from (a name or a directory)."""
        request = RemoteRequest(self, secrets.token_hex(8))
        with self.lock:
            self.inflight[request.rid] = request
        self.send(("submit", request.rid, model_id, model_source, adapters, prompt, messages, params, tenant))
        while True:  # the first request also waits for the child to start and load the model
            try:
                outcome = request.reply.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.alive():
                    raise EngineStopped("the generation engine stopped; retry the request") from None
        if isinstance(outcome, BaseException):
            raise outcome
        return request

    def close(self) -> None:
        if self.alive():
            self.send(("stop",))
            self.process.join(timeout=30)
        if self.alive():
            self.process.kill()
            self.process.join()
        self._fail_all()
        self.reader.join(timeout=5)  # it sees the process gone within a second
        for channel in (self.requests, self.replies):
            channel.close()
            channel.join_thread()

    def _read_replies(self) -> None:
        while True:
            try:
                rid, kind, *rest = self.replies.get(timeout=1.0)
            except queue.Empty:
                if not self.alive():
                    self._fail_all()
                    return
                continue
            except (EOFError, OSError):
                self._fail_all()
                return
            if kind == "cache_stats":
                self.cache_stats = rest[0]
                continue
            if kind == "warm":
                self.warm.add(rest[0])
                continue
            with self.lock:
                request = self.inflight.get(rid)
                if request is not None and kind not in ("accepted", "text"):
                    del self.inflight[rid]
            if request is not None:
                self._deliver(request, kind, rest)

    @staticmethod
    def _deliver(request: RemoteRequest, kind: str, rest: list) -> None:
        if kind == "accepted":
            request.accepted = True
            request.reply.put(None)
        elif kind in ("text", "done"):
            request.emit(rest[0])
        elif request.accepted:  # failed while decoding
            request.emit(RuntimeError(rest[0]))
        else:
            request.reply.put(_refusal(kind, rest))

    def _fail_all(self) -> None:
        with self.lock:
            requests, self.inflight = list(self.inflight.values()), {}
        for request in requests:
            stopped = EngineStopped("the generation engine stopped; retry the request")
            if request.accepted:
                request.emit(stopped)
            else:
                request.reply.put(stopped)


def _refusal(kind: str, rest: list) -> BaseException:
    if kind == "invalid":
        return Invalid(rest[0], rest[1])
    if kind == "queue_full":
        return QueueFull(rest[0], rest[1])
    if kind == "over_limit":
        return OverLimit(*rest)
    if kind == "integrity":
        return AdapterIntegrityError(rest[0])
    return RuntimeError(rest[0])


# -- the API's one engine process ---------------------------------------------------------------
_engine: EngineProcess | None = None
_engine_lock = threading.Lock()


_warm_models: dict[str, str] = {}  # what every new engine process loads at once (id -> source)


def get_engine_process() -> EngineProcess:
    """The engine process, started on first use and again after it died (warmed up again)."""
    global _engine
    with _engine_lock:
        if _engine is None or not _engine.alive():
            if _engine is not None:
                log.error("the generation engine process (pid %s) %s; starting a new one", _engine.process.pid,
                          exit_reason(_engine.process.exitcode))
                _engine.close()
            settings = get_settings()
            _engine = EngineProcess(EngineLimits(settings.engine_max_batch_size, settings.engine_max_queue,
                                                 settings.adapter_cache_bytes, settings.resolved_torch_threads,
                                                 settings.model_cache, settings.engine_max_prompt_tokens,
                                                 settings.engine_max_tenant_prompt_tokens),
                                    models=[*settings.models, *_warm_models.values()])
            _engine.warm_up(_warm_models)
        return _engine


def warm_engines(models: dict[str, str]) -> None:
    """Start the engine process now and load `models` in it (id -> source), and again after restarts."""
    _warm_models.clear()
    _warm_models.update(models)
    get_engine_process()


def engines_warm(models: list[str]) -> list[str]:
    """Which of `models` the running engine process has not loaded yet."""
    engine = _engine
    warm = engine.warm if engine is not None and engine.alive() else set()
    return [m for m in models if m not in warm]


class EngineWatchdog(threading.Thread):
    """Restarts an engine process that died, without waiting for the next request to notice; one
    that keeps dying is restarted after 1, 2, 4 ... up to 30 s."""

    def __init__(self, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="engine-watchdog")
        self.interval_s = interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        failures, last_start = 0, time.monotonic()
        while not self.stop_event.wait(self.interval_s):
            engine = _engine
            if engine is None or engine.alive():
                continue
            failures = 0 if time.monotonic() - last_start >= 60 else failures + 1
            if failures and self.stop_event.wait(min(30.0, 2.0 ** (failures - 1))):
                return
            try:
                get_engine_process()
            except Exception:  # could not even start: try again next round
                log.exception("could not restart the generation engine process")
            last_start = time.monotonic()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


def reset_engines() -> None:
    """Stop the engine process (tests and shutdown); the next generation starts a fresh one."""
    global _engine
    with _engine_lock:
        if _engine is not None:
            _engine.close()
        _engine = None


def engine_cache_stats() -> dict[str, int]:
    """The running engine's adapter cache counters (empty before the first generation)."""
    engine = _engine
    return dict(engine.cache_stats) if engine is not None else {}


# -- the child process ---------------------------------------------------------------------------

def serve(requests: multiprocessing.Queue, replies: multiprocessing.Queue, limits: EngineLimits) -> None:
    """The engine process: one Engine per base model, created on first use."""
    import torch

    from sbora_core.method.models import set_model_cache_dir

    torch.set_grad_enabled(False)
    torch.set_num_threads(limits.torch_threads)
    set_model_cache_dir(limits.model_cache)
    engines: dict[str, Any] = {}
    handles: dict[str, Any] = {}
    while True:
        message = requests.get()
        if message[0] == "stop":
            break
        if message[0] == "cancel":
            handle = handles.get(message[1])
            if handle is not None:
                handle.cancel()
            continue
        if message[0] == "warm":
            _, model_id, source = message
            try:
                engine = engines.get(model_id) or engines.setdefault(model_id, _new_engine(source, limits))
                engine.generate([engine.tokenizer.eos_token_id or 0], [], SamplingParams(max_new_tokens=1))
                replies.put(("", "warm", model_id))
            except Exception:  # the first request will meet (and report) the same problem
                log.exception("could not warm up %s", model_id)
            continue
        _, rid, model_id, source, adapters, prompt, messages, params, tenant = message
        try:
            engine = engines.get(model_id) or engines.setdefault(model_id, _new_engine(source, limits))
            handle = _submit(engine, adapters, prompt, messages, params, tenant)
        except Exception as exc:  # refused: the API turns it into the matching HTTP error
            replies.put((rid, *_classify(exc)))
            continue
        finally:
            replies.put(("", "cache_stats", _cache_stats(engines)))  # for /metrics
        handles[rid] = handle
        replies.put((rid, "accepted"))
        handle.listen(lambda item, rid=rid: _forward(replies, handles, rid, item))
    for engine in engines.values():
        engine.close()


def _cache_stats(engines: dict[str, Any]) -> dict[str, int]:
    caches = [e.cache for e in engines.values()]
    return {"hits": sum(c.hits for c in caches), "misses": sum(c.misses for c in caches),
            "evictions": sum(c.evictions for c in caches), "bytes": sum(c.bytes for c in caches)}


def _forward(replies: multiprocessing.Queue, handles: dict, rid: str, item: object) -> None:
    if isinstance(item, str):
        replies.put((rid, "text", item))
        return
    handles.pop(rid, None)
    if isinstance(item, Completion):
        replies.put((rid, "done", item))
    else:
        replies.put((rid, "failed", without_paths(f"generation failed: {item}")))


def _new_engine(source: str, limits: EngineLimits):
    from sbora_core.method.models import load_base_model
    from sbora_core.serving.engine import Engine

    return Engine(load_base_model(source), max_batch_size=limits.max_batch_size,
                  max_queue=limits.max_queue, cache_bytes=limits.cache_bytes,
                  max_prompt_tokens=limits.max_prompt_tokens, max_tenant_prompt_tokens=limits.max_tenant_prompt_tokens)


def _submit(engine, adapters: list[AdapterRef], prompt: str | list[int] | None,
            messages: list[dict[str, str]] | None, params: SamplingParams, tenant: str):
    """Tokenise, check the context length, load and verify the adapters, queue."""
    from sbora_core.training.tokenization import render_chat

    tokenizer = engine.tokenizer
    if messages is not None:
        try:
            text = render_chat(tokenizer, messages, add_generation_prompt=True)
        except Exception as exc:  # the model's chat template refuses them (a jinja error, say)
            raise RequestRejected("messages", f"messages: the model's chat template cannot render them "
                                              f"({type(exc).__name__}: {exc})") from exc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, list):  # token ids, as lm-evaluation-harness sends them
        vocab = engine.model.get_input_embeddings().weight.shape[0]
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestRejected("prompt", f"prompt: token id {bad} is not in the model's vocabulary (0..{vocab - 1})")
        ids = list(prompt)
    else:
        ids = tokenizer(prompt or "")["input_ids"]
    vocab = engine.model.get_input_embeddings().weight.shape[0]
    outside = next((t for t in params.logit_bias if not 0 <= t < vocab), None)
    if outside is not None:
        raise RequestRejected("logit_bias", f"logit_bias: token id {outside} is not in the model's vocabulary "
                                            f"(0..{vocab - 1})")
    if not ids:
        raise RequestRejected("prompt", "prompt: empty")
    context = engine.base.context_length
    if len(ids) + params.max_new_tokens > context:
        raise RequestRejected("prompt", f"prompt: {len(ids)} tokens + max_new_tokens {params.max_new_tokens} "
                                        f"exceed the model's context of {context} tokens")
    loaded = [engine.weighted(engine.adapter(a.id, Path(a.path), a.weights_sha256), a.weight) for a in adapters]
    try:
        return engine.submit(ids, loaded, params, tenant)
    except OverLimit:
        raise
    except ValueError as exc:  # adapters whose index sets overlap
        raise RequestRejected("adapter_id", f"adapter_id: {exc}") from exc


def _classify(exc: Exception) -> tuple:
    if isinstance(exc, RequestRejected):
        return "invalid", exc.field, exc.message
    if isinstance(exc, QueueFull):
        return "queue_full", exc.retry_after_s, exc.reason
    if isinstance(exc, OverLimit):
        return "over_limit", exc.field, exc.setting, exc.message
    if isinstance(exc, (AdapterIntegrityError, AdapterMismatchError)):
        return "integrity", without_paths(str(exc))
    log.exception("generation request failed")
    return "failed", without_paths(f"generation failed: {type(exc).__name__}: {exc}")
