"""A bound on request bodies, enforced while they arrive: a 150 MB JSON body used to be read and parsed
whole before its 422.

The bound is SBORA_MAX_BODY_BYTES, or for multipart uploads (datasets, files) SBORA_MAX_UPLOAD_BYTES
plus room for the form's own headers. A declared Content-Length past it is refused before a byte is
read; a chunked body without one is counted as it streams in and cut off once it passes.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import get_settings

MULTIPART_SLACK = 1024 * 1024  # the form's boundaries and part headers around an upload


def body_limit(scope: Scope) -> tuple[int, str]:
    """The largest body this request may send, and the setting that says so."""
    settings = get_settings()
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").lower()
    if content_type.startswith("multipart/form-data"):
        return settings.max_upload_bytes + MULTIPART_SLACK, "SBORA_MAX_UPLOAD_BYTES"
    return settings.max_body_bytes, "SBORA_MAX_BODY_BYTES"


async def too_large(scope: Scope, send: Send, limit: int, setting: str) -> None:
    message = f"request body: larger than {limit} bytes ({setting})"
    if scope["path"].startswith("/v1/"):  # OpenAI's error body, which its SDKs read
        body: dict = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    else:
        body = {"detail": message}
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """ASGI middleware: 413 for a body past its bound, before the route parses it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = body_limit(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(scope, send, limit, setting)
            return
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # the route sees the client gone; the answer is the 413 below
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:
                return  # whatever the route makes of a cut-off body is replaced by the 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await too_large(scope, send, limit, setting)
