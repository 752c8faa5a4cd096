"""The method: what an adapter is and how it applies to a weight.

The variants (SBoRA-FA, SBoRA-FB, LoRA), the adapter config, adapter layers and
their injection into a model, adapters as data, their files and PEFT export,
regional merging and composition, update maps, and base-model loading. Training
(`sbora_core.training`) and serving (`sbora_core.serving`) both stand on this
package; it imports neither.
"""
