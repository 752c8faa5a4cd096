"""The error answers each route documents, so clients (and schema-driven fuzzers) know every status
they can get."""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorBody, OpenAIErrorBody

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in ((400, "malformed request body"), (401, "missing or invalid API key"), (404, "no such object for this tenant"),
                       (409, "conflicts with the object's state"), (413, "too large for a limit or quota"),
                       (429, "queue full or quota reached; see Retry-After"))
}
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorBody, "description": spec["description"]} for code, spec in ERROR_RESPONSES.items()
} | {422: {"model": OpenAIErrorBody, "description": "invalid request"}}
# Every generation route can meet a restarted engine process (app.main maps EngineStopped to it).
ENGINE_RESTARTED: dict[int | str, dict[str, Any]] = {503: {"description": "the generation engine restarted; retry"}}
# Routes over what every tenant shares (the base models) take admin keys only.
ADMIN_ONLY: dict[int | str, dict[str, Any]] = {403: {"model": ErrorBody, "description": "needs an admin key"}}
