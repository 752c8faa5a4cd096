from __future__ import annotations

from fastapi import APIRouter, Response, status

from app import catalog
from app.api.deps import AdminTenant, CurrentTenant, SessionDep
from app.api.responses import ADMIN_ONLY
from app.schemas import ModelPublic, ModelRegister
from app.services import base_models

router = APIRouter(prefix="/models", tags=["models"])


def model_public(model_id: str) -> ModelPublic:
    summary = catalog.summary(model_id)
    origin = "configured" if model_id in catalog.configured() else "registered"
    return ModelPublic(id=model_id, origin=origin, has_chat_template=catalog.has_chat_template(model_id),
                       **{k: v for k, v in summary.items() if k != "name"})


@router.get("", response_model=list[ModelPublic])
def list_models(tenant: CurrentTenant) -> list[ModelPublic]:
    """Base models this service fine-tunes and serves, with the dimensions that bound the rank."""
    return [model_public(model_id) for model_id in catalog.offered(fresh=True)]


@router.post("", response_model=ModelPublic, status_code=status.HTTP_201_CREATED, responses=ADMIN_ONLY)
def register_model(body: ModelRegister, tenant: AdminTenant, session: SessionDep) -> ModelPublic:
    """Offer another base model to every tenant (admin keys only): a directory the server and its
    workers can read, or a hub id where they have a network. Checked before anything is recorded."""
    entry = base_models.register_model(session, body.source, body.name)
    session.commit()
    catalog.forget_registered()
    return model_public(entry.name)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=ADMIN_ONLY)
def remove_model(name: str, tenant: AdminTenant, session: SessionDep) -> Response:
    """Stop offering a registered model (admin keys only); 409 while jobs, adapters or groups use it."""
    base_models.remove_model(session, name)
    session.commit()
    catalog.forget_registered()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
