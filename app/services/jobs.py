"""Jobs: validated against the model before they are queued, listed, cancelled; their events."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import catalog
from app.core.config import Settings
from app.errors import Conflict, Invalid, NotFound
from app.ids import new_id
from app.models import TERMINAL_STATUSES, Dataset, Job, JobEvent, Tenant, utcnow
from app.schemas import JobCreate
from app.services import groups, placement
from app.services.datasets import job_datasets
from app.services.eval_sets import eval_items_of
from app.services.objectives import check_objective, method_from_adapter
from app.services.queries import owned, page
from app.services.quotas import check_unfinished_jobs
from app.storage import get_store
from sbora_core.method.config import ConfigError
from sbora_core.training.eval_items import EVAL_FORMATS
from sbora_core.training.job import Hyperparameters, Resources

ALLOCATION_TRIES = 20


def check_training_formats(datasets: list[tuple[str, Dataset]]) -> None:
    """An evaluation set (choices, or prompts with answers) has nothing to train on."""
    for field, dataset in datasets:
        if dataset.format in EVAL_FORMATS:
            raise Invalid(field, f"{field}: dataset {dataset.id} is an evaluation set ({dataset.format}); train on "
                                 "chat, prompt/completion or instruction records, and score with it through eval_after "
                                 "or POST /evaluations")


def check_chat_template(base_model: str, datasets: list[tuple[str, Dataset]]) -> None:
    """Chat records train on the model's own chat template; a model without one cannot take them."""
    for field, dataset in datasets:
        if dataset.format == "chat" and not catalog.has_chat_template(base_model):
            raise Invalid(field, f"{field}: the dataset is in chat format, but {base_model} has no chat "
                                 "template; convert it to prompt/completion records, or train a model that has one")


def check_completions_fit(training: Dataset, spec: JobCreate) -> None:
    """A max_seq_len at or below every record's prompt cuts off every completion: the job would fail
    in the worker with nothing to train on. Checked from the dataset's statistics where they were
    counted with this model's tokenizer."""
    stats = training.stats or {}
    shortest = stats.get("min_prompt_tokens")
    max_seq_len = spec.hyperparameters.max_seq_len
    if stats.get("tokenizer") == spec.base_model and shortest is not None and max_seq_len <= shortest:
        raise Invalid("hyperparameters.max_seq_len",
                      f"hyperparameters.max_seq_len: {max_seq_len} tokens cut off every completion of dataset "
                      f"{training.id} (the shortest prompt, line {stats.get('min_prompt_line')}, has "
                      f"{shortest} tokens before its completion); raise it above {shortest}")


def create_job(session: Session, tenant: Tenant, spec: JobCreate, settings: Settings,
               origin: dict[str, Any] | None = None) -> Job:
    """Validate everything a worker would trip over, then record the job as queued. `origin` is kept
    in the job's first event (how the request was spelled, for answers in the same terms).

    The stored method and hyperparameters are complete (defaults filled in), so
    a queued job trains as it was accepted even if a default changes later.
    """
    check_unfinished_jobs(session, tenant, settings)
    try:
        catalog.source_of(spec.base_model)
    except catalog.UnknownBaseModel as exc:
        raise Invalid("base_model", str(exc)) from exc
    datasets = job_datasets(session, tenant, spec.training_dataset_id, spec.validation_dataset_id)
    check_training_formats(datasets)
    check_chat_template(spec.base_model, datasets)
    check_completions_fit(datasets[0][1], spec)
    objective = check_objective(spec, datasets)
    if spec.eval_after is not None:
        eval_items_of(session, tenant, spec.eval_after.dataset_id, spec.eval_after, "eval_after.dataset_id", get_store())
    method = spec.method.model_dump()
    if spec.init_adapter_id:
        method = method_from_adapter(session, tenant, spec, method)
    group = groups.get_group(session, tenant, spec.group) if spec.group else None
    if group is not None:
        method = groups.method_in_group(group, spec.base_model, method, spec.method.model_fields_set)
    try:
        catalog.check_method(spec.base_model, method)
    except ConfigError as exc:
        raise Invalid(f"method.{exc.field}", f"method.{exc}") from exc
    hyperparameters = spec.hyperparameters.model_dump()
    try:
        Hyperparameters(**hyperparameters)
    except ConfigError as exc:
        raise Invalid(f"hyperparameters.{exc.field}", f"hyperparameters.{exc}") from exc
    resources = spec.resources.model_dump()
    try:
        waits_for = placement.check_resources(session, Resources(**resources), settings.train_queue)
    except ConfigError as exc:
        raise Invalid(f"resources.{exc.field}", f"resources.{exc}") from exc
    for attempt in range(ALLOCATION_TRIES):
        job = Job(id=new_id("job"), tenant_id=tenant.id, name=spec.name, base_model=spec.base_model,
                  quantization=spec.quantization, method=dict(method), hyperparameters=hyperparameters,
                  resources=dict(resources),
                  train_dataset_id=spec.training_dataset_id, val_dataset_id=spec.validation_dataset_id,
                  eval_after=spec.eval_after.model_dump() if spec.eval_after else None, objective=objective,
                  init_adapter_id=spec.init_adapter_id, user_metadata=spec.metadata,
                  status="queued", enqueued_attempt=1, enqueued_at=utcnow())  # the route sends attempt 1's message
        try:
            # The job and its group slot are written in one transaction: both, or neither.
            if group is not None:
                job.method["index_slot"] = groups.allocate(session, group, job.id)
            session.add(job)
            session.flush()
            add_event(session, job.id, "status", "queued",
                      {"status": "queued", "resources": resources, **(origin or {})})
            if waits_for:
                add_event(session, job.id, "log", f"queued: {waits_for}", {"waiting_for": "workers"})
            session.commit()
            return job
        except IntegrityError:  # another creation took the same slot at the same moment: look again
            session.rollback()
            if attempt == ALLOCATION_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def list_jobs(session: Session, tenant: Tenant, status: str | None, limit: int, offset: int,
              kind: str = "train") -> tuple[list[Job], int]:
    query = select(Job).where(Job.tenant_id == tenant.id, Job.kind == kind)
    if status:
        query = query.where(Job.status == status)
    return page(session, query.order_by(Job.created_at.desc(), Job.id.desc()), limit, offset)


def get_job(session: Session, tenant: Tenant, job_id: str, kind: str = "train") -> Job:
    """The tenant's job of this kind (an evaluation's job is found under /evaluations, not /jobs)."""
    what = "job" if kind == "train" else kind
    job = owned(session, Job, tenant, job_id, what)
    if job.kind != kind:
        raise NotFound(f"no {what} with id {job_id!r}")
    return job


def cancel_job(session: Session, tenant: Tenant, job_id: str, kind: str = "train") -> Job:
    """Queued jobs end at once; running ones are `cancelling` until their worker stops, within one
    optimiser step or evaluation chunk (then `cancelled`)."""
    job = get_job(session, tenant, job_id, kind)
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"{'job' if kind == 'train' else kind} {job_id} already {job.status}")
    if job.status == "cancelling":
        return job
    job.cancel_requested = True
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", utcnow()
        groups.release_job(session, job.id)
        add_event(session, job.id, "status", "cancelled before it started", {"status": "cancelled"})
    else:
        job.status = "cancelling"
        add_event(session, job.id, "status", "cancelling: the worker stops after this step",
                  {"status": "cancelling"})
    session.commit()
    return job


def add_event(session: Session, job_id: str, kind: str, message: str = "", data: dict[str, Any] | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, data=data or {}))


def add_event_once(session: Session, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
    """`add_event`, unless the job's last event says the same: a job that keeps waiting says so once."""
    last = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                           .order_by(JobEvent.id.desc()).limit(1)).first()
    if last is None or last.message != message:
        add_event(session, job_id, kind, message, data)


def newest_events(session: Session, tenant: Tenant, job_id: str, before: int | None, limit: int) -> list[JobEvent]:
    """Up to `limit` of the job's events, newest first; with `before`, those older than that event
    (none when it is not one of this job's events)."""
    get_job(session, tenant, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if before is not None:
        cursor = session.get(JobEvent, before)
        if cursor is None or cursor.job_id != job_id:
            return []
        query = query.where(JobEvent.id < before)
    return list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit)))


def list_events(session: Session, tenant: Tenant, job_id: str, after: int, limit: int,
                kind: str | None = None, job_kind: str = "train") -> tuple[list[JobEvent], int]:
    get_job(session, tenant, job_id, job_kind)
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
    if kind:
        query = query.where(JobEvent.kind == kind)
    return page(session, query.order_by(JobEvent.id), limit, 0)
