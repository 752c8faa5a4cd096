"""SBoRAConfig: what an adapter is (variant, rank, scaling, targets, index seed).

These dataclasses are the single source of a job's settings and their
defaults: the service's request models, the CLI's job file and the OpenAI
mapping all derive theirs from here. Checks that need only the config live in
`__post_init__`; checks that need the model (rank against layer sizes,
targets that exist) live in `inject.py`. Every error is a `ConfigError`
carrying the field to change.
"""

from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from sbora_core.method.variants import VARIANTS, Variant, get_variant

ALL_LINEAR = "all-linear"
# Layer sets named by role, as PEFT names them: every linear layer but the output head, the attention
# projections, the MLP's. Resolved per model family (`inject.layer_role`).
PRESETS = (ALL_LINEAR, "attention", "mlp")
# The seven projections of the LLaMA family, as targeted by the reference code.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A setting that cannot work; `field` names it (dotted inside a section, e.g. `r`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def field_help(dataclass_field: Field) -> str:
    return str(dataclass_field.metadata.get("help", ""))


@dataclass
class SBoRAConfig:
    variant: str = field(
        default="sbora_fa",
        metadata={"help": "sbora_fa (train B, fixed columns), sbora_fb (train A, fixed rows) or lora"},
    )
    r: int = field(default=32, metadata={"help": "rank: number of standard-basis vectors per layer"})
    alpha: float = field(default=64.0, metadata={"help": "scaling numerator; the update is scaled by alpha/r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter path's input, 0 <= p < 1"})
    target_modules: list[str] | str = field(
        default=ALL_LINEAR,
        metadata={"help": "module names (last path component) to adapt, or a preset: 'all-linear' (every "
                          "linear layer but the output head: the seven projections on LLaMA-family models), "
                          "'attention' or 'mlp'"},
    )
    index_seed: int = field(
        default=0, metadata={"help": "seed from which each layer's index set is drawn reproducibly"}
    )
    index_slot: int = field(
        default=0, metadata={"help": "which block of r indices of each layer's permutation (drawn from index_seed) "
                                     "the adapter takes: adapters with one seed and different slots are disjoint"}
    )
    base_fingerprint: str | None = field(
        default=None, metadata={"help": "fingerprint of the base model's weights (set by training)"}
    )

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError("variant", f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if not is_int(self.r) or self.r <= 0:
            raise ConfigError("r", f"rank must be a positive integer, got {self.r!r}")
        if not is_number(self.alpha) or not self.alpha > 0:
            raise ConfigError("alpha", f"must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if isinstance(self.target_modules, str):
            if self.target_modules not in PRESETS:
                self.target_modules = [self.target_modules]
        else:
            names = list(self.target_modules)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ConfigError("target_modules", f"give a non-empty list of module names, or one of "
                                                    f"{', '.join(PRESETS)}")
            self.target_modules = names
        if not is_int(self.index_seed) or self.index_seed < 0:
            raise ConfigError("index_seed", f"must be a non-negative integer, got {self.index_seed!r}")
        if not is_int(self.index_slot) or self.index_slot < 0:
            raise ConfigError("index_slot", f"must be a non-negative integer, got {self.index_slot!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def kind(self) -> Variant:
        """The variant object (`variant` is its name)."""
        return get_variant(self.variant)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SBoRAConfig:
        """From a mapping that may hold other keys too (an adapter file's config)."""
        data = dict(data)
        if "base_fingerprint" not in data and str(data.get("base_model", "")).startswith("sha256:"):
            data["base_fingerprint"] = data["base_model"]  # adapter files written before the rename
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# The fields a user sets; `base_fingerprint` is recorded by training, `index_slot` given out by an
# adapter group (app.services.groups).
USER_FIELDS = tuple(f.name for f in fields(SBoRAConfig) if f.name not in ("base_fingerprint", "index_slot"))
