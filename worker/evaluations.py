"""Running one evaluation job: candidates scored chunk by chunk into the database, then summarised.

The job was claimed like a training job (`runner.run_job`) and its lease is kept by the same
heartbeat. Each chunk's per-item results are written in one transaction, only while this worker
still holds the lease, so a worker that took the job over starts at the first chunk not stored and
no item is scored into the results twice. The summary is computed from the stored rows, so a
resumed evaluation ends with exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, update

from app import catalog
from app.core.config import Settings
from app.core.db import session_scope
from app.models import LEASED_STATUSES, Adapter, Dataset, Evaluation, EvaluationItem, Job, utcnow
from app.services.adapters import adapter_files
from app.services.evaluations import scored_counts
from app.services.jobs import add_event
from app.storage import ArtifactStore
from sbora_core.method.adapter_io import WEIGHTS_FILE, load_adapter
from sbora_core.method.files import sha256_file
from sbora_core.method.models import load_base_model
from sbora_core.training.eval_items import EvalItem, read_eval_items
from sbora_core.training.harness import Candidate, EvalSpec, ResultSink, run_evaluation, summarise
from sbora_core.training.scoring import ItemResult
from worker.runner import DatasetMissing, Heartbeat, _finish, classify_error, rows_updated

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another worker holds the evaluation now: stop without writing."""


class AdapterMissing(LookupError):
    """A candidate's adapter was deleted after the evaluation was queued."""


class DatabaseSink(ResultSink):
    """Chunks into `evaluation_items` (with the job's progress, in the same transaction)."""

    def __init__(self, job_id: str, owner: str, heartbeat: Heartbeat, items: list[EvalItem],
                 labels: list[str]) -> None:
        self.job_id, self.owner, self.heartbeat = job_id, owner, heartbeat
        self.items, self.labels = len(items), labels
        self.lines = {item.index: item.line for item in items}
        with session_scope() as session:
            self.stored = scored_counts(session, job_id)  # what earlier attempts stored, per candidate
            self.tokens = sum(int(t or 0) for t in session.scalars(
                select(EvaluationItem.tokens).where(EvaluationItem.evaluation_id == job_id)))
        self.stored_before = sum(self.stored.values())
        self.scored_here = 0

    def scored(self, candidate: int) -> int:
        return self.stored.get(candidate, 0)

    def store(self, candidate: int, results: list[ItemResult]) -> None:
        done = sum(self.stored.values()) + len(results)
        self.tokens += sum(r.tokens for r in results)
        progress = {"done": done, "total": self.items * len(self.labels), "candidate": self.labels[candidate],
                    "tokens": self.tokens}
        with session_scope() as session:
            # Still ours? Then the rows and the progress go in together; else nothing is written.
            if rows_updated(session, update(Job).where(Job.id == self.job_id, Job.lease_owner == self.owner,
                                                       Job.status.in_(LEASED_STATUSES))
                            .values(progress=progress, updated_at=utcnow())
                            .execution_options(synchronize_session=False)) != 1:
                raise LeaseLost(self.job_id)
            session.add_all(EvaluationItem(evaluation_id=self.job_id, candidate=candidate, item=r.index,
                                           line=self.lines.get(r.index, 0), correct=r.correct,
                                           values={k: list(v) for k, v in r.values.items()}, output=r.output,
                                           tokens=r.tokens) for r in results)
        self.stored[candidate] = self.stored.get(candidate, 0) + len(results)
        self.scored_here += len(results)

    def should_cancel(self) -> bool:
        if self.heartbeat.lost:
            return True
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            return job is None or job.cancel_requested


def _candidates(evaluation: Evaluation, store: ArtifactStore) -> list[Candidate]:
    """The stored candidates with their adapters loaded (each checked against its recorded sha256)."""
    out = []
    with session_scope() as session:
        for spec in evaluation.candidates:
            adapters = []
            for adapter_id in spec["adapter_ids"]:
                row = session.get(Adapter, adapter_id)
                if row is None:
                    raise AdapterMissing(f"adapter {adapter_id} was deleted")
                folder = adapter_files(row, store)
                if sha256_file(folder / WEIGHTS_FILE) != row.weights_sha256:
                    raise ValueError(f"adapter {adapter_id}: its stored weights do not match their sha256")
                adapters.append(load_adapter(folder))
            out.append(Candidate(spec["label"], adapters, spec.get("weights")))
    return out


def run_claimed_evaluation(job_id: str, owner: str, settings: Settings, store: ArtifactStore) -> str | None:
    heartbeat = Heartbeat(job_id, owner, settings.job_lease_s)
    heartbeat.start()
    try:
        with session_scope() as session:
            evaluation = session.get(Evaluation, job_id)
            assert evaluation is not None
            session.expunge(evaluation)
            dataset = session.get(Dataset, evaluation.dataset_id)
            if dataset is None:
                raise DatasetMissing(f"dataset {evaluation.dataset_id} was deleted")
            path = store.local_file(dataset.storage_key, dataset.sha256)
        spec = EvalSpec(**evaluation.spec)
        items = read_eval_items(path, spec.grader, protocol=spec.protocol, limit=spec.limit, seed=spec.seed)
        labels = [c["label"] for c in evaluation.candidates]
        candidates = _candidates(evaluation, store)
        base = load_base_model(catalog.source_of(evaluation.base_model))
        sink = DatabaseSink(job_id, owner, heartbeat, items, labels)
        _log(job_id, f"{len(items)} items x {len(labels)} candidates on {base.name}"
             + (f"; resuming after the {sink.stored_before} item results stored" if sink.stored_before else ""))
        finished = run_evaluation(base.model, base.tokenizer, base.fingerprint, candidates, items, spec, sink)
        _log(job_id, f"this attempt scored {sink.scored_here} item results", {"scored": sink.scored_here})
        if heartbeat.lost:
            return None
        if not finished:
            _finish(job_id, owner, "cancelled", f"cancelled after {sum(sink.stored.values())} item results")
            return "cancelled"
        result = summarise(_stored_results(job_id, len(labels)), labels, spec)
        with session_scope() as session:
            session.execute(update(Evaluation).where(Evaluation.id == job_id).values(result=result))
        _finish(job_id, owner, "succeeded", "succeeded")
        return "succeeded"
    except LeaseLost:
        log.warning("lease on %s lost; leaving the evaluation to its new owner", job_id)
        return None
    except Exception as exc:
        log.exception("evaluation %s failed", job_id)
        if isinstance(exc, DatasetMissing | AdapterMissing):
            code = "dataset_missing" if isinstance(exc, DatasetMissing) else "adapter_missing"
            message = f"{exc}; create the evaluation again"
        else:
            code, message = classify_error(exc)
        _finish(job_id, owner, "failed", f"failed: {code}", error_code=code, error_message=message)
        return "failed"
    finally:
        heartbeat.stop_event.set()


def _stored_results(job_id: str, candidates: int) -> list[list[ItemResult]]:
    """Every candidate's results as stored (the summary reads these, so a resumed run sums the same)."""
    results: list[list[ItemResult]] = [[] for _ in range(candidates)]
    with session_scope() as session:
        for row in session.scalars(select(EvaluationItem).where(EvaluationItem.evaluation_id == job_id)
                                   .order_by(EvaluationItem.candidate, EvaluationItem.item)):
            results[row.candidate].append(ItemResult(row.item, row.correct, {k: (v[0], v[1]) for k, v in row.values.items()},
                                                     row.output, row.tokens))
    return results


def _log(job_id: str, message: str, data: dict[str, Any] | None = None) -> None:
    log.info("%s", message)
    with session_scope() as session:
        add_event(session, job_id, "log", message, data)
