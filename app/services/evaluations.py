"""Evaluations: candidates scored on a dataset by a worker, through the same queue as training.

An evaluation is a `jobs` row of kind `evaluation` (so claims, leases, heartbeats, retries, the
reconciler and cancelling are the training jobs' own) plus an `evaluations` row under the same id
with its spec and, once finished, its result; every item's result is an `evaluation_items` row.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app import catalog
from app.core.config import Settings
from app.core.db import session_scope
from app.errors import Conflict, Invalid, NotFound, without_paths
from app.evaluation_schemas import CandidateSpec, EvaluationCreate
from app.ids import new_id
from app.models import (
    TERMINAL_STATUSES,
    Adapter,
    Evaluation,
    EvaluationItem,
    Job,
    JobEvent,
    Tenant,
    utcnow,
)
from app.queue import enqueue_job
from app.schemas import EvalAfter
from app.services.adapters import adapter_files
from app.services.eval_sets import eval_items_of, eval_spec
from app.services.fine_tuning import adapter_of_model, resolve_model
from app.services.jobs import add_event, cancel_job, get_job
from app.services.queries import page
from app.services.quotas import check_unfinished_jobs
from app.storage import ArtifactStore
from sbora_core.method.adapter_io import load_adapter
from sbora_core.method.merge import check_disjoint

KIND = "evaluation"
log = logging.getLogger(__name__)


def _candidate(session: Session, tenant: Tenant, spec: CandidateSpec, field: str,
               store: ArtifactStore) -> tuple[str, dict[str, Any]]:
    """(base model, stored candidate) for one candidate; Invalid naming `field` for anything that
    cannot be scored: an unknown name, another tenant's adapter, weights that do not match, a
    composition whose index sets overlap."""
    if spec.model in catalog.offered():
        if spec.weights:
            raise Invalid(f"{field}.weights", f"{field}.weights: {spec.model} is a base model, it has no adapters")
        return spec.model, {"label": spec.label or spec.model, "model": spec.model, "adapter_ids": [], "weights": None}
    names = spec.model.split("+")
    ids = [adapter_of_model(name) for name in names]
    if len(set(ids)) != len(ids):
        raise Invalid(f"{field}.model", f"{field}.model: an adapter is listed twice")
    adapters: list[Adapter] = []
    for name in names:
        try:  # an `ft:` name must be the adapter's own, exactly as chat requests are held to it
            adapters.append(resolve_model(session, tenant, name))
        except NotFound as exc:
            wrong_name = f" ({exc})" if exc.param == "model" else ""
            raise Invalid(f"{field}.model", f"{field}.model: {name!r} is neither a base model nor one of your "
                                            f"adapters{wrong_name}") from exc
    bases = sorted({a.base_model for a in adapters})
    if len(bases) > 1:
        raise Invalid(f"{field}.model", f"{field}.model: the adapters belong to different base models: {bases}")
    if spec.weights is not None and len(spec.weights) != len(adapters):
        raise Invalid(f"{field}.weights", f"{field}.weights: {len(spec.weights)} weight(s) for {len(adapters)} "
                                          "adapter(s); give one per adapter, in the same order")
    if len(adapters) > 1:
        try:
            check_disjoint([load_adapter(adapter_files(a, store)) for a in adapters])
        except ValueError as exc:  # overlapping index sets, or adapters that cannot compose (LoRA)
            raise Invalid(f"{field}.model", f"{field}.model: {exc}") from exc
    return bases[0], {"label": spec.label or spec.model, "model": spec.model, "adapter_ids": [a.id for a in adapters],
                      "weights": spec.weights}


def resolve_candidates(session: Session, tenant: Tenant, specs: list[CandidateSpec | str],
                       store: ArtifactStore) -> tuple[str, list[dict[str, Any]]]:
    """The base model every candidate stands on, and the candidates as stored."""
    resolved = [_candidate(session, tenant, CandidateSpec(model=s) if isinstance(s, str) else s, f"candidates[{i}]",
                           store) for i, s in enumerate(specs)]
    bases = sorted({base for base, _ in resolved})
    if len(bases) > 1:
        raise Invalid("candidates", f"candidates: every candidate must stand on one base model, got {bases}")
    labels = [c["label"] for _, c in resolved]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise Invalid(f"candidates[{i}].label", f"candidates[{i}].label: {label!r} names two candidates; "
                                                    "give each its own label")
    try:
        catalog.source_of(bases[0])
    except catalog.UnknownBaseModel as exc:
        raise Invalid("candidates", f"candidates: {exc}") from exc
    return bases[0], [c for _, c in resolved]


def _record(session: Session, tenant: Tenant, spec: EvalAfter | EvaluationCreate, base_model: str,
            candidates: list[dict[str, Any]], name: str | None, source_job_id: str | None) -> Evaluation:
    """The job row (kind `evaluation`; its dataset counts as in use) and the evaluation, queued."""
    job = Job(id=new_id("eval"), tenant_id=tenant.id, kind=KIND, name=name, base_model=base_model,
              train_dataset_id=spec.dataset_id, status="queued", enqueued_attempt=1, enqueued_at=utcnow())
    evaluation = Evaluation(id=job.id, tenant_id=tenant.id, name=name, dataset_id=spec.dataset_id,
                            base_model=base_model, spec=eval_spec(spec).to_dict(), candidates=candidates,
                            source_job_id=source_job_id)
    session.add(job)
    session.flush()
    session.add(evaluation)
    add_event(session, job.id, "status", "queued", {"status": "queued"})
    session.commit()
    return evaluation


def create_evaluation(session: Session, tenant: Tenant, spec: EvaluationCreate, settings: Settings,
                      store: ArtifactStore) -> Evaluation:
    """Check the dataset against the grader and every candidate, then record the evaluation as queued
    (the route sends its message)."""
    check_unfinished_jobs(session, tenant, settings)
    eval_items_of(session, tenant, spec.dataset_id, spec, "dataset_id", store)
    base_model, candidates = resolve_candidates(session, tenant, spec.candidates, store)
    return _record(session, tenant, spec, base_model, candidates, spec.name, None)


def queue_after(session: Session, job: Job, adapter_id: str) -> Evaluation:
    """The evaluation a succeeded job asked for (`eval_after`): its base model against its adapter.
    Admitted with the job, so no quota applies here; Invalid if its dataset went away since."""
    assert job.eval_after is not None
    tenant = session.get(Tenant, job.tenant_id)
    assert tenant is not None
    after = EvalAfter(**job.eval_after)
    candidates: list[dict[str, Any]] = [
        {"label": "base", "model": job.base_model, "adapter_ids": [], "weights": None},
                  {"label": adapter_id, "model": adapter_id, "adapter_ids": [adapter_id], "weights": None}]
    return _record(session, tenant, after, job.base_model, candidates, job.name, job.id)


def queue_eval_after(job_id: str, adapter_id: str) -> str | None:
    """Run by the worker when a job succeeded: queue the evaluation it asked for (`eval_after`) and send
    its message; the evaluation's id. A problem is logged on the job, which stays succeeded."""
    try:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None or not job.eval_after:
                return None
            evaluation_id = queue_after(session, job, adapter_id).id
            add_event(session, job_id, "log", f"queued evaluation {evaluation_id} (eval_after)",
                      {"evaluation_id": evaluation_id})
    except Exception as exc:
        log.exception("eval_after of %s", job_id)
        with session_scope() as session:
            add_event(session, job_id, "log", without_paths(f"eval_after: could not queue the evaluation: {exc}"))
        return None
    enqueue_job(evaluation_id)
    return evaluation_id


def list_evaluations(session: Session, tenant: Tenant, status: str | None, limit: int,
                     offset: int) -> tuple[list[tuple[Evaluation, Job]], int]:
    query = select(Job).where(Job.tenant_id == tenant.id, Job.kind == KIND)
    if status:
        query = query.where(Job.status == status)
    jobs, total = page(session, query.order_by(Job.created_at.desc()), limit, offset)
    evaluations = {e.id: e for e in session.scalars(select(Evaluation).where(Evaluation.id.in_([j.id for j in jobs])))}
    return [(evaluations[j.id], j) for j in jobs if j.id in evaluations], total


def get_evaluation(session: Session, tenant: Tenant, evaluation_id: str) -> tuple[Evaluation, Job]:
    job = get_job(session, tenant, evaluation_id, KIND)
    evaluation = session.get(Evaluation, job.id)
    if evaluation is None:
        raise NotFound(f"no evaluation with id {evaluation_id!r}")
    return evaluation, job


def cancel_evaluation(session: Session, tenant: Tenant, evaluation_id: str) -> tuple[Evaluation, Job]:
    cancel_job(session, tenant, evaluation_id, KIND)
    return get_evaluation(session, tenant, evaluation_id)


def delete_evaluation(session: Session, tenant: Tenant, evaluation_id: str) -> None:
    """The evaluation, its per-item results and its events; an unfinished one is cancelled first (409)."""
    evaluation, job = get_evaluation(session, tenant, evaluation_id)
    if job.status not in TERMINAL_STATUSES:
        raise Conflict(f"evaluation {evaluation_id} is {job.status}; cancel it first")
    session.execute(delete(EvaluationItem).where(EvaluationItem.evaluation_id == evaluation.id))
    session.execute(delete(JobEvent).where(JobEvent.job_id == job.id))
    session.delete(evaluation)
    session.flush()
    session.delete(job)
    session.commit()


def list_items(session: Session, tenant: Tenant, evaluation_id: str, candidate: str | None, correct: bool | None,
               limit: int, offset: int) -> tuple[list[tuple[str, EvaluationItem]], int]:
    """Per-item results in item order, optionally one candidate's (by label) and only right or wrong ones."""
    evaluation, _ = get_evaluation(session, tenant, evaluation_id)
    labels = [c["label"] for c in evaluation.candidates]
    query = select(EvaluationItem).where(EvaluationItem.evaluation_id == evaluation.id)
    if candidate is not None:
        if candidate not in labels:
            raise Invalid("candidate", f"candidate: {candidate!r} is not one of {labels}")
        query = query.where(EvaluationItem.candidate == labels.index(candidate))
    if correct is not None:
        query = query.where(EvaluationItem.correct.is_(correct))
    rows, total = page(session, query.order_by(EvaluationItem.candidate, EvaluationItem.item), limit, offset)
    return [(labels[r.candidate], r) for r in rows], total


def scored_counts(session: Session, evaluation_id: str) -> dict[int, int]:
    """Items stored per candidate index."""
    return dict(session.execute(select(EvaluationItem.candidate, func.count()).where(
        EvaluationItem.evaluation_id == evaluation_id).group_by(EvaluationItem.candidate)).all())
