"""Request and response bodies. `*Public` schemas are what routes return."""

from __future__ import annotations

from dataclasses import MISSING, fields
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from sbora_core.method.config import SBoRAConfig, field_help
from sbora_core.training.data import lone_surrogate
from sbora_core.training.harness import EvalSpec
from sbora_core.training.job import Hyperparameters, Resources, TrainJob

T = TypeVar("T")


def no_lone_surrogates(text: str) -> str:
    """JSON may escape half of a UTF-16 pair ("\\ud800") on its own: valid JSON but no character, which
    the tokenizer cannot encode (a 500 before). Refused as the field's 422."""
    if (problem := lone_surrogate(text)) is not None:
        raise ValueError(problem)
    return text


Text = Annotated[str, AfterValidator(no_lone_surrogates)]  # request text that reaches a tokenizer


class Page(BaseModel, Generic[T]):
    data: list[T]
    total: int
    limit: int
    offset: int


class ErrorBody(BaseModel):
    detail: Any


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


# -- datasets ----------------------------------------------------------------------------------
class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    owner: str = Field(validation_alias="tenant_id")
    filename: str
    format: str
    records: int
    size_bytes: int
    sha256: str
    stats: dict[str, Any]
    created_at: datetime
    updated_at: datetime


# -- jobs --------------------------------------------------------------------------------------
ModuleNames = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=100)]], Field(min_length=1, max_length=64)
]


def spec_field(spec: type, name: str, **constraints: Any) -> Any:
    """A request field whose default and description come from sbora_core's dataclass `spec`:
    one source for `POST /jobs`, the CLI's job files and the OpenAI mapping."""
    source = {f.name: f for f in fields(spec)}[name]
    if source.default_factory is not MISSING:
        return Field(default_factory=source.default_factory, description=field_help(source), **constraints)
    return Field(source.default, description=field_help(source), **constraints)


class MethodSpec(BaseModel):
    """The adapter to train; fields and defaults are sbora_core.method.config.SBoRAConfig's."""

    # strict: `r: true` is not 1, `"yes"` is not a boolean (lax coercion changed what was asked for)
    model_config = ConfigDict(extra="forbid", strict=True)
    variant: Literal["sbora_fa", "sbora_fb", "lora"] = spec_field(SBoRAConfig, "variant")
    r: int = spec_field(SBoRAConfig, "r", ge=1, le=65536)
    alpha: float = spec_field(SBoRAConfig, "alpha", gt=0, le=1e6)
    dropout: float = spec_field(SBoRAConfig, "dropout", ge=0, lt=1)
    target_modules: ModuleNames | Literal["all-linear", "attention", "mlp"] = spec_field(SBoRAConfig,
                                                                                         "target_modules")
    index_seed: int = spec_field(SBoRAConfig, "index_seed", ge=0, le=2**31 - 1)


class HyperparametersSpec(BaseModel):
    """Training settings; fields and defaults are sbora_core.training.job.Hyperparameters'."""

    model_config = ConfigDict(extra="forbid", strict=True)
    epochs: int = spec_field(Hyperparameters, "epochs", ge=1, le=1000)
    max_steps: int | None = spec_field(Hyperparameters, "max_steps", ge=1, le=10_000_000)
    learning_rate: float = spec_field(Hyperparameters, "learning_rate", gt=0, lt=1)
    warmup_steps: int = spec_field(Hyperparameters, "warmup_steps", ge=0, le=1_000_000)
    warmup_ratio: float = spec_field(Hyperparameters, "warmup_ratio", ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = spec_field(Hyperparameters, "schedule")
    batch_size: int = spec_field(Hyperparameters, "batch_size", ge=1, le=4096)
    grad_accum: int = spec_field(Hyperparameters, "grad_accum", ge=1, le=4096)
    max_seq_len: int = spec_field(Hyperparameters, "max_seq_len", ge=8, le=131072)
    seed: int = spec_field(Hyperparameters, "seed", ge=0, le=2**31 - 1)
    weight_decay: float = spec_field(Hyperparameters, "weight_decay", ge=0, le=10)
    max_grad_norm: float | None = spec_field(Hyperparameters, "max_grad_norm", gt=0)
    eval_every: int | None = spec_field(Hyperparameters, "eval_every", ge=1)
    checkpoint_every: int | None = spec_field(Hyperparameters, "checkpoint_every", ge=1)
    keep_checkpoints: int = spec_field(Hyperparameters, "keep_checkpoints", ge=1, le=100)
    val_fraction: float = spec_field(Hyperparameters, "val_fraction", ge=0, lt=1)
    eval_batch_size: int = spec_field(Hyperparameters, "eval_batch_size", ge=1, le=4096)
    gradient_checkpointing: bool = spec_field(Hyperparameters, "gradient_checkpointing")
    packing: bool = spec_field(Hyperparameters, "packing")


class ResourcesSpec(BaseModel):
    """Where the job trains; fields and defaults are sbora_core.training.job.Resources'."""

    model_config = ConfigDict(extra="forbid", strict=True)
    devices: int = spec_field(Resources, "devices", ge=1, le=64)
    nodes: int = spec_field(Resources, "nodes", ge=1, le=64)
    sharding: Literal["none", "full"] = spec_field(Resources, "sharding")


class EvalSettings(BaseModel):
    """How an evaluation scores; fields and defaults are sbora_core.training.harness.EvalSpec's."""

    model_config = ConfigDict(extra="forbid", strict=True)
    grader: Literal["multiple_choice", "exact_match", "loss"] = spec_field(EvalSpec, "grader")
    protocol: Literal["option_text", "label"] = spec_field(EvalSpec, "protocol")
    length_unit: Literal["chars", "tokens"] = spec_field(EvalSpec, "length_unit")
    max_new_tokens: int = spec_field(EvalSpec, "max_new_tokens", ge=1, le=4096)
    max_seq_len: int = spec_field(EvalSpec, "max_seq_len", ge=8, le=131072)
    batch_size: int = spec_field(EvalSpec, "batch_size", ge=1, le=1024)
    chunk_size: int = spec_field(EvalSpec, "chunk_size", ge=1, le=4096)
    limit: int | None = spec_field(EvalSpec, "limit", ge=1, le=10_000_000)
    seed: int = spec_field(EvalSpec, "seed", ge=0, le=2**31 - 1)


class EvalAfter(EvalSettings):
    """An evaluation queued when the job succeeds: the base model against the new adapter."""

    dataset_id: str = Field(..., min_length=1, max_length=64, description="the evaluation set (POST /datasets)")


JobMetadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                              Annotated[str, StringConstraints(max_length=512)]], Field(max_length=16)]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    base_model: str = Field("smollm2-135m-instruct", min_length=1, max_length=500)
    training_dataset_id: str = Field(..., min_length=1, max_length=64)
    validation_dataset_id: str | None = Field(None, max_length=64)
    method: MethodSpec = Field(default_factory=MethodSpec)
    quantization: Literal["none", "nf4", "int8"] = "none"
    hyperparameters: HyperparametersSpec = Field(default_factory=HyperparametersSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    name: str | None = Field(None, max_length=200)
    group: str | None = Field(None, max_length=64, description="an adapter group id: the job takes a free slot "
                                                                "of it and the group's variant, rank and targets")
    eval_after: EvalAfter | None = Field(None, description="queue an evaluation of the base and the new adapter "
                                                           "when the job succeeds")
    objective: Literal["sft", "dpo"] = Field("sft", description="sft: supervised on chat, prompt/completion or "
                                             "instruction records; dpo: preference pairs (a preference dataset)")
    beta: float = spec_field(TrainJob, "beta", gt=0, le=100)
    loss: Literal["sigmoid", "ipo"] = spec_field(TrainJob, "loss")
    init_adapter_id: str | None = Field(None, max_length=64, description="start from this adapter's index sets "
                                        "and factors (supervised first, then dpo); for dpo it is the reference")
    metadata: JobMetadata | None = Field(None, description="up to 16 string pairs, kept and returned with the job")


class JobError(BaseModel):
    code: str
    message: str


class JobProgress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None


class JobPublic(BaseModel):
    id: str
    owner: str
    name: str | None
    base_model: str
    quantization: str
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    resources: ResourcesSpec
    training_dataset_id: str
    validation_dataset_id: str | None
    status: str
    progress: JobProgress
    error: JobError | None
    adapter_id: str | None
    attempts: int
    eval_after: dict[str, Any] | None = None
    objective: str = "sft"
    beta: float | None = None  # dpo's
    loss: str | None = None  # dpo's
    init_adapter_id: str | None = None
    metadata: dict[str, str] | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, job: Any) -> JobPublic:
        return cls(
            id=job.id, owner=job.tenant_id, name=job.name, base_model=job.base_model,
            quantization=job.quantization, method=job.method, hyperparameters=job.hyperparameters,
            resources=ResourcesSpec(**(job.resources or {})),
            training_dataset_id=job.train_dataset_id, validation_dataset_id=job.val_dataset_id,
            status=job.status, progress=JobProgress(**(job.progress or {})),
            error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            adapter_id=job.adapter_id, attempts=job.attempts, eval_after=job.eval_after,
            objective=(job.objective or {}).get("type", "sft"), beta=(job.objective or {}).get("beta"),
            loss=(job.objective or {}).get("loss"), init_adapter_id=job.init_adapter_id,
            metadata=job.user_metadata, created_at=job.created_at,
            updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
        )


class JobEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: str
    created_at: datetime
    kind: str
    message: str
    data: dict[str, Any]


# -- adapters and models -----------------------------------------------------------------------
class AdapterPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    owner: str = Field(validation_alias="tenant_id")
    job_id: str | None
    name: str | None
    base_model: str
    base_fingerprint: str
    variant: str
    r: int
    alpha: float
    target_modules: list[Any]
    trainable_params: int
    size_bytes: int
    sha256: str
    metrics: dict[str, Any]
    checkpoint_step: int | None = Field(None, description="set on a job's checkpoint, registered while it trained")
    created_at: datetime
    updated_at: datetime


class ComposeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    adapter_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(..., min_length=1,
                                                                                                max_length=64)
    weights: list[Annotated[float, Field(allow_inf_nan=False, ge=-100, le=100)]] | None = Field(
        None, description="one per adapter: each update is multiplied by its weight (default 1)")
    name: str | None = Field(None, max_length=200)


# -- adapter groups ------------------------------------------------------------------------------
class GroupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(..., min_length=1, max_length=200)
    base_model: str = Field("smollm2-135m-instruct", min_length=1, max_length=500)
    variant: Literal["sbora_fa", "sbora_fb", "lora"] = Field("sbora_fa", description="sbora_fa or sbora_fb")
    r: int = Field(8, ge=1, le=65536, description="rank of every member")
    target_modules: ModuleNames | Literal["all-linear", "attention", "mlp"] = spec_field(SBoRAConfig,
                                                                                         "target_modules")


class GroupLayer(BaseModel):
    name: str
    dimension: int = Field(description="what the variant selects from: in_features (FA) or out_features (FB)")
    capacity: int
    used: int
    free: int


class GroupMember(BaseModel):
    slot: int
    job_id: str
    adapter_id: str | None
    status: str | None = Field(description="the job's status")


class GroupLayerOwners(BaseModel):
    name: str
    axis: Literal["columns", "rows"]
    dimension: int
    owners: dict[int, list[int]] = Field(description="slot -> the indices of this layer its member changes")


class GroupIndexMap(BaseModel):
    group_id: str
    members: list[GroupMember]
    layers: list[GroupLayerOwners]


class GroupPublic(BaseModel):
    id: str
    owner: str
    name: str
    base_model: str
    variant: str
    r: int
    target_modules: list[str]
    capacity: int = Field(description="members the group can hold: min over layers of dimension // r")
    used: int
    free: int
    created_at: datetime
    updated_at: datetime


class GroupDetail(GroupPublic):
    layers: list[GroupLayer]
    members: list[GroupMember]


class ModelPublic(BaseModel):
    id: str
    origin: Literal["configured", "registered"] = Field(
        "configured", description="configured: named by SBORA_MODELS; registered: added with POST /models")
    model_type: str | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    has_chat_template: bool | None = None
    linear_modules: dict[str, dict[str, int]] = {}


class ModelRegister(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    source: str = Field(..., min_length=1, max_length=1000,
                        description="a model directory on the server (config.json + *.safetensors) or a hub id")
    name: str | None = Field(None, max_length=100, description="public id; default: the directory's name")


# -- generation --------------------------------------------------------------------------------
class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: Text = Field(..., max_length=1_000_000)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    base_model: str | None = Field(None, description="defaults to the adapter's base, else the first model")
    prompt: Text | None = Field(None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=1000)
    adapter_id: str | list[str] | None = None
    adapter_weights: list[Annotated[float, Field(allow_inf_nan=False, ge=-100, le=100)]] | None = Field(
        None, max_length=64, description="one per adapter_id: each adapter's update is multiplied by its weight")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[Text] | Text | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False


class GenerateResponse(BaseModel):
    text: str
    base_model: str
    adapter_ids: list[str]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


# -- adapter update map (the dashboard's picture of an adapter) --------------------------------
class UpdateMapModule(BaseModel):
    """One adapted layer: which columns (FA, LoRA) or rows (FB) of W change, and by how much."""

    name: str
    variant: str
    axis: Literal["columns", "rows"]
    dimension: int = Field(description="in_features for columns, out_features for rows")
    in_features: int
    out_features: int
    indices: list[int] = Field(description="the changed columns/rows; all of them for LoRA")
    norms: list[float] = Field(description="L2 norm of each changed column/row of (alpha/r)·factor")


class UpdateMapPublic(BaseModel):
    adapter_id: str
    variant: str
    r: int
    alpha: float
    scaling: float
    max_norm: float
    modules: list[UpdateMapModule]
