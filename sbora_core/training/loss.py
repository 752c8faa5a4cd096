"""The losses' log-likelihoods: summed next-token cross-entropy over a batch's target tokens (SFT),
and summed log-probabilities per sequence (DPO).

With a large vocabulary the logits are the largest tensors of a training step: (B, T, vocab) in
the compute dtype, again in fp32 for the loss, and the gradient of each (3 GiB at batch 4 x 512
with LLaMA-3's 128k tokens, more than the 4-bit weights of an 8B model). On families whose logits
are exactly lm_head(last hidden state), `token_loss_sum` makes logits only at target positions,
a chunk of rows at a time (256 MiB of fp32 logits), and computes each chunk's gradient with respect to the hidden states
while its logits exist (as Liger Kernel's fused linear cross-entropy does): memory of one chunk,
no second pass over the head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sbora_core.training.tokenization import IGNORE_INDEX

# Families whose logits are exactly lm_head(last hidden state): no soft-capping or scaling after the head.
PLAIN_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
LOSS_CHUNK_BYTES = 256 << 20  # fp32 logits that exist at once: 523 rows at 128k tokens, 2,048 at 32k


def chunk_rows(vocab: int) -> int:
    return max(64, LOSS_CHUNK_BYTES // (4 * vocab))


def _chunk_loss(rows: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, want_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row CE of one chunk (C,), how many rows' argmax is their label, and d(CE)/d(rows) (C, H)."""
    logits = F.linear(rows, weight).float()  # (C, V)
    correct = (logits.argmax(-1) == target).sum()
    target_logit = logits.gather(1, target[:, None]).squeeze(1)  # (C,)
    # Softmax in place over the chunk's one fp32 copy of the logits: no other (C, V) temporary.
    peak = logits.amax(-1, keepdim=True)  # (C, 1)
    probs = logits.sub_(peak).exp_()
    sums = probs.sum(-1)  # (C,)
    loss = sums.log() + peak.squeeze(1) - target_logit
    grad = None
    if want_grad:
        # d(CE)/d(logits) = softmax - one_hot; then through the head.
        probs.div_(sums[:, None])
        probs[torch.arange(target.numel(), device=probs.device), target] -= 1.0
        grad = F.linear(probs.to(weight.dtype), weight.t())
    return loss, correct, grad


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden W^T, labels) for a frozen head W (vocab, H), chunk by chunk, and
    how many rows' argmax is their label (not differentiable)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (M, H)
        total = hidden.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            loss, hits, rows_grad = _chunk_loss(hidden[start : start + chunk], weight,
                                                labels[start : start + chunk], grad is not None)
            total += loss.sum()
            correct += hits
            if grad is not None and rows_grad is not None:
                grad[start : start + chunk] = rows_grad.to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_correct: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


class LinearTokenCrossEntropy(torch.autograd.Function):
    """CE(hidden W^T, labels) per row (M,) for a frozen head W, chunk by chunk: what per-sequence
    log-probabilities (DPO) need, with the same memory as `LinearCrossEntropy`."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (M, H)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)  # (M,)
        for start in range(0, hidden.shape[0], chunk):
            loss, _, rows_grad = _chunk_loss(hidden[start : start + chunk], weight,
                                             labels[start : start + chunk], grad is not None)
            out[start : start + chunk] = loss
            if grad is not None and rows_grad is not None:
                grad[start : start + chunk] = rows_grad.to(grad.dtype)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_rows: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_rows[:, None].to(grad.dtype), None, None, None


def _fusable_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, head) when the loss may be computed from the decoder's hidden states with a frozen,
    bias-free linear head; None: the model's own logits are needed."""
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return None
    head, decoder = model.get_output_embeddings(), model.get_decoder()  # type: ignore[operator]
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad or decoder is None:
        return None  # an adapted, biased or trained head keeps the ordinary path
    return decoder, head


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over target tokens (labels != -100), and how many of those
    tokens the model's argmax predicts (token accuracy, as OpenAI's fine-tuning reports it)."""
    if "position_ids" in batch:  # packed rows: the positions tell the examples apart, no mask
        inputs = {"position_ids": batch["position_ids"]}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    shift_labels = batch["labels"][:, 1:]  # (B, T-1)
    fusable = _fusable_head(model)
    if fusable is None:
        logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
        flat = shift_labels.reshape(-1)
        correct = ((shift_logits.detach().argmax(-1) == flat) & (flat != IGNORE_INDEX)).sum()
        return F.cross_entropy(shift_logits, flat, ignore_index=IGNORE_INDEX, reduction="sum"), correct
    decoder, head = fusable
    hidden = decoder(input_ids=batch["input_ids"], use_cache=False, **inputs).last_hidden_state  # (B, T, H)
    targets = shift_labels != IGNORE_INDEX
    rows = hidden[:, :-1][targets]  # (M, H)
    return LinearCrossEntropy.apply(rows, head.weight, shift_labels[targets], chunk_rows(head.out_features))


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's target tokens (labels != -100), (B,) in fp32."""
    shift_labels = batch["labels"][:, 1:]  # (B, T-1)
    targets = shift_labels != IGNORE_INDEX
    fusable = _fusable_head(model)
    if fusable is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        picked = logits.log_softmax(-1).gather(2, shift_labels.clamp(min=0)[..., None]).squeeze(2)  # (B, T-1)
        return (picked * targets).sum(-1)
    decoder, head = fusable
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state  # (B, T, H)
    ce = LinearTokenCrossEntropy.apply(hidden[:, :-1][targets], head.weight, shift_labels[targets],
                                       chunk_rows(head.out_features))  # (M,)
    rows = targets.nonzero()[:, 0]  # the row of each target token, (M,)
    return -torch.zeros(targets.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
