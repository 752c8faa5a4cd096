"""Domain errors of the service; `app.main` maps each to an HTTP status.

Kept free of database and web imports, so the generation engine's process and
the workers can raise and catch them without loading either.
"""

from __future__ import annotations

import re
from typing import Any


class NotFound(LookupError):
    """No such object for this tenant (404); `param` names the request field that named it, if any."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Unsupported(ValueError):
    """A request parameter this server does not implement (400), rather than silently ignored."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


class Invalid(ValueError):
    """Bad input (422): `field` names what to change, `errors` may carry line-numbered problems."""

    def __init__(self, field: str, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.field, self.message, self.errors = field, message, errors


class Conflict(RuntimeError):
    """The object's state forbids the operation (409)."""


class TooLarge(ValueError):
    """Over a size limit or the tenant's storage quota (413)."""


class RequestTimeout(RuntimeError):
    """A request ran past SBORA_REQUEST_TIMEOUT_S and was cancelled (504)."""


class ClientGone(RuntimeError):
    """The client disconnected; its request was cancelled and nobody reads the answer (499)."""


class QuotaExceeded(RuntimeError):
    """A per-tenant limit on unfinished jobs (429)."""


_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.@+~-]+/)+([\w.@+~-]*)")


def without_paths(text: str) -> str:
    """`text` with every absolute filesystem path cut to its last component: job events and error
    messages reach every tenant, the server's directory layout must not."""
    return _PATH.sub(lambda m: m.group(1) or "…", text)
