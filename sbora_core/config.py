"""SBoRAConfig: what an adapter is (variant, rank, scaling, targets, index seed).

Checks that need only the config live in `__post_init__`; checks that need the
model (rank against layer sizes, targets that exist) live in `inject.py`.
Every error is a `ValueError` that names the field to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

VARIANTS = ("sbora_fa", "sbora_fb", "lora")
ALL_LINEAR = "all-linear"
# The seven projections of the LLaMA family, as targeted by the reference code.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SBoRAConfig:
    variant: str = field(
        default="sbora_fa",
        metadata={"help": "sbora_fa (train B, fixed columns), sbora_fb (train A, fixed rows) or lora"},
    )
    r: int = field(default=8, metadata={"help": "rank: number of standard-basis vectors per layer"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator; the update is scaled by alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter path's input, 0 <= p < 1"})
    target_modules: list[str] | str = field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        metadata={"help": "module names (last path component) to adapt, or 'all-linear'"},
    )
    index_seed: int = field(
        default=0, metadata={"help": "seed from which each layer's index set is drawn reproducibly"}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "fingerprint of the base model the adapter belongs to"}
    )

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r: rank must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"alpha: must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                self.target_modules = [self.target_modules]
        else:
            names = list(self.target_modules)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    "target_modules: give a non-empty list of module names, or 'all-linear'"
                )
            self.target_modules = names
        if isinstance(self.index_seed, bool) or not isinstance(self.index_seed, int) or self.index_seed < 0:
            raise ValueError(f"index_seed: must be a non-negative integer, got {self.index_seed!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def is_sbora(self) -> bool:
        return self.variant != "lora"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SBoRAConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)
