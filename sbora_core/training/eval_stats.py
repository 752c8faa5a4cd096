"""Intervals for evaluation scores: percentile bootstrap over items, and paired differences.

Every metric is a ratio of per-item sums (accuracy: correct / items; mean token loss: summed loss /
target tokens), so one resample of items gives one value of every metric. A paired difference
resamples the same items for both candidates, which is what makes it tighter than the two
intervals side by side: the items' difficulty cancels. Resamples are drawn from a fixed seed, so a
result is reproducible to the bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _ratio(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The metric on each resample: sum of numerators over sum of denominators."""
    total = den[idx].sum(axis=1)
    return num[idx].sum(axis=1) / np.where(total == 0, 1.0, total)


def _interval(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def score_with_interval(num: Sequence[float], den: Sequence[float], *, resamples: int = RESAMPLES,
                        seed: int = 0) -> dict[str, float | list[float]]:
    """The metric over all items and its 95% percentile bootstrap interval."""
    n_arr, d_arr = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    value = float(n_arr.sum() / d_arr.sum()) if d_arr.sum() else 0.0
    if len(n_arr) < 2:
        return {"value": value, "ci95": [value, value]}
    return {"value": value, "ci95": _interval(_ratio(n_arr, d_arr, _draws(len(n_arr), resamples, seed)))}


def paired_difference(a: tuple[Sequence[float], Sequence[float]], b: tuple[Sequence[float], Sequence[float]], *,
                      resamples: int = RESAMPLES, seed: int = 1) -> dict[str, float | list[float]]:
    """metric(a) - metric(b) on the same items, with the 95% interval of the paired bootstrap (each
    resample draws one set of items and computes both metrics on it)."""
    (a_num, a_den), (b_num, b_den) = ((np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in (a, b))
    if len(a_num) != len(b_num):
        raise ValueError(f"paired items: {len(a_num)} against {len(b_num)}; a paired difference needs the same items")
    point = float(a_num.sum() / max(a_den.sum(), 1e-300) - b_num.sum() / max(b_den.sum(), 1e-300))
    if len(a_num) < 2:
        return {"difference": point, "ci95": [point, point]}
    idx = _draws(len(a_num), resamples, seed)
    return {"difference": point, "ci95": _interval(_ratio(a_num, a_den, idx) - _ratio(b_num, b_den, idx))}
