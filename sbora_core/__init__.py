"""sbora_core: the SBoRA method library.

Train, store, load and apply SBoRA adapters (and the LoRA baseline) on Hugging
Face causal language models. Imports torch, transformers, safetensors and
bitsandbytes; never a web framework or a task queue.
"""

from sbora_core.method.adapter import ModuleDelta, SparseAdapter
from sbora_core.method.config import SBoRAConfig

__all__ = ["ModuleDelta", "SBoRAConfig", "SparseAdapter"]
__version__ = "0.1.0"
