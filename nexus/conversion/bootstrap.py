"""Bootstrap 95% confidence intervals over items: every score NEXUS reports carries one.

Items are resampled with replacement (Efron's percentile bootstrap). ``stat`` sees the resampled items, so a score that
is a ratio of sums (bits per byte = summed NLL / summed bytes) is bootstrapped as that ratio, not as a mean of
per-item ratios. `ratio_ci` resamples the *same* items for a student and a teacher, which is what a retention
interval needs: both models are scored on one item set, so their errors are paired.
"""

import numpy as np


def _as_items(values, what="values"):
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(f"{what}: need at least one item to bootstrap, got none")
    return arr


def _percentiles(stats, level):
    stats = np.asarray(stats, dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        raise ValueError("bootstrap: every resample gave a non-finite statistic (all-zero denominator?)")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _mean(items):
    return items.mean(axis=0)


def bootstrap_ci(values, n=1000, seed=0, stat=_mean, level=0.95):
    """Percentile bootstrap interval ``(lo, hi)`` of ``stat`` over the items in ``values``.

    ``values`` is a sequence of per-item scores, or an ``(items, k)`` array when the statistic needs several numbers
    per item (e.g. ``[nll, bytes]``). ``stat`` maps a resampled array of the same shape to a number.
    """
    items = _as_items(values)
    if n < 1:
        raise ValueError(f"n: the number of bootstrap resamples must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    count = items.shape[0]
    if stat is _mean and items.ndim == 1:  # the common case, vectorised
        stats = items[rng.integers(0, count, size=(n, count))].mean(axis=1)
    else:
        stats = [float(stat(items[rng.integers(0, count, size=count)])) for _ in range(n)]
    return _percentiles(stats, level)


def ratio_ci(student_item_scores, teacher_item_scores, n=1000, seed=0, stat=_mean, level=0.95,
             lower_is_better=False):
    """Bootstrap interval ``(lo, hi)`` of a retention ratio, resampling items jointly for student and teacher.

    The ratio is ``stat(student) / stat(teacher)`` for a higher-is-better score (accuracy, exact match) and
    ``stat(teacher) / stat(student)`` when ``lower_is_better`` (bits per byte, perplexity), so 1.0 always means
    "as good as the teacher". Both inputs hold one entry per item, in the same item order.
    """
    student = _as_items(student_item_scores, "student_item_scores")
    teacher = _as_items(teacher_item_scores, "teacher_item_scores")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student_item_scores has {student.shape[0]} items but teacher_item_scores has {teacher.shape[0]}; "
            "a paired interval needs the same items for both"
        )
    if n < 1:
        raise ValueError(f"n: the number of bootstrap resamples must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    count = student.shape[0]
    stats = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(n):
            idx = rng.integers(0, count, size=count)
            # numpy floats: a resample whose denominator is 0 gives inf/nan (dropped), not ZeroDivisionError
            s, t = np.float64(stat(student[idx])), np.float64(stat(teacher[idx]))
            stats.append(t / s if lower_is_better else s / t)
    return _percentiles(stats, level)


def ratio(student_item_scores, teacher_item_scores, stat=_mean, lower_is_better=False):
    """The point estimate matching `ratio_ci` (same orientation: 1.0 means as good as the teacher)."""
    s = float(stat(_as_items(student_item_scores, "student_item_scores")))
    t = float(stat(_as_items(teacher_item_scores, "teacher_item_scores")))
    num, den = (t, s) if lower_is_better else (s, t)
    return num / den if den else float("nan")
