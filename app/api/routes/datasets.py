from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, UploadFile, status

from app.api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from app.schemas import DatasetPublic, Page
from app.services import datasets

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic,
             responses={413: {"description": "upload too large"}, 422: {"description": "line-numbered problems"}})
def upload_dataset(file: UploadFile, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep,
                   store: StoreDep) -> DatasetPublic:
    """Upload a JSONL or JSON dataset (multipart field `file`); it is validated before it is kept."""
    dataset = datasets.create_dataset(session, tenant, file.file, file.filename or "dataset", settings, store)
    return DatasetPublic.model_validate(dataset)


@router.get("", response_model=Page[DatasetPublic])
def list_datasets(session: SessionDep, tenant: CurrentTenant, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                  offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> Page[DatasetPublic]:
    rows, total = datasets.list_datasets(session, tenant, limit, offset)
    return Page(data=[DatasetPublic.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> DatasetPublic:
    return DatasetPublic.model_validate(datasets.get_dataset(session, tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> None:
    datasets.delete_dataset(session, tenant, dataset_id, store)
