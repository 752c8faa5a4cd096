"""Evaluations: candidates scored on a dataset by the workers, compared with intervals."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from app.evaluation_schemas import (
    EvaluationCreate,
    EvaluationItemPublic,
    EvaluationProgress,
    EvaluationPublic,
)
from app.models import JOB_STATUSES, Evaluation, Job
from app.queue import enqueue_job
from app.schemas import JobError, JobEventPublic, Page
from app.services import evaluations, jobs

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


def public(evaluation: Evaluation, job: Job) -> EvaluationPublic:
    return EvaluationPublic(
        id=evaluation.id, owner=evaluation.tenant_id, name=evaluation.name, status=job.status,
        progress=EvaluationProgress(**{k: v for k, v in (job.progress or {}).items()
                                       if k in EvaluationProgress.model_fields}),
        dataset_id=evaluation.dataset_id, base_model=evaluation.base_model, settings=evaluation.spec,
        candidates=evaluation.candidates, result=evaluation.result,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        attempts=job.attempts, source_job_id=evaluation.source_job_id, created_at=evaluation.created_at,
        started_at=job.started_at, finished_at=job.finished_at)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=EvaluationPublic)
def create_evaluation(spec: EvaluationCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep,
                      store: StoreDep) -> EvaluationPublic:
    """Check the dataset against the grader and every candidate, and queue the evaluation."""
    evaluation = evaluations.create_evaluation(session, tenant, spec, settings, store)
    enqueue_job(evaluation.id)
    return public(*evaluations.get_evaluation(session, tenant, evaluation.id))


@router.get("", response_model=Page[EvaluationPublic])
def list_evaluations(session: SessionDep, tenant: CurrentTenant,
                     status: Annotated[str | None, Query(pattern=f"^({'|'.join(JOB_STATUSES)})$")] = None,
                     limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> Page[EvaluationPublic]:
    rows, total = evaluations.list_evaluations(session, tenant, status, limit, offset)
    return Page(data=[public(e, j) for e, j in rows], total=total, limit=limit, offset=offset)


@router.get("/{evaluation_id}", response_model=EvaluationPublic)
def get_evaluation(evaluation_id: str, session: SessionDep, tenant: CurrentTenant) -> EvaluationPublic:
    return public(*evaluations.get_evaluation(session, tenant, evaluation_id))


@router.get("/{evaluation_id}/items", response_model=Page[EvaluationItemPublic])
def list_items(evaluation_id: str, session: SessionDep, tenant: CurrentTenant,
               candidate: Annotated[str | None, Query(max_length=2000, description="a candidate's label")] = None,
               correct: Annotated[bool | None, Query(description="only the items it got right (true) or wrong")] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> Page[EvaluationItemPublic]:
    """Per-item outputs, in item order; filter by candidate and by right or wrong."""
    rows, total = evaluations.list_items(session, tenant, evaluation_id, candidate, correct, limit, offset)
    data = [EvaluationItemPublic(candidate=label, candidate_index=r.candidate, item=r.item, line=r.line,
                                 correct=r.correct, values=r.values, output=r.output, tokens=r.tokens)
            for label, r in rows]
    return Page(data=data, total=total, limit=limit, offset=offset)


@router.get("/{evaluation_id}/events", response_model=Page[JobEventPublic])
def list_events(evaluation_id: str, session: SessionDep, tenant: CurrentTenant,
                after: Annotated[int, Query(ge=0, le=2**62, description="return events with id > after")] = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Page[JobEventPublic]:
    rows, total = jobs.list_events(session, tenant, evaluation_id, after, limit, job_kind=evaluations.KIND)
    return Page(data=[JobEventPublic.model_validate(r) for r in rows], total=total, limit=limit, offset=0)


@router.post("/{evaluation_id}/cancel", response_model=EvaluationPublic)
def cancel_evaluation(evaluation_id: str, session: SessionDep, tenant: CurrentTenant) -> EvaluationPublic:
    """A queued evaluation ends at once; a running one after the chunk in hand (what it scored is kept)."""
    return public(*evaluations.cancel_evaluation(session, tenant, evaluation_id))


@router.delete("/{evaluation_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_evaluation(evaluation_id: str, session: SessionDep, tenant: CurrentTenant) -> Response:
    evaluations.delete_evaluation(session, tenant, evaluation_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
