from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.responses import FileResponse, RedirectResponse

from app.api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from app.schemas import AdapterPublic, ComposeRequest, Page, UpdateMapPublic
from app.services import adapters as registry

router = APIRouter(prefix="/adapters", tags=["adapters"])


class ArchiveResponse(FileResponse):
    # Starlette reads files in 64 KiB chunks, one worker-thread hop each; adapters are megabytes, and
    # under load those hops, not the bytes, set the latency.
    chunk_size = 1024 * 1024


@router.get("", response_model=Page[AdapterPublic])
def list_adapters(session: SessionDep, tenant: CurrentTenant,
                  base_model: Annotated[str | None, Query(max_length=500)] = None,
                  limit: Annotated[int, Query(ge=1, le=200)] = 50,
                  offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
                  checkpoints: Annotated[bool, Query(description="include jobs' registered checkpoints")] = False,
                  ) -> Page[AdapterPublic]:
    """The registry, newest first: trained adapters, and with `checkpoints=true` jobs' checkpoints too."""
    rows, total = registry.list_adapters(session, tenant, base_model, limit, offset, checkpoints)
    return Page(data=[AdapterPublic.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)


@router.post("/compose", status_code=status.HTTP_201_CREATED, response_model=AdapterPublic)
def compose_adapters(spec: ComposeRequest, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep,
                     store: StoreDep) -> AdapterPublic:
    """Register the exact sum of adapters with disjoint index sets (one adapter group's members, say),
    each optionally weighted, as an adapter of its own: downloadable in both layouts, its metrics list
    its parts. 422 names the two adapters and the first layer where they overlap."""
    return AdapterPublic.model_validate(registry.compose(session, tenant, spec.adapter_ids, spec.weights, spec.name,
                                                         settings, store))


@router.get("/{adapter_id}", response_class=FileResponse,
            responses={200: {"content": {"application/zip": {}}}, 304: {"description": "not modified"},
                       307: {"description": "the object store's presigned URL (SBORA_S3_PRESIGN_DOWNLOADS)"}})
def download_adapter(adapter_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep,
                     format: Annotated[Literal["sparse", "peft"], Query()] = "sparse",
                     if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The adapter as a zip: the sparse format (index sets + factor), or `?format=peft` for
    PEFT's LoRA layout. The ETag is the archive's sha256. With an object store configured to
    presign downloads, a redirect to the object itself."""
    adapter = registry.get_adapter(session, tenant, adapter_id)
    filename = f"{adapter.id}{'' if format == 'sparse' else '-peft'}.zip"
    url = store.download_url(registry.archive_key(adapter, format), filename)
    if url is not None:
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    path, sha256 = registry.archive(adapter, format, store)
    etag = f'"{sha256}"'
    if if_none_match == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return ArchiveResponse(path, media_type="application/zip", filename=filename, headers={"ETag": etag})


@router.get("/{adapter_id}/metadata", response_model=AdapterPublic)
def adapter_metadata(adapter_id: str, session: SessionDep, tenant: CurrentTenant) -> AdapterPublic:
    return AdapterPublic.model_validate(registry.get_adapter(session, tenant, adapter_id))


@router.get("/{adapter_id}/update-map", response_model=UpdateMapPublic)
def adapter_update_map(adapter_id: str, session: SessionDep, tenant: CurrentTenant,
                       store: StoreDep) -> UpdateMapPublic:
    """Per adapted layer: the columns (FA, LoRA) or rows (FB) the adapter changes, with the L2 norm of
    each one's change (alpha/r)·factor. The dashboard draws it as one heat strip per layer."""
    adapter = registry.get_adapter(session, tenant, adapter_id)
    return UpdateMapPublic.model_validate({"adapter_id": adapter.id,
                                           **asdict(registry.adapter_update_map(adapter, store))})


@router.delete("/{adapter_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_adapter(adapter_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> None:
    registry.delete_adapter(session, tenant, adapter_id, store)
