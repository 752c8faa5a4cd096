"""Evaluation sets: a tenant's dataset read as the items a grader scores, checked before anything is queued."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.errors import Invalid, NotFound
from app.models import Tenant
from app.schemas import EvalSettings
from app.services.datasets import get_dataset
from app.storage import ArtifactStore
from sbora_core.training.eval_items import EvalDataError, EvalItem, read_eval_items
from sbora_core.training.harness import EvalSpec


def eval_spec(settings: EvalSettings) -> EvalSpec:
    return EvalSpec(**settings.model_dump(include=set(EvalSpec.__dataclass_fields__)))


def eval_items_of(session: Session, tenant: Tenant, dataset_id: str, settings: EvalSettings, field: str,
                  store: ArtifactStore) -> list[EvalItem]:
    """The dataset's items for the grader; Invalid naming `field` (and the line) when it has none that fit."""
    try:
        dataset = get_dataset(session, tenant, dataset_id)
    except NotFound as exc:
        raise Invalid(field, f"{field}: {exc}; upload it with POST /datasets first") from exc
    spec = eval_spec(settings)
    try:
        items = read_eval_items(store.local_file(dataset.storage_key, dataset.sha256), spec.grader,
                                protocol=spec.protocol, limit=spec.limit, seed=spec.seed)
    except EvalDataError as exc:
        where = f"line {exc.line}: " if exc.line is not None else ""
        raise Invalid(field, f"{field}: dataset {dataset_id} cannot be scored by the {spec.grader} grader "
                             f"({where}{exc.message})", [{"line": exc.line, "message": exc.message}]) from exc
    return items
