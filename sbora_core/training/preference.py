"""Preference pairs for DPO: tokenised sides, batches, the reference pass and the loss.

Each side is the prompt followed by one answer; only the answer's tokens are targets, so a side's
log-probability is log p(answer | prompt). A batch of B pairs is one padded (2B, T) batch: the B
preferred sides, then the B non-preferred ones.

The reference log-probabilities are those of the model as the job starts (a fresh SBoRA adapter is
zero, so that is the base; a continued adapter is itself), computed once in one no-grad pass and
kept with the checkpoints: no second copy of the model is held, and resume reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sbora_core.training.loss import sequence_logps
from sbora_core.training.preference_records import PreferencePair
from sbora_core.training.tokenization import IGNORE_INDEX, TokenizedExample, collate, render_chat

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class TokenizedPair:
    index: int  # the pair's row in the job's reference log-probs
    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def longest(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def _side_texts(tokenizer: Any, pair: PreferencePair, answer: str) -> tuple[str, str]:
    """(prompt text, answer text) as the model sees them: the chat template's turn, or raw text + eos."""
    if pair.messages is None:
        assert pair.prompt is not None
        return pair.prompt, answer + (tokenizer.eos_token or "")
    prompt = render_chat(tokenizer, pair.messages, add_generation_prompt=True)
    full = render_chat(tokenizer, [*pair.messages, {"role": "assistant", "content": answer}],
                       add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render conversations incrementally")
    return prompt, full[len(prompt):]


def _side(tokenizer: Any, pair: PreferencePair, answer: str, max_seq_len: int) -> TokenizedExample:
    prompt, text = _side_texts(tokenizer, pair, answer)
    prompt_ids = tokenizer(prompt, return_attention_mask=False)["input_ids"]
    answer_ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_seq_len]
    return TokenizedExample(ids, labels, pair.line)


def pair_lengths(tokenizer: Any, pair: PreferencePair) -> tuple[int, int]:
    """Tokens of the preferred and the non-preferred side, untruncated."""
    return (len(_side(tokenizer, pair, pair.chosen, 1 << 30).input_ids),
            len(_side(tokenizer, pair, pair.rejected, 1 << 30).input_ids))


def tokenize_pairs(tokenizer: Any, pairs: list[PreferencePair], max_seq_len: int) -> list[TokenizedPair]:
    """Tokenised pairs, dropping any with a side whose answer truncation cut off entirely."""
    out: list[TokenizedPair] = []
    for pair in pairs:
        chosen = _side(tokenizer, pair, pair.chosen, max_seq_len)
        rejected = _side(tokenizer, pair, pair.rejected, max_seq_len)
        if chosen.n_target_tokens and rejected.n_target_tokens:
            out.append(TokenizedPair(len(out), chosen, rejected))
    return out


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One (2B, T) batch, preferred sides first; `index` (B,) names the pairs' reference rows."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["index"] = torch.tensor([p.index for p in pairs])
    return batch


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of the preferred and the non-preferred sides, (B,) each."""
    logps = sequence_logps(model, {k: v for k, v in batch.items() if k != "index"})  # (2B,)
    return logps.chunk(2)  # type: ignore[return-value]


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: list[TokenizedPair], batch_size: int,
                    pad_id: int) -> torch.Tensor:
    """(N, 2) fp32 log-probs [preferred, non-preferred] of every pair under `model` as it is now, in
    eval mode; longest pairs first, so each batch pads little and a too-large batch fails at once."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(pairs), 2)
    order = sorted(pairs, key=lambda p: -p.longest)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        chosen, rejected = pair_logps(model, batch)
        out[batch["index"].cpu()] = torch.stack([chosen, rejected], 1).float().cpu()
    model.train(was_training)
    return out


def dpo_loss(policy: tuple[torch.Tensor, torch.Tensor], reference: torch.Tensor, beta: float,
             loss: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards beta * (pi - ref) of each side (B,), detached.

    sigmoid (DPO): -log sigmoid(beta * margin); ipo: (margin - 1 / (2 beta))^2, with
    margin = (pi_c - ref_c) - (pi_r - ref_r) over summed answer log-probs."""
    chosen = policy[0] - reference[:, 0]  # (B,)
    rejected = policy[1] - reference[:, 1]  # (B,)
    margin = chosen - rejected
    if loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * margin)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def reward_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """[rewards_chosen, rewards_rejected, rewards_margins, rewards_accuracies] summed over the pairs, (4,)."""
    return torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                        (chosen > rejected).float().sum()]).double()
