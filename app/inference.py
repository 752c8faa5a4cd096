"""Generation inside the API process: one resident copy of each base model, adapters merged per request.

Requests run one at a time under a lock: the adapter(s) are merged regionally
into the live weights, the model generates, and the regions are restored bit
for bit. Adapters are verified (sha256 of their weights file and the base
model's fingerprint) before their first use and then kept in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app import catalog


class AdapterIntegrityError(ValueError):
    """The stored adapter file does not match its recorded sha256."""


@dataclass
class AdapterRef:
    id: str
    directory: Path
    weights_sha256: str


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Generator:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bases: dict[str, Any] = {}
        self.adapters: dict[str, Any] = {}
        self.regions: dict[str, Any] = {}

    def base(self, model_id: str):
        from sbora_core.merge import RegionCache
        from sbora_core.models import load_base_model

        if model_id not in self.bases:
            self.bases[model_id] = load_base_model(catalog.source_of(model_id))
            self.regions[model_id] = RegionCache()
        return self.bases[model_id]

    def adapter(self, ref: AdapterRef, fingerprint: str):
        from app.storage import sha256_file
        from sbora_core.adapter_io import WEIGHTS_FILE, AdapterMismatchError, load_adapter

        cached = self.adapters.get(ref.id)
        if cached is None:
            if sha256_file(ref.directory / WEIGHTS_FILE) != ref.weights_sha256:
                raise AdapterIntegrityError(f"adapter {ref.id}: stored weights do not match their sha256")
            cached = self.adapters[ref.id] = load_adapter(ref.directory)
        if cached.fingerprint != fingerprint:
            raise AdapterMismatchError(f"adapter {ref.id} belongs to base model {cached.fingerprint}, not {fingerprint}")
        return cached

    def prompt_ids(self, model_id: str, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
        from sbora_core.data import render_chat

        tokenizer = self.base(model_id).tokenizer
        if messages is not None:
            text = render_chat(tokenizer, messages, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(prompt or "")["input_ids"]

    def load(self, model_id: str, refs: list[AdapterRef]) -> list[Any]:
        """Verified adapters for a request; raises before any generation if they cannot be used together."""
        from sbora_core.merge import check_disjoint

        with self.lock:
            base = self.base(model_id)
            adapters = [self.adapter(ref, base.fingerprint) for ref in refs]
        check_disjoint(adapters)
        return adapters

    def stream(self, model_id: str, adapters: list[Any], ids: list[int], max_new_tokens: int,
               temperature: float, top_p: float, stop: list[str], seed: int | None) -> Iterator[str | Completion]:
        """Yield text pieces as they are decoded, then a final Completion."""
        from sbora_core.merge import merge_adapters

        with self.lock:
            base = self.base(model_id)
            handle = merge_adapters(base.model, adapters, self.regions[model_id]) if adapters else None
            try:
                yield from _decode(base, ids, max_new_tokens, temperature, top_p, stop, seed)
            finally:
                if handle is not None:
                    handle.unmerge()


@torch.no_grad()
def _decode(base, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, stop: list[str],
            seed: int | None) -> Iterator[str | Completion]:
    """Token-by-token decoding with a KV cache; stops at EOS, a stop string or the token budget."""
    model, tokenizer = base.model, base.tokenizer
    device = base.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    input_ids = torch.tensor([ids], device=device)
    cache = None
    produced: list[int] = []
    text, emitted = "", 0
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    eos = {t for t in [tokenizer.eos_token_id, *configured] if t is not None}
    finish = "length"
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[0, -1].float()
        token = _sample(logits, temperature, top_p, generator)
        if token in eos:
            finish = "stop"
            break
        produced.append(token)
        input_ids = torch.tensor([[token]], device=device)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            break
        # Hold back a tail that could be the start of a stop string, and incomplete UTF-8.
        hold = max((len(s) - 1 for s in stop if s), default=0)
        safe = len(text) - hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if len(text) > emitted:
        yield text[emitted:]
    yield Completion(text=text, prompt_tokens=len(ids), completion_tokens=len(produced), finish_reason=finish)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


_generator: Generator | None = None


def get_generator() -> Generator:
    global _generator
    if _generator is None:
        _generator = Generator()
    return _generator
