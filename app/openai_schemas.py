"""Request bodies of the OpenAI-compatible routes (inference under /v1, and fine-tuning).

The adapter settings a fine-tuning request may carry under `method.sbora` are
the service's own `MethodSpec`, so their defaults are sbora_core's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import JobMetadata, MethodSpec, ResourcesSpec, Text


# -- inference ---------------------------------------------------------------------------------
class ContentPart(BaseModel):
    """A part of a message's content; only text parts are served (others answer 400 naming them)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str = Field(..., max_length=100)
    text: Text | None = Field(None, max_length=1_000_000)


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_call_id, ... are accepted and ignored
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = Field(None, max_length=1_000_000)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    # Unknown fields are kept so that the route answers 400 naming them (`IGNORABLE` excepted): a
    # parameter silently dropped is a request served other than as asked.
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(..., min_length=1, max_length=500)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Text | list[Text] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=300, description="token id (as a string) -> bias added to its logit, -100..100")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="lowers the logit of every token generated "
                                                                   "so far, once")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="lowers the logit of each token generated so "
                                                                    "far, once per time it was drawn")
    modalities: list[str] | None = Field(None, description="only ['text'] is served")
    audio: Any = None
    user: str | None = Field(None, max_length=500, description="the end user's id; not used")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128, description="choices per prompt; only 1 is served (more answers 400)")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-text token (as in vLLM)")
    # Parameters this server does not implement: declared so that a request using them answers 400
    # naming the parameter, instead of having it silently ignored.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1, max_length=1_000_000)]


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        ..., max_length=1_000_000, description="text, texts, token ids, or lists of token ids")
    max_tokens: int = Field(16, ge=0, description="0 with echo: score the prompt, generate nothing")
    logprobs: int | None = Field(None, ge=0, le=20, description="alternatives reported per token")
    echo: bool = Field(False, description="return the prompt before the completion; with logprobs, the "
                                          "log-probability of every prompt token too (the first has none)")
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[OpenAIMessage] = Field(..., min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# -- fine-tuning -------------------------------------------------------------------------------
Auto = Literal["auto"]


class OpenAIHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=1000)] | Auto = "auto"


class SBoRAHyperparameters(OpenAIHyperparameters):
    """OpenAI's three plus any native hyperparameter (see HyperparametersSpec)."""

    model_config = ConfigDict(extra="allow")


class SBoRASettings(MethodSpec):
    quantization: Literal["none", "nf4", "int8"] = "none"
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="devices, nodes and sharding")
    group: str | None = Field(None, max_length=64, description="an adapter group id (see POST /groups)")
    hyperparameters: SBoRAHyperparameters = Field(default_factory=SBoRAHyperparameters)


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    hyperparameters: OpenAIHyperparameters = Field(default_factory=OpenAIHyperparameters)


class DpoHyperparameters(OpenAIHyperparameters):
    beta: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class FineTuneMethod(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # reinforcement is declared so that it answers 400 naming method.type, not a generic 422
    type: Literal["supervised", "dpo", "sbora", "reinforcement"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    sbora: SBoRASettings | None = Field(None, description="the adapter settings, with any method type")


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(..., min_length=1, max_length=500)
    training_file: str = Field(..., min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: OpenAIHyperparameters | None = Field(None, description="deprecated by OpenAI; use method")
    method: FineTuneMethod = Field(default_factory=FineTuneMethod)
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: JobMetadata | None = None
    # Declared so that a non-empty list answers 400 naming it rather than being dropped.
    integrations: list[Any] | None = Field(None, description="not served: a non-empty list answers 400")
