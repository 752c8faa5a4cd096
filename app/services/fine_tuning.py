"""OpenAI-style fine-tuning over the service's own jobs: the request mapping and model names.

A fine-tuning request maps onto a `JobCreate`: n_epochs -> epochs,
batch_size -> batch_size, learning_rate_multiplier -> a multiple of the
default learning rate; `method.sbora` carries the adapter settings and any
native hyperparameter. A finished job's adapter is served under the model name
`ft:<base>:<suffix>:<adapter id>`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import Invalid, NotFound, Unsupported
from app.models import Adapter, Job, JobEvent, Tenant
from app.openai_schemas import DpoHyperparameters, FineTuningJobCreate, OpenAIHyperparameters
from app.schemas import HyperparametersSpec, JobCreate, MethodSpec, ResourcesSpec
from app.services import jobs
from app.services.adapters import get_adapter
from sbora_core.training.job import DPO_BETA, Hyperparameters  # DPO_BETA: OpenAI's "auto" beta

DEFAULT_LEARNING_RATE = Hyperparameters().learning_rate
# Our field names, as the OpenAI request spells them (for errors' `param`).
_OPENAI_FIELD = {"base_model": "model", "training_dataset_id": "training_file",
                 "validation_dataset_id": "validation_file", "method": "method.sbora",
                 "hyperparameters": "method.sbora.hyperparameters", "group": "method.sbora.group",
                 "resources": "method.sbora.resources", "init_adapter_id": "model", "beta": "method.dpo.hyperparameters.beta",
                 "objective": "method.type"}


def openai_hyperparameters(req: FineTuningJobCreate) -> OpenAIHyperparameters:
    """The method's hyperparameters (with dpo's beta), with the deprecated top-level ones where the
    method leaves a field out; a field both set differently is a 400 naming both (the top-level ones
    were dropped)."""
    sbora = req.method.sbora
    section = {"supervised": req.method.supervised, "dpo": req.method.dpo}.get(req.method.type)
    where = f"method.{req.method.type}.hyperparameters"
    inner: OpenAIHyperparameters | None = section.hyperparameters if section else None
    if inner is None and sbora is not None:  # OpenAI's three may also sit with the native ones
        inner, where = sbora.hyperparameters, "method.sbora.hyperparameters"
    top = req.hyperparameters
    if inner is None or top is None:
        return inner or top or OpenAIHyperparameters()
    merged = inner.model_copy()
    for name in top.model_fields_set:
        mine, theirs = getattr(inner, name), getattr(top, name)
        if name in inner.model_fields_set and mine != theirs:
            raise Unsupported(f"hyperparameters.{name}", f"hyperparameters.{name} ({theirs!r}) and {where}.{name} "
                                                         f"({mine!r}) disagree; give it in one place")
        setattr(merged, name, theirs)
    return merged


def to_job_create(req: FineTuningJobCreate) -> JobCreate:
    """Our job spec for an OpenAI request; Invalid names the OpenAI field at fault."""
    if req.method.type == "reinforcement":
        raise Unsupported("method.type", "method.type: reinforcement fine-tuning is not served; use 'supervised' "
                                         "or 'dpo'")
    if req.integrations:
        raise Unsupported("integrations", "integrations: not served here; follow a job through its events")
    sbora = req.method.sbora
    if req.method.type == "sbora" and sbora is None:
        raise Invalid("method.sbora", "method.sbora: required when method.type is 'sbora'")
    openai_hp = openai_hyperparameters(req)
    hp: dict[str, Any] = dict(sbora.hyperparameters.model_extra or {}) if sbora else {}
    if openai_hp.n_epochs != "auto":
        hp["epochs"] = openai_hp.n_epochs
    if openai_hp.batch_size != "auto":
        hp["batch_size"] = openai_hp.batch_size
    if openai_hp.learning_rate_multiplier != "auto":
        hp["learning_rate"] = DEFAULT_LEARNING_RATE * openai_hp.learning_rate_multiplier
    if req.seed is not None:
        hp["seed"] = req.seed
    beta = openai_hp.beta if isinstance(openai_hp, DpoHyperparameters) else "auto"
    # sbora's adapter fields were validated with the request (SBoRASettings is a MethodSpec); only the
    # native hyperparameters passed through as extras are checked here.
    # Only the fields the request set: a group fills in the rest (and must agree with these).
    method = MethodSpec(**sbora.model_dump(exclude={"quantization", "hyperparameters", "group", "resources"}, exclude_unset=True)
                        ) if sbora else MethodSpec()
    where = "method.sbora.hyperparameters"
    try:
        hyperparameters = HyperparametersSpec(**hp)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise Invalid(f"{where}.{field}", f"{where}.{field}: {first['msg']}") from exc
    return JobCreate(base_model=req.model, training_dataset_id=req.training_file,
                     validation_dataset_id=req.validation_file, method=method, hyperparameters=hyperparameters,
                     quantization=sbora.quantization if sbora else "none", name=req.suffix,
                     group=sbora.group if sbora else None,
                     resources=sbora.resources if sbora else ResourcesSpec(),
                     objective="dpo" if req.method.type == "dpo" else "sft",
                     beta=DPO_BETA if beta == "auto" else beta, metadata=req.metadata)


def create_job(session: Session, tenant: Tenant, req: FineTuningJobCreate, settings: Settings) -> Job:
    """The job for an OpenAI fine-tuning request; Invalid names the field as the OpenAI request spells it."""
    spec = to_job_create(req)
    if req.model.startswith("ft:"):  # a fine-tuned model as the base: continue its adapter
        try:
            adapter = resolve_model(session, tenant, req.model)  # exactly its own name, as for serving
        except NotFound as exc:
            raise Invalid("model", f"model: {exc}; name a fine-tuned model of this server") from exc
        spec = spec.model_copy(update={"base_model": adapter.base_model, "init_adapter_id": adapter.id})
    try:
        return jobs.create_job(session, tenant, spec, settings, origin={"openai_method": req.method.type})
    except Invalid as exc:
        head, _, rest = exc.field.partition(".")
        field = _OPENAI_FIELD.get(head, head) + (f".{rest}" if rest else "")
        message = exc.message.replace(head, _OPENAI_FIELD.get(head, head), 1).replace("POST /datasets", "POST /v1/files")
        raise Invalid(field, message, exc.errors) from exc
    except NotFound as exc:  # the group: named as the OpenAI request spells it
        raise NotFound(str(exc), param=_OPENAI_FIELD.get(exc.param or "", exc.param)) from exc


def list_jobs_after(session: Session, tenant: Tenant, after: str | None, limit: int) -> tuple[list[Job], bool]:
    """OpenAI's cursor pagination: up to `limit` of the tenant's training jobs, newest first, that come
    after the job `after`, and whether more follow. Ties on creation time are broken by id, so paging
    never skips or repeats a job."""
    query = select(Job).where(Job.tenant_id == tenant.id, Job.kind == "train")
    if after is not None:
        try:
            cursor = jobs.get_job(session, tenant, after)
        except NotFound:  # not one of the tenant's jobs: nothing comes after it
            return [], False
        query = query.where(or_(Job.created_at < cursor.created_at,
                                and_(Job.created_at == cursor.created_at, Job.id < cursor.id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def method_types(session: Session, rows: list[Job]) -> dict[str, str]:
    """The OpenAI method type of each job: `dpo` for a preference job, else the type it was created with
    (`supervised` or `sbora`; `sbora` for jobs created through POST /jobs), as its first event recorded
    it. One query for the whole page."""
    first_ids = select(func.min(JobEvent.id)).where(JobEvent.job_id.in_([j.id for j in rows])).group_by(JobEvent.job_id)
    created = {e.job_id: (e.data or {}).get("openai_method", "sbora")
               for e in session.scalars(select(JobEvent).where(JobEvent.id.in_(first_ids)))}
    return {j.id: "dpo" if (j.objective or {}).get("type") == "dpo" else created.get(j.id, "sbora") for j in rows}


def method_type(session: Session, job: Job) -> str:
    return method_types(session, [job])[job.id]


def fine_tuned_model(job: Job) -> str | None:
    return f"ft:{job.base_model}:{job.name or ''}:{job.adapter_id}" if job.adapter_id else None


def checkpoint_model(job: Job, adapter: Adapter) -> str:
    """A checkpoint's model name, as OpenAI spells them: the fine-tuned name plus `:ckpt-step-N`."""
    return f"ft:{job.base_model}:{job.name or ''}:{adapter.id}:ckpt-step-{adapter.checkpoint_step}"


def adapter_of_model(model: str) -> str:
    """The adapter id a model name names: `ft:<base>:<suffix>:<adapter id>`, with `:ckpt-step-N` for
    a checkpoint, or an adapter id itself (`resolve_model` checks the rest of the name)."""
    if not model.startswith("ft:"):
        return model
    parts = model.split(":")
    return parts[-2] if parts[-1].startswith("ckpt-step-") and len(parts) > 2 else parts[-1]


def resolve_model(session: Session, tenant: Tenant, model: str) -> Adapter:
    """The tenant's adapter a model name names, exactly: an `ft:` name must be the adapter's own name
    (base, suffix, and the checkpoint step if any), never the nearest adapter. A checkpoint step that
    does not exist served the final weights under the name asked for; NotFound (param `model`) now."""
    adapter = get_adapter(session, tenant, adapter_of_model(model))
    if not model.startswith("ft:"):
        return adapter
    job = session.get(Job, adapter.job_id) if adapter.job_id else None
    if job is None or job.tenant_id != tenant.id:
        expected = f"ft:{adapter.base_model}::{adapter.id}"
    elif adapter.checkpoint_step is not None:
        expected = checkpoint_model(job, adapter)
    else:
        expected = f"ft:{job.base_model}:{job.name or ''}:{adapter.id}"
    if model != expected:
        raise NotFound(f"model {model!r} does not exist: adapter {adapter.id} is served as {expected!r}", param="model")
    return adapter
