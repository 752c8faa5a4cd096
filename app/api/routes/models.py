from __future__ import annotations

from fastapi import APIRouter

from app import catalog
from app.api.deps import CurrentTenant
from app.schemas import ModelPublic

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=list[ModelPublic])
def list_models(tenant: CurrentTenant) -> list[ModelPublic]:
    """Base models this service fine-tunes and serves, with the dimensions that bound the rank."""
    out = []
    for model_id in catalog.offered():
        summary = catalog.summary(model_id)
        out.append(ModelPublic(id=model_id, **{k: v for k, v in summary.items() if k != "name"}))
    return out
