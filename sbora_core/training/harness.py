"""The evaluation harness: candidates (the base, adapters, weighted compositions) scored on the same
items by one grader, and the summary with intervals and paired differences.

The service's evaluation jobs, `sbora eval` and the benchmarks all run `run_evaluation`; they differ
only in where results go (a `ResultSink`: the database, or memory). Items are scored in fixed
chunks of `chunk_size`, and a chunk's results are stored together, so an evaluation stopped at any
point resumes at its first unstored chunk, scores no item twice, and ends with results equal to an
uninterrupted run's: a chunk's batches depend only on its items.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sbora_core.method.adapter import SparseAdapter
from sbora_core.method.adapter_io import check_compatible
from sbora_core.method.merge import merge_adapters
from sbora_core.training.eval_items import GRADERS, PROTOCOLS, EvalItem
from sbora_core.training.eval_stats import RESAMPLES, paired_difference, score_with_interval
from sbora_core.training.scoring import (
    LENGTH_UNITS,
    METRICS,
    ItemResult,
    score_exact_match,
    score_loss,
    score_multiple_choice,
)


@dataclass
class EvalSpec:
    """How an evaluation scores; every field is stored with a job, so a resumed run scores alike."""

    grader: str = field(default="multiple_choice", metadata={
        "help": "multiple_choice (log-likelihood of each choice), exact_match (generated answer) or loss"})
    protocol: str = field(default="option_text", metadata={
        "help": "instruction records' options: option_text (each option's text) or label (the trained target)"})
    length_unit: str = field(default="chars", metadata={
        "help": "accuracy_norm divides each choice's log-likelihood by its length in chars (as lm-eval) or tokens"})
    max_new_tokens: int = field(default=256, metadata={"help": "exact_match: tokens generated per answer at most"})
    max_seq_len: int = field(default=1024, metadata={"help": "loss: tokens per record; longer ones are truncated"})
    batch_size: int = field(default=16, metadata={"help": "rows per forward pass"})
    chunk_size: int = field(default=64, metadata={
        "help": "items scored and stored together: a resumed evaluation starts at its first unstored chunk"})
    limit: int | None = field(default=None, metadata={"help": "score a fixed random subset of this many items"})
    seed: int = field(default=0, metadata={"help": "which subset `limit` takes"})

    def __post_init__(self) -> None:
        if self.grader not in GRADERS:
            raise ValueError(f"grader: must be one of {', '.join(GRADERS)}, got {self.grader!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.length_unit not in LENGTH_UNITS:
            raise ValueError(f"length_unit: must be one of {', '.join(LENGTH_UNITS)}, got {self.length_unit!r}")
        for name in ("max_new_tokens", "max_seq_len", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer")

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS[self.grader]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidate:
    """What is scored: the base model (no adapters), an adapter, or adapters composed with weights."""

    label: str
    adapters: list[SparseAdapter] = field(default_factory=list)
    weights: list[float] | None = None


@contextmanager
def applied(model: torch.nn.Module, candidate: Candidate, fingerprint: str | None) -> Iterator[None]:
    """The candidate's adapters merged into `model` (regional writes), unmerged bit-exactly after."""
    if not candidate.adapters:
        yield
        return
    weights = candidate.weights or [1.0] * len(candidate.adapters)
    for adapter in candidate.adapters:
        check_compatible(adapter, model, fingerprint)
    handle = merge_adapters(model, [a if w == 1.0 else a.scaled(w) for a, w in
                                    zip(candidate.adapters, weights, strict=True)])
    try:
        yield
    finally:
        handle.unmerge()


def score_chunk(model, tokenizer, items: list[EvalItem], spec: EvalSpec) -> list[ItemResult]:
    model.eval()
    if spec.grader == "multiple_choice":
        return score_multiple_choice(model, tokenizer, items, batch_size=spec.batch_size, length_unit=spec.length_unit)
    if spec.grader == "exact_match":
        return score_exact_match(model, tokenizer, items, max_new_tokens=spec.max_new_tokens,
                                 batch_size=spec.batch_size)
    return score_loss(model, tokenizer, items, max_seq_len=spec.max_seq_len, batch_size=spec.batch_size)


class ResultSink:
    """Where a run's results go and what it asks on the way; the defaults keep nothing."""

    def scored(self, candidate: int) -> int:
        """Items of `candidate` already stored (whole chunks, in order): the run resumes after them."""
        return 0

    def store(self, candidate: int, results: list[ItemResult]) -> None: ...

    def should_cancel(self) -> bool:
        return False

    def progress(self, done: int, total: int) -> None: ...


class MemorySink(ResultSink):
    def __init__(self, candidates: int) -> None:
        self.results: list[list[ItemResult]] = [[] for _ in range(candidates)]

    def scored(self, candidate: int) -> int:
        return len(self.results[candidate])

    def store(self, candidate: int, results: list[ItemResult]) -> None:
        self.results[candidate].extend(results)


def run_evaluation(model, tokenizer, fingerprint: str | None, candidates: list[Candidate], items: list[EvalItem],
                   spec: EvalSpec, sink: ResultSink) -> bool:
    """Score every candidate's unscored chunks into `sink`; False if cancelled on the way."""
    total = len(items) * len(candidates)
    done = sum(min(sink.scored(c), len(items)) for c in range(len(candidates)))
    sink.progress(done, total)
    for c, candidate in enumerate(candidates):
        start = sink.scored(c)
        if start >= len(items):
            continue
        if start % spec.chunk_size:
            raise ValueError(f"candidate {c}: {start} items stored, not a whole number of chunks of {spec.chunk_size}")
        with applied(model, candidate, fingerprint):
            for at in range(start, len(items), spec.chunk_size):
                if sink.should_cancel():
                    return False
                chunk = items[at: at + spec.chunk_size]
                sink.store(c, score_chunk(model, tokenizer, chunk, spec))
                done += len(chunk)
                sink.progress(done, total)
    return True


def summarise(results: list[list[ItemResult]], labels: list[str], spec: EvalSpec,
              resamples: int = RESAMPLES) -> dict[str, Any]:
    """Each candidate's metrics with 95% bootstrap intervals, and for every pair of candidates the
    paired difference (later minus earlier: `candidate` - `versus`) of each metric on the same items."""
    columns = []
    for rows in results:
        ordered = sorted(rows, key=lambda r: r.index)
        columns.append({m: ([r.values[m][0] for r in ordered], [r.values[m][1] for r in ordered]) for m in spec.metrics})
    summary: dict[str, Any] = {"grader": spec.grader, "metrics": list(spec.metrics), "primary_metric": spec.metrics[0],
                               "items": len(results[0]) if results else 0, "candidates": [], "paired": []}
    for label, rows, column in zip(labels, results, columns, strict=True):
        graded = [r.correct for r in rows if r.correct is not None]
        summary["candidates"].append({
            "label": label,
            "metrics": {m: score_with_interval(*column[m], resamples=resamples) for m in spec.metrics},
            "correct": sum(graded) if graded else None, "wrong": len(graded) - sum(graded) if graded else None,
            "tokens": sum(r.tokens for r in rows),
        })
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            summary["paired"].append({
                "candidate": labels[j], "versus": labels[i],
                "metrics": {m: paired_difference(columns[j][m], columns[i][m], resamples=resamples)
                            for m in spec.metrics},
            })
    return summary


def evaluate(model, tokenizer, items: list[EvalItem], spec: EvalSpec, candidates: list[Candidate] | None = None,
             fingerprint: str | None = None) -> tuple[dict[str, Any], list[list[ItemResult]]]:
    """The library call: every candidate (default: the model as it is) on `items`; the summary and
    each candidate's per-item results."""
    candidates = candidates or [Candidate("model")]
    sink = MemorySink(len(candidates))
    run_evaluation(model, tokenizer, fingerprint, candidates, items, spec, sink)
    return summarise(sink.results, [c.label for c in candidates], spec), sink.results
