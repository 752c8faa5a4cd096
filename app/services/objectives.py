"""A job's objective (sft or dpo) and the adapter it starts from, checked before it is queued."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.errors import Invalid, NotFound
from app.models import Adapter, Dataset, Job, Tenant
from app.schemas import JobCreate
from app.services.adapters import adapter_files, get_adapter
from app.storage import ArtifactStore
from sbora_core.training.preference_records import PREFERENCE

# The method fields an adapter fixes: a job that continues it trains the same layers and index sets.
ADAPTER_FIELDS = ("variant", "r", "alpha", "target_modules")


def check_objective(spec: JobCreate, datasets: list[tuple[str, Dataset]]) -> dict[str, Any]:
    """The stored objective; 422 naming the dataset whose format does not suit it, or `objective`
    for what dpo cannot do."""
    dpo = spec.objective == "dpo"
    for field, dataset in datasets:
        fmt = dataset.format
        if dpo and fmt != PREFERENCE:
            raise Invalid(field, f"{field}: dataset {dataset.id} is {fmt}; objective dpo trains on preference "
                                 "pairs (OpenAI's DPO format, or prompt/chosen/rejected records)")
        if not dpo and fmt == PREFERENCE:
            raise Invalid(field, f"{field}: dataset {dataset.id} holds preference pairs; train it with "
                                 'objective "dpo", or upload chat, prompt/completion or instruction records')
    if not dpo:
        return {"type": "sft"}
    if spec.resources.devices * spec.resources.nodes > 1:
        raise Invalid("objective", "objective: dpo trains on one device for now; set resources.devices and "
                                   "resources.nodes to 1")
    if spec.hyperparameters.packing:
        raise Invalid("hyperparameters.packing", "hyperparameters.packing: dpo batches whole pairs; set it to false")
    return {"type": "dpo", "beta": spec.beta, "loss": spec.loss}


def method_from_adapter(session: Session, tenant: Tenant, spec: JobCreate, method: dict[str, Any]) -> dict[str, Any]:
    """The method of a job that continues `spec.init_adapter_id`: the adapter's variant, rank, alpha and
    targets; fields the request set itself must agree (422 naming the one that does not)."""
    assert spec.init_adapter_id is not None
    try:
        adapter = get_adapter(session, tenant, spec.init_adapter_id)
    except NotFound as exc:
        raise Invalid("init_adapter_id", f"init_adapter_id: {exc}") from exc
    if adapter.base_model != spec.base_model:
        raise Invalid("init_adapter_id", f"init_adapter_id: adapter {adapter.id} was trained on "
                                         f"{adapter.base_model!r}, not {spec.base_model!r}")
    if spec.group:
        raise Invalid("group", "group: a job that continues an adapter keeps that adapter's index sets; "
                               "leave group out")
    fixed = {"variant": adapter.variant, "r": adapter.r, "alpha": adapter.alpha,
             "target_modules": adapter.target_modules}
    for field in ADAPTER_FIELDS:
        if field in spec.method.model_fields_set and method[field] != fixed[field]:
            raise Invalid(f"method.{field}", f"method.{field}: adapter {adapter.id} has {field} {fixed[field]!r}, "
                                             f"the job asks for {method[field]!r}; leave it out to take the adapter's")
    return {**method, **fixed}


def start_adapter(session: Session, job: Job, store: ArtifactStore) -> str | None:
    """The local directory of the adapter a job starts from, if it names one."""
    if not job.init_adapter_id:
        return None
    adapter = session.get(Adapter, job.init_adapter_id)
    if adapter is None:
        raise ValueError(f"init_adapter_id: adapter {job.init_adapter_id} was deleted; create the job again "
                         "from an adapter that exists")
    return str(adapter_files(adapter, store))
