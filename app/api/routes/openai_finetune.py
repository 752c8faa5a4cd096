"""OpenAI-style fine-tuning: /v1/files and /v1/fine_tuning/jobs, so the `openai` client drives the flow unchanged.

Files are this service's datasets (validated on upload; `purpose` must be
`fine-tune`), fine-tuning jobs are its jobs. The resolved hyperparameters map
as: n_epochs -> epochs, batch_size -> batch_size, learning_rate_multiplier ->
a multiple of the server's default learning rate. A plain `supervised` method
trains SBoRA-FA with the server's defaults, `dpo` trains on preference pairs
(beta "auto" is 0.1); with either, `method.sbora` takes the adapter settings
(variant, r, alpha, ...) and any native hyperparameter (max_steps, max_seq_len,
...), and `"sbora"` as the type is a supervised job with them. A fine-tuned
`model` (`ft:...`) as the base continues that adapter (supervised, then dpo). The returned
`fine_tuned_model` (`ft:<base>:<suffix>:<adapter id>`) works as `model` in
/v1/chat/completions and /v1/completions.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from app.api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from app.errors import Invalid
from app.models import Adapter, Dataset, Job
from app.openai_schemas import FineTuningJobCreate
from app.queue import enqueue_job
from app.schemas import ResourcesSpec
from app.services import adapters, datasets, fine_tuning, jobs
from app.services.fine_tuning import DEFAULT_LEARNING_RATE, checkpoint_model, fine_tuned_model

router = APIRouter(prefix="/v1", tags=["openai fine-tuning"])


# -- files -------------------------------------------------------------------------------------
def file_object(ds: Dataset) -> dict[str, Any]:
    return {"id": ds.id, "object": "file", "bytes": ds.size_bytes, "created_at": int(ds.created_at.timestamp()),
            "filename": ds.filename, "purpose": "fine-tune", "status": "processed", "status_details": None}


@router.post("/files")
def upload_file(file: UploadFile, purpose: Annotated[str, Form(max_length=50)], session: SessionDep,
                tenant: CurrentTenant, settings: SettingsDep, store: StoreDep) -> dict[str, Any]:
    """A training or validation file (JSONL of {"messages": [...]} records, or any dataset shape)."""
    if purpose != "fine-tune":
        raise Invalid("purpose", f"purpose: only 'fine-tune' files are kept here, not {purpose!r}")
    return file_object(datasets.create_dataset(session, tenant, file.file, file.filename or "file.jsonl", settings, store))


@router.get("/files")
def list_files(session: SessionDep, tenant: CurrentTenant,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000) -> dict[str, Any]:
    rows, _ = datasets.list_datasets(session, tenant, limit, 0)
    return {"object": "list", "data": [file_object(r) for r in rows], "has_more": False}


@router.get("/files/{file_id}")
def get_file(file_id: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    return file_object(datasets.get_dataset(session, tenant, file_id))


@router.get("/files/{file_id}/content", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def file_content(file_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> FileResponse:
    """The file's bytes, as uploaded."""
    dataset = datasets.get_dataset(session, tenant, file_id)
    return FileResponse(store.local_file(dataset.storage_key, dataset.sha256), media_type="application/octet-stream",
                        filename=dataset.filename)


@router.delete("/files/{file_id}")
def delete_file(file_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> dict[str, Any]:
    datasets.delete_dataset(session, tenant, file_id, store)
    return {"id": file_id, "object": "file", "deleted": True}


# -- jobs --------------------------------------------------------------------------------------
def job_object(session: Session, job: Job, kind: str | None = None) -> dict[str, Any]:
    """The OpenAI fine-tuning job; `kind` is its method type when the caller looked it up already."""
    hp = job.hyperparameters
    openai_hp = {"n_epochs": hp.get("epochs"), "batch_size": hp.get("batch_size"),
                 "learning_rate_multiplier": hp.get("learning_rate", 0) / DEFAULT_LEARNING_RATE}
    kind = kind or fine_tuning.method_type(session, job)  # as created: a supervised job is reported as one
    progress = job.progress or {}
    # supervised and dpo jobs carry OpenAI's section for their type (dpo's with its beta)
    section = {"hyperparameters": {**openai_hp, **({"beta": (job.objective or {}).get("beta")} if kind == "dpo" else {})}}
    error = {"code": job.error_code, "message": job.error_message or "", "param": None} if job.error_code else None
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": int(job.created_at.timestamp()),
        "finished_at": int(job.finished_at.timestamp()) if job.finished_at else None,
        "model": job.base_model, "fine_tuned_model": fine_tuned_model(job), "organization_id": job.tenant_id,
        # OpenAI's job has no `cancelling`: a job that is stopping still runs.
        "status": "running" if job.status == "cancelling" else job.status,
        "training_file": job.train_dataset_id, "validation_file": job.val_dataset_id,
        "hyperparameters": openai_hp,
        "method": {"type": kind, **({kind: section} if kind != "sbora" else {}),
                   # what it trains, in every case
                   "sbora": {**job.method, "quantization": job.quantization, "hyperparameters": hp,
                             "resources": ResourcesSpec(**(job.resources or {})).model_dump()}},
        "result_files": [], "trained_tokens": progress.get("tokens"), "error": error, "seed": hp.get("seed"),
        "estimated_finish": int(time.time() + progress["eta_s"]) if job.status == "running" and progress.get("eta_s")
        else None,
        "integrations": [], "user_provided_suffix": job.name, "metadata": job.user_metadata,
    }


@router.post("/fine_tuning/jobs")
def create_fine_tuning_job(req: FineTuningJobCreate, session: SessionDep, tenant: CurrentTenant,
                           settings: SettingsDep) -> dict[str, Any]:
    job = fine_tuning.create_job(session, tenant, req, settings)
    enqueue_job(job.id)
    return job_object(session, job)


def _after(items: list, after: str | None, key) -> list:
    """Cursor pagination as OpenAI does it: the items after the one whose id is `after`."""
    if after is None:
        return items
    ids = [key(i) for i in items]
    return items[ids.index(after) + 1:] if after in ids else []


@router.get("/fine_tuning/jobs")
def list_fine_tuning_jobs(session: SessionDep, tenant: CurrentTenant, after: str | None = Query(None, max_length=64),
                          limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    rows, has_more = fine_tuning.list_jobs_after(session, tenant, after, limit)
    kinds = fine_tuning.method_types(session, rows)
    return {"object": "list", "data": [job_object(session, j, kinds[j.id]) for j in rows], "has_more": has_more}


@router.get("/fine_tuning/jobs/{job_id}")
def get_fine_tuning_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    return job_object(session, jobs.get_job(session, tenant, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_fine_tuning_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    return job_object(session, jobs.cancel_job(session, tenant, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_fine_tuning_events(job_id: str, session: SessionDep, tenant: CurrentTenant,
                            after: str | None = Query(None, max_length=64),
                            limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
    before = None
    if after is not None:  # `ftevent-<id>`; anything else names no event, and nothing follows it
        number = after.removeprefix("ftevent-")
        before = int(number) if number.isdigit() and len(number) < 19 else -1
    rows = jobs.newest_events(session, tenant, job_id, before, limit + 1)  # newest first, as OpenAI lists them
    data = []
    for e in rows[:limit]:
        failed = e.kind == "status" and e.data.get("status") == "failed"
        message = e.message or (f"step {e.data.get('step')}: training loss {e.data.get('loss', 0):.4f}"
                                if e.kind == "metric" else e.kind)
        data.append({"id": f"ftevent-{e.id}", "object": "fine_tuning.job.event", "created_at": int(e.created_at.timestamp()),
                     "level": "error" if failed else "info", "message": message,
                     "type": "metrics" if e.kind in ("metric", "eval") else "message", "data": e.data})
    return {"object": "list", "data": data, "has_more": len(rows) > limit}


def checkpoint_metrics(checkpoint: Adapter, final: Adapter | None) -> dict[str, Any]:
    """What the checkpoint recorded (step, train_loss, train_mean_token_accuracy, valid_loss,
    valid_mean_token_accuracy: OpenAI's names); the one at the job's last step also carries the
    full validation set's full_valid_loss and full_valid_mean_token_accuracy."""
    metrics = {"step": checkpoint.checkpoint_step, **checkpoint.metrics}
    if final is not None and final.metrics.get("steps") == checkpoint.checkpoint_step:
        metrics.update({k: v for k, v in final.metrics.items() if k.startswith("full_valid_") and v is not None})
    return metrics


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_fine_tuning_checkpoints(job_id: str, session: SessionDep, tenant: CurrentTenant,
                                 after: str | None = Query(None, max_length=64),
                                 limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
    """The job's newest checkpoints (hyperparameters.keep_checkpoints of them), newest first; each
    is servable: its `fine_tuned_model_checkpoint` works as `model` in chat and completions."""
    job = jobs.get_job(session, tenant, job_id)
    rest = _after(adapters.checkpoints_of(session, job), after, lambda a: f"ftckpt-{a.id}")
    final = session.get(Adapter, job.adapter_id) if job.adapter_id else None
    data = [{"id": f"ftckpt-{a.id}", "object": "fine_tuning.job.checkpoint", "created_at": int(a.created_at.timestamp()),
             "fine_tuned_model_checkpoint": checkpoint_model(job, a), "fine_tuning_job_id": job.id,
             "step_number": a.checkpoint_step, "metrics": checkpoint_metrics(a, final)}
            for a in rest[:limit]]
    return {"object": "list", "data": data, "has_more": len(rest) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
