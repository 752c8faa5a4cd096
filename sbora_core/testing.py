"""Tiny, real models for tests and examples.

A LLaMA-architecture causal LM a few hundred kilobytes in size, with a
byte-level tokenizer and a ChatML chat template (the default model's), saved
as an ordinary Hugging Face model directory so it loads through
`models.load_base_model` like any other base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import adapter_from_model, inject_adapter, remove_adapter

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens plus ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    directory: str | Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """Save a randomly initialised tiny LLaMA model and its tokenizer into `directory`.

    A larger `initializer_range` gives peakier next-token distributions, so greedy
    decoding is not decided by float rounding between near-equal logits.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Tiny configurations of every model family the test matrix covers: the layer names, storage (GPT-2's
# Conv1D), fused projections (Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's query_key_value) and caches
# (sliding windows) differ between them, which is what the matrix is about.
def family_configs(vocab: int, eos: int, pad: int) -> dict[str, tuple[str, dict]]:
    decoder = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
               "eos_token_id": eos, "pad_token_id": pad, "bos_token_id": None}
    return {
        "llama": ("LlamaConfig", decoder),
        "mistral": ("MistralConfig", {**decoder, "sliding_window": 64}),
        "qwen2": ("Qwen2Config", decoder),
        "qwen3": ("Qwen3Config", {**decoder, "head_dim": 16}),
        "gemma2": ("Gemma2Config", {**decoder, "head_dim": 16, "sliding_window": 64}),
        "gemma3": ("Gemma3TextConfig", {**decoder, "head_dim": 16, "sliding_window": 64}),
        "phi3": ("Phi3Config", decoder),
        "phi": ("PhiConfig", {k: v for k, v in decoder.items() if k != "num_key_value_heads"}),
        "gpt2": ("GPT2Config", {"vocab_size": vocab, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512,
                                "eos_token_id": eos, "bos_token_id": eos, "pad_token_id": pad}),
        "opt": ("OPTConfig", {"vocab_size": vocab, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "max_position_embeddings": 512, "word_embed_proj_dim": 64,
                              "eos_token_id": eos, "bos_token_id": eos, "pad_token_id": pad}),
        "gpt_neox": ("GPTNeoXConfig", {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
                                       "num_hidden_layers": 2, "num_attention_heads": 4,
                                       "max_position_embeddings": 512, "eos_token_id": eos, "pad_token_id": pad,
                                       "bos_token_id": eos}),
        "bloom": ("BloomConfig", {"vocab_size": vocab, "hidden_size": 64, "n_layer": 2, "n_head": 4,
                                  "eos_token_id": eos, "bos_token_id": eos, "pad_token_id": pad}),
    }


def build_tiny_family(family: str, directory: str | Path, *, seed: int = 0, initializer_range: float = 0.3,
                      chat_template: bool = True) -> Path:
    """A tiny randomly initialised model of `family` (see `family_configs`) and the byte tokenizer
    (with a chat template, unless `chat_template` is False: as GPT-2 and other base models ship)."""
    import transformers
    from transformers import AutoModelForCausalLM

    tokenizer = build_byte_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    config_class, fields = family_configs(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)[family]
    config = getattr(transformers, config_class)(**fields)
    config.initializer_range = initializer_range  # peaky distributions: greedy decoding not decided by rounding
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_adapter(base: Any, variant: str = "sbora_fa", *, r: int = 8, seed: int = 0, index_seed: int = 0,
                   std: float = 0.3, indices: dict[str, torch.Tensor] | None = None) -> Any:
    """A SparseAdapter with random factors for `base` (a loaded BaseModel): what training leaves,
    without training; `base.model` is left as it was."""
    config = SBoRAConfig(variant=variant, r=r, alpha=2 * r, dropout=0.0, index_seed=index_seed,
                         base_fingerprint=base.fingerprint)
    layers = inject_adapter(base.model, config, fast_path=False, indices=indices)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for p in (layer.sbora_A, layer.sbora_B):
                if p is not None:
                    p.normal_(std=std)
    adapter = adapter_from_model(base.model, config)
    remove_adapter(base.model)
    return adapter
