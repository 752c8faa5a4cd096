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
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import Invalid, NotFound, Unsupported
from app.models import Adapter, Job, Tenant
from app.openai_schemas import FineTuningJobCreate, OpenAIHyperparameters
from app.schemas import HyperparametersSpec, JobCreate, MethodSpec, ResourcesSpec
from app.services import jobs
from app.services.adapters import get_adapter
from sbora_core.training.job import Hyperparameters, TrainJob

DEFAULT_LEARNING_RATE = Hyperparameters().learning_rate
# Our field names, as the OpenAI request spells them (for errors' `param`).
_OPENAI_FIELD = {"base_model": "model", "training_dataset_id": "training_file",
                 "validation_dataset_id": "validation_file", "method": "method.sbora",
                 "hyperparameters": "method.sbora.hyperparameters", "group": "method.sbora.group",
                 "resources": "method.sbora.resources", "init_adapter_id": "model", "beta": "method.dpo.hyperparameters.beta",
                 "objective": "method.type"}


DPO_BETA = TrainJob.__dataclass_fields__["beta"].default  # OpenAI's "auto" beta (0.1)


def _openai_hyperparameters(req: FineTuningJobCreate) -> OpenAIHyperparameters:
    """The three OpenAI hyperparameters (with dpo's beta); the deprecated top-level `hyperparameters`
    must agree with the method's when both are given."""
    sbora = req.method.sbora
    if req.method.type == "sbora":
        assert sbora is not None
        return sbora.hyperparameters
    section = req.method.dpo if req.method.type == "dpo" else req.method.supervised
    where = f"method.{req.method.type}.hyperparameters"
    if section is None:  # OpenAI's three may also sit with the native ones under method.sbora
        return req.hyperparameters or (sbora.hyperparameters if sbora else OpenAIHyperparameters())
    if req.hyperparameters is not None:
        top = req.hyperparameters.model_dump(exclude_unset=True)
        method = section.hyperparameters.model_dump()
        if clash := next((k for k, v in top.items() if method.get(k) != v), None):
            raise Unsupported("hyperparameters", f"hyperparameters.{clash} ({top[clash]!r}) disagrees with "
                                                 f"{where}.{clash} ({method[clash]!r}); give it in one place")
    return section.hyperparameters


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
    openai_hp = _openai_hyperparameters(req)
    hp: dict[str, Any] = dict(sbora.hyperparameters.model_extra or {}) if sbora else {}
    if openai_hp.n_epochs != "auto":
        hp["epochs"] = openai_hp.n_epochs
    if openai_hp.batch_size != "auto":
        hp["batch_size"] = openai_hp.batch_size
    if openai_hp.learning_rate_multiplier != "auto":
        hp["learning_rate"] = DEFAULT_LEARNING_RATE * openai_hp.learning_rate_multiplier
    if req.seed is not None:
        hp["seed"] = req.seed
    beta = getattr(openai_hp, "beta", "auto")
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
            adapter = get_adapter(session, tenant, adapter_of_model(req.model))
        except NotFound as exc:
            raise Invalid("model", f"model: {exc}; name a fine-tuned model of this server") from exc
        spec = spec.model_copy(update={"base_model": adapter.base_model, "init_adapter_id": adapter.id})
    try:
        return jobs.create_job(session, tenant, spec, settings)
    except Invalid as exc:
        head, _, rest = exc.field.partition(".")
        field = _OPENAI_FIELD.get(head, head) + (f".{rest}" if rest else "")
        message = exc.message.replace(head, _OPENAI_FIELD.get(head, head), 1).replace("POST /datasets", "POST /v1/files")
        raise Invalid(field, message, exc.errors) from exc
    except NotFound as exc:  # the group: named as the OpenAI request spells it
        raise NotFound(str(exc), param=_OPENAI_FIELD.get(exc.param or "", exc.param)) from exc


def fine_tuned_model(job: Job) -> str | None:
    return f"ft:{job.base_model}:{job.name or ''}:{job.adapter_id}" if job.adapter_id else None


def checkpoint_model(job: Job, adapter: Adapter) -> str:
    """A checkpoint's model name, as OpenAI spells them: the fine-tuned name plus `:ckpt-step-N`."""
    return f"ft:{job.base_model}:{job.name or ''}:{adapter.id}:ckpt-step-{adapter.checkpoint_step}"


def adapter_of_model(model: str) -> str:
    """The adapter id a model name names: `ft:<base>:<suffix>:<adapter id>`, with `:ckpt-step-N` for
    a checkpoint, or an adapter id itself."""
    if not model.startswith("ft:"):
        return model
    parts = model.split(":")
    return parts[-2] if parts[-1].startswith("ckpt-step-") and len(parts) > 2 else parts[-1]
