"""A small HTTP client for a running sbora-server: one method per route the CLI uses.

Every failure, whether the server answered 4xx/5xx or could not be reached, becomes an
`ApiError` whose message is fit to show a person, so callers never print a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# Generation and job streams can be quiet for long stretches (a busy queue, a slow first step).
STREAM_TIMEOUT = httpx.Timeout(10.0, read=None)
# Uploads are validated (tokenised) before the server answers.
UPLOAD_TIMEOUT = httpx.Timeout(10.0, read=600.0, write=600.0)


@dataclass
class ApiError(Exception):
    status: int  # 0 when no HTTP answer came back (refused, timed out, cut off)
    message: str
    details: list[str] = field(default_factory=list)  # one line per field or dataset line at fault

    def __str__(self) -> str:
        return self.message


@dataclass
class ServerEvent:
    event: str
    data: Any
    id: str | None = None


def _field_name(loc: list[Any]) -> str:
    # FastAPI locations start with where the value came from; the rest names the field.
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    return ".".join(str(p) for p in parts)


def _describe(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    name, msg = _field_name(item.get("loc") or []), str(item.get("msg", item))
    # the service's Invalid messages often name their field already ("method.r: ...").
    return msg if not name or msg.startswith(name) else f"{name}: {msg}"


def error_from_response(response: httpx.Response) -> ApiError:
    """The server's `detail` as one headline, plus a line per field or dataset line for 422s."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    details: list[str] = []
    if isinstance(detail, list) and detail:
        lines = [_describe(d) for d in detail]
        headline, details = (lines[0], lines[1:]) if len(lines) == 1 else ("invalid request", lines)
    elif detail is not None:
        headline = str(detail)
    else:
        headline = (response.text or "").strip()[:300] or "no details"
    # Dataset validation puts its line-numbered problems beside `detail`.
    for problem in (body.get("errors") or []) if isinstance(body, dict) else []:
        line = problem.get("line")
        details.append(f"line {line}: {problem.get('message')}" if line else str(problem.get("message")))
    if status == 429 and response.headers.get("Retry-After"):
        headline += f" (retry after {response.headers['Retry-After']} s)"
    return ApiError(status, f"{status} {response.reason_phrase or httpx.codes.get_reason_phrase(status)}: "
                            f"{headline}", details)


def iter_sse(response: httpx.Response) -> Iterator[ServerEvent]:
    """Parse a text/event-stream body into events (comments such as keep-alives are skipped)."""
    event, ident = "message", None
    data: list[str] = []
    for line in response.iter_lines():
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except ValueError:
                    payload = text
                yield ServerEvent(event, payload, ident)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            ident = value


class ApiClient:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 60.0) -> None:
        self.url = (url or os.environ.get("SBORA_URL") or DEFAULT_URL).rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _transport_error(self, exc: httpx.HTTPError) -> ApiError:
        if isinstance(exc, httpx.ConnectError):
            return ApiError(0, f"cannot connect to {self.url} ({exc}); is the server running? "
                               "(set --url or SBORA_URL)")
        if isinstance(exc, httpx.TimeoutException):
            return ApiError(0, f"{self.url} did not answer in time ({type(exc).__name__})")
        return ApiError(0, f"request to {self.url} failed: {type(exc).__name__}: {exc}")

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json() if response.content else None

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self.http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                yield response
        except httpx.HTTPError as exc:  # also a connection cut mid-stream
            raise self._transport_error(exc) from None

    # -- datasets ----------------------------------------------------------------------------
    def upload_dataset(self, path: Path) -> dict[str, Any]:
        with path.open("rb") as f:
            return self._request("POST", "/datasets", files={"file": (path.name, f)}, timeout=UPLOAD_TIMEOUT)

    def list_datasets(self, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return self._request("GET", "/datasets", params={"limit": limit, "offset": offset})

    # -- jobs --------------------------------------------------------------------------------
    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/jobs", json=spec)

    def list_jobs(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params = {"limit": limit, "offset": offset, **({"status": status} if status else {})}
        return self._request("GET", "/jobs", params=params)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel")

    def job_events(self, job_id: str, after: int | None = None) -> Generator[ServerEvent, None, None]:
        """The job's events as they are written, until the server sends `end`."""
        headers = {"Last-Event-ID": str(after)} if after else {}
        with self._stream("GET", f"/jobs/{job_id}/events/stream", headers=headers, timeout=STREAM_TIMEOUT) as r:
            yield from iter_sse(r)

    # -- evaluations -------------------------------------------------------------------------
    def create_evaluation(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/evaluations", json=spec)

    def list_evaluations(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params = {"limit": limit, "offset": offset, **({"status": status} if status else {})}
        return self._request("GET", "/evaluations", params=params)

    def get_evaluation(self, evaluation_id: str) -> dict[str, Any]:
        return self._request("GET", f"/evaluations/{evaluation_id}")

    def evaluation_items(self, evaluation_id: str, candidate: str | None, correct: bool | None,
                         limit: int = 100) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if candidate is not None:
            params["candidate"] = candidate
        if correct is not None:
            params["correct"] = str(correct).lower()
        return self._request("GET", f"/evaluations/{evaluation_id}/items", params=params)

    # -- adapters ----------------------------------------------------------------------------
    def create_group(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/groups", json=spec)

    def list_groups(self, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return self._request("GET", "/groups", params={"limit": limit, "offset": offset})

    def get_group(self, group_id: str) -> dict[str, Any]:
        return self._request("GET", f"/groups/{group_id}")

    def list_adapters(self, base_model: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params = {"limit": limit, "offset": offset, **({"base_model": base_model} if base_model else {})}
        return self._request("GET", "/adapters", params=params)

    def download_adapter(self, adapter_id: str, destination: Path, format: str = "sparse") -> Path:
        """Stream the zip to `destination` (a directory gets the server's file name); returns the file."""
        with self._stream("GET", f"/adapters/{adapter_id}", params={"format": format},
                          timeout=STREAM_TIMEOUT) as response:
            if destination.is_dir():
                suffix = "" if format == "sparse" else "-peft"
                destination = destination / f"{adapter_id}{suffix}.zip"
            # Written aside and renamed, so an interrupted download never leaves a truncated zip.
            partial = destination.with_name(destination.name + ".part")
            try:
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                partial.replace(destination)
            finally:
                partial.unlink(missing_ok=True)
        return destination

    # -- generation --------------------------------------------------------------------------
    def generate_stream(self, request: dict[str, Any]) -> Generator[ServerEvent, None, None]:
        """`token` events, then one `done` (or `error`) event."""
        with self._stream("POST", "/generate", json={**request, "stream": True}, timeout=STREAM_TIMEOUT) as r:
            yield from iter_sse(r)
