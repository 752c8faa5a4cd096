"""Database tables. The database is the source of truth for every job; the broker only carries ids."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from app.ids import new_id

JOB_STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
JOB_KINDS = ("train", "evaluation")  # what a worker does with a job it claims
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
LEASED_STATUSES = ("running", "cancelling")  # a worker holds the job
UNFINISHED_STATUSES = ("queued", *LEASED_STATUSES)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are UTC and time-zone aware on the way in and out, whatever the database keeps:
    SQLite stores them without a zone, PostgreSQL answers in the session's zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return self.process_bind_param(value, dialect)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Tenant(Timestamps, Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(100), unique=True)


class ApiKey(Timestamps, Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings; the key itself is never stored
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the key
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # "tenant": the tenant's own objects; "admin": also what every tenant shares (the base models).
    scope: Mapped[str] = mapped_column(String(16), default="tenant", server_default="tenant")


class RegisteredModel(Timestamps, Base):
    """A base model added at run time (`POST /models`), offered beside those `SBORA_MODELS` names."""

    __tablename__ = "base_models"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)  # the public id jobs and adapters use
    source: Mapped[str] = mapped_column(String(1000))  # a directory or hub id, as sbora_core.method.models resolves it
    fingerprint: Mapped[str] = mapped_column(String(80))
    model_type: Mapped[str] = mapped_column(String(64))
    hidden_size: Mapped[int | None] = mapped_column(Integer, default=None)
    num_hidden_layers: Mapped[int | None] = mapped_column(Integer, default=None)
    context_length: Mapped[int | None] = mapped_column(Integer, default=None)
    has_chat_template: Mapped[bool] = mapped_column(Boolean, default=False)


class Dataset(Timestamps, Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))  # as uploaded; display only, never a path
    format: Mapped[str] = mapped_column(String(32))
    records: Mapped[int] = mapped_column(Integer)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))


class Job(Timestamps, Base):
    """Work for the queue: a fine-tuning run, or an evaluation (whose spec and result live in
    `evaluations`, under the same id). Claims, leases, retries and cancels are the same for both."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="train", server_default="train", index=True)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    base_model: Mapped[str] = mapped_column(String(500))
    quantization: Mapped[str] = mapped_column(String(8), default="none")
    method: Mapped[dict[str, Any]] = mapped_column(default=dict)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # devices, nodes, sharding (sbora_core.training.job.Resources); {} in rows older than them: the defaults
    resources: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))
    # Plain ids, not foreign keys: a dataset may be deleted once no unfinished job needs it.
    train_dataset_id: Mapped[str] = mapped_column(String(40))
    val_dataset_id: Mapped[str | None] = mapped_column(String(40), default=None)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    adapter_id: Mapped[str | None] = mapped_column(String(40), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)  # host:pid:thread of the runner
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    worker_node: Mapped[str | None] = mapped_column(String(200), default=None)  # the Celery worker running it
    # The attempt the last broker message was sent for, and when: the reconciler sends at most one
    # message per attempt (see app.reconcile).
    enqueued_attempt: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # An evaluation to queue when the job succeeds (its dataset, grader and settings; the candidates
    # are the base and the new adapter).
    eval_after: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # {"type": "sft"} or {"type": "dpo", "beta", "loss"}; {} in rows older than it: sft
    objective: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))
    init_adapter_id: Mapped[str | None] = mapped_column(String(40), default=None)  # the adapter it starts from
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", default=None)  # the client's tags


class Evaluation(Base):
    """An evaluation job's spec and result; its status, lease and events are its `jobs` row's."""

    __tablename__ = "evaluations"
    id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    dataset_id: Mapped[str] = mapped_column(String(40))
    base_model: Mapped[str] = mapped_column(String(500))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # sbora_core's EvalSpec, complete
    candidates: Mapped[list[Any]] = mapped_column(default=list)  # [{label, model, adapter_ids, weights}]
    source_job_id: Mapped[str | None] = mapped_column(String(40), default=None)  # queued by a job's eval_after
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # the summary, once finished
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvaluationItem(Base):
    """One candidate's result on one item, stored with the rest of its chunk in one transaction."""

    __tablename__ = "evaluation_items"
    __table_args__ = (UniqueConstraint("evaluation_id", "candidate", "item"),)  # never scored twice
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    evaluation_id: Mapped[str] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    candidate: Mapped[int] = mapped_column(Integer)
    item: Mapped[int] = mapped_column(Integer)
    line: Mapped[int] = mapped_column(Integer)
    correct: Mapped[bool | None] = mapped_column(Boolean, default=None)
    values: Mapped[dict[str, Any]] = mapped_column(default=dict)  # metric -> [numerator, denominator]
    output: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tokens: Mapped[int] = mapped_column(Integer, default=0)


class Worker(Base):
    """A training worker's heartbeat: written every few seconds by the worker's main process."""

    __tablename__ = "workers"
    node: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery node name#pid: cpu@host#4242
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(100), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # cpu or gpu
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    job_id: Mapped[str | None] = mapped_column(String(40), default=None)  # what it runs now
    idle_since: Mapped[datetime | None] = mapped_column(default=utcnow)  # None while it holds a message or runs a job
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # GPUs (CPU ranks) it offers a job
    address: Mapped[str | None] = mapped_column(String(200), default=None)  # where other machines reach it


class GangSlot(Base):
    """A machine's place in a job spanning several (`resources.nodes`), claimed by one worker for one
    formation of the gang (the job's next attempt). Slot 0's worker hosts the rendezvous; the gang
    starts when every slot is claimed, and a gang that does not fill in time deletes its slots."""

    __tablename__ = "gang_slots"
    __table_args__ = (UniqueConstraint("job_id", "formation", "slot"),
                      UniqueConstraint("job_id", "formation", "hostname"))  # one slot per machine
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    formation: Mapped[int] = mapped_column(Integer)
    slot: Mapped[int] = mapped_column(Integer)
    worker_node: Mapped[str] = mapped_column(String(200))
    hostname: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str | None] = mapped_column(String(300), default=None)  # slot 0: the rendezvous host:port
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterGroup(Timestamps, Base):
    """Adapters of one tenant, base model and variant whose index sets are disjoint by construction:
    every member takes its own slot, a block of r indices of each layer's permutation (drawn from the
    group's index seed), so any subset of members composes exactly."""

    __tablename__ = "adapter_groups"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("grp"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(500))
    variant: Mapped[str] = mapped_column(String(16))
    r: Mapped[int] = mapped_column(Integer)
    target_modules: Mapped[list[Any]] = mapped_column(default=list)  # names, or one preset: ["all-linear"]
    index_seed: Mapped[int] = mapped_column(Integer)


class GroupSlot(Base):
    """A slot of a group, held by a job while it is queued or running, then by its adapter."""

    __tablename__ = "group_slots"
    __table_args__ = (UniqueConstraint("group_id", "slot"),)  # two jobs never get one slot
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("adapter_groups.id"), index=True)
    slot: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(40), unique=True)
    adapter_id: Mapped[str | None] = mapped_column(String(40), default=None, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # status | log | metric | eval | checkpoint
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Adapter(Timestamps, Base):
    __tablename__ = "adapters"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ad"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    base_model: Mapped[str] = mapped_column(String(500), index=True)
    base_fingerprint: Mapped[str] = mapped_column(String(80))
    variant: Mapped[str] = mapped_column(String(16))
    r: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float]
    target_modules: Mapped[list[Any]] = mapped_column(default=list)
    trainable_params: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # the sparse archive users download
    sha256: Mapped[str] = mapped_column(String(64))  # of the sparse archive: the download's ETag
    weights_sha256: Mapped[str] = mapped_column(String(64))  # of adapter_model.safetensors, checked on load
    storage_key: Mapped[str] = mapped_column(String(255))  # folder holding the adapter files
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checkpoint_step: Mapped[int | None] = mapped_column(Integer, default=None)  # a job's checkpoint, servable
