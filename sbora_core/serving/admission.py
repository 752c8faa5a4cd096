"""What the engine admits: the queue's bound and the prompt tokens a request and a tenant may hold.

Two answers, kept apart because clients act on them differently:
- `OverLimit`: the request can never be served under a limit as configured (a prompt
  larger than the per-request or per-tenant bound, more prompts than the queue holds).
  Retrying cannot help, so the service answers 413 naming the setting.
- `QueueFull`: the engine is busy now (its queue, or the tenant's tokens in flight);
  the same request fits later, so the service answers 429 with Retry-After.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


class QueueFull(RuntimeError):
    """The engine is busy (its queue at its bound, or the tenant's prompt tokens in flight); try
    again after `retry_after_s`."""

    def __init__(self, retry_after_s: int, message: str = "the generation queue is full") -> None:
        super().__init__(f"{message}; retry in {retry_after_s} s")
        self.retry_after_s, self.reason = retry_after_s, message


class OverLimit(ValueError):
    """The request can never fit a limit: `field` is the request's part at fault, `setting` the limit."""

    def __init__(self, field: str, setting: str, message: str) -> None:
        super().__init__(message)
        self.field, self.setting, self.message = field, setting, message


@dataclass
class AdmissionLimits:
    max_queue: int = 64
    max_prompt_tokens: int = 0  # per request; 0: only the model's context bounds it
    max_tenant_prompt_tokens: int = 0  # per tenant, summed over its requests queued and running; 0: none


class Admission:
    """Counts each tenant's prompt tokens in flight and refuses what a limit forbids."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.tokens: dict[str, int] = {}  # tenant -> prompt tokens of its requests not finished yet
        self.lock = threading.Lock()

    def check_request(self, prompt_tokens: int, requests: int = 1) -> None:
        """OverLimit for what no amount of waiting lets in (checked before anything is queued)."""
        limits = self.limits
        if requests > limits.max_queue:
            raise OverLimit("prompt", "SBORA_ENGINE_MAX_QUEUE",
                            f"prompt: {requests} prompts in one request, but the generation queue holds at most "
                            f"{limits.max_queue} (SBORA_ENGINE_MAX_QUEUE); send at most {limits.max_queue} at once")
        if limits.max_prompt_tokens and prompt_tokens > limits.max_prompt_tokens:
            raise OverLimit("prompt", "SBORA_ENGINE_MAX_PROMPT_TOKENS",
                            f"prompt: {prompt_tokens} tokens; a request may have at most {limits.max_prompt_tokens} "
                            "(SBORA_ENGINE_MAX_PROMPT_TOKENS)")
        if limits.max_tenant_prompt_tokens and prompt_tokens > limits.max_tenant_prompt_tokens:
            raise OverLimit("prompt", "SBORA_ENGINE_MAX_TENANT_PROMPT_TOKENS",
                            f"prompt: {prompt_tokens} tokens; a tenant may have at most "
                            f"{limits.max_tenant_prompt_tokens} in flight (SBORA_ENGINE_MAX_TENANT_PROMPT_TOKENS)")

    def take(self, tenant: str, prompt_tokens: int, queued: int, retry_after_s: int) -> None:
        """Count the request in, or QueueFull when the queue or the tenant's tokens are at their bound now."""
        self.check_request(prompt_tokens)
        if queued >= self.limits.max_queue:
            raise QueueFull(retry_after_s)
        with self.lock:
            held = self.tokens.get(tenant, 0)
            bound = self.limits.max_tenant_prompt_tokens
            if bound and held + prompt_tokens > bound:
                raise QueueFull(retry_after_s, f"this tenant has {held} prompt tokens in flight and may have "
                                               f"{bound} (SBORA_ENGINE_MAX_TENANT_PROMPT_TOKENS)")
            self.tokens[tenant] = held + prompt_tokens

    def release(self, tenant: str, prompt_tokens: int) -> None:
        with self.lock:
            left = self.tokens.get(tenant, 0) - prompt_tokens
            if left > 0:
                self.tokens[tenant] = left
            else:
                self.tokens.pop(tenant, None)
