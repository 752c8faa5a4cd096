"""Request and response bodies of `/evaluations`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import EvalSettings, JobError

MAX_CANDIDATES = 16


class CandidateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=2000, description=(
        "a base model, an adapter id, a fine-tuned or checkpoint model name (ft:...), or adapter ids joined "
        "with '+' (a composition; their index sets must be disjoint)"))
    weights: list[Annotated[float, Field(allow_inf_nan=False, ge=-100, le=100)]] | None = Field(
        None, max_length=64, description="one per adapter of `model`: each update is multiplied by its weight")
    label: str | None = Field(None, min_length=1, max_length=100, description="its name in the result "
                                                                               "(default: `model`)")


class EvaluationCreate(EvalSettings):
    dataset_id: str = Field(..., min_length=1, max_length=64, description="the items (POST /datasets)")
    candidates: list[CandidateSpec | Annotated[str, Field(min_length=1, max_length=2000)]] = Field(
        ..., min_length=1, max_length=MAX_CANDIDATES,
        description="what is scored on the same items: model names, or {model, weights, label} objects")
    name: str | None = Field(None, max_length=200)


class EvaluationProgress(BaseModel):
    done: int = Field(0, description="items scored, over every candidate")
    total: int | None = None
    candidate: str | None = Field(None, description="the candidate being scored")
    tokens: int | None = Field(None, description="tokens read and generated so far")


class EvaluationPublic(BaseModel):
    id: str
    owner: str
    name: str | None
    status: str
    progress: EvaluationProgress
    dataset_id: str
    base_model: str
    settings: dict[str, Any] = Field(description="how it scores (EvalSettings, complete)")
    candidates: list[dict[str, Any]] = Field(description="label, model, adapter_ids, weights of each candidate")
    result: dict[str, Any] | None = Field(description=(
        "once it succeeded: each candidate's metrics with 95% bootstrap intervals, correct and wrong counts "
        "and tokens used, and the paired difference (candidate - versus) of every pair on the same items"))
    error: JobError | None
    attempts: int
    source_job_id: str | None = Field(description="the job whose eval_after queued it")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EvaluationItemPublic(BaseModel):
    candidate: str
    candidate_index: int
    item: int = Field(description="the item's position among those scored")
    line: int = Field(description="its line in the dataset file")
    correct: bool | None
    values: dict[str, list[float]] = Field(description="per metric: [numerator, denominator]")
    output: dict[str, Any] = Field(description="what the model chose or generated")
    tokens: int
