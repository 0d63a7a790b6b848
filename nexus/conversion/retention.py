"""Retention: how much of a teacher's score a student keeps on the *same items*, with paired bootstrap 95% CIs.

Definition (DESIGN.md, "How a retention number is defined"):

- higher-is-better metrics (top-1 accuracy, exact match, multiple-choice accuracy): retention = student / teacher;
- lower-is-better metrics (bits per byte): retention = teacher / student;

so 1.0 always means parity and > 1 means the student is better. Every score is a ratio of sums over items
(``sum(num) / sum(den)``): bits per byte = summed NLL / (ln 2 x summed bytes), top-1 accuracy = correct tokens /
scored tokens, exact match = hits / items. A resample draws item indices once and applies them to the student and the
teacher alike (a paired bootstrap: Efron & Tibshirani 1993), and the *same* draws serve every statistic built on one
capability (the retention of several checkpoints, their differences), so those are paired too.

The minimum and the mean over capabilities get their CIs from one joint bootstrap: in resample ``b`` each capability
is resampled independently (their item sets are disjoint) and ``min_c r_c[b]`` / ``mean_c r_c[b]`` are taken.
"""

import math

import numpy as np

LN2 = math.log(2.0)
LEVEL = 0.95


def item_rows(probe, items, metric):
    """Per-item ``(num, den)`` rows of a probe's items such that the score is ``sum(num) / sum(den)``.

    ``probe`` is the registered probe name, ``items`` the list its ``score`` returned (`ProbeResult.items`), ``metric``
    ``"bpb"`` or ``"accuracy"`` for an ``lm`` probe (ignored for the others, whose score is a mean of item values).
    """
    if probe == "lm":
        if metric == "bpb":
            return np.array([[it["nll"] / LN2, it["bytes"]] for it in items], dtype=np.float64)
        if metric == "accuracy":
            return np.array([[it["correct"], it["tokens"]] for it in items], dtype=np.float64)
        raise ValueError(f"lm retention metric must be bpb or accuracy, got {metric!r}")
    values = [it["correct"] if isinstance(it, dict) else it for it in items]
    return np.array([[float(v), 1.0] for v in values], dtype=np.float64)


def score_of(rows):
    den = rows[:, 1].sum()
    return float(rows[:, 0].sum() / den) if den else float("nan")


def resample_indices(n_items, n_bootstrap, seed):
    """(n_bootstrap, n_items) item indices drawn with replacement; share them to pair statistics."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_items, size=(n_bootstrap, n_items))


def resampled_scores(rows, idx):
    """(B,) scores of ``rows`` under each resample of ``idx``."""
    picked = rows[idx]  # (B, n, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return picked[..., 0].sum(1) / picked[..., 1].sum(1)


def retention_value(student_rows, teacher_rows, lower_is_better):
    """Point retention (nan when undefined: a teacher score of 0 for higher-is-better, a student score of 0 else)."""
    s, t = score_of(student_rows), score_of(teacher_rows)
    num, den = (t, s) if lower_is_better else (s, t)
    return num / den if den and math.isfinite(num) and math.isfinite(den) else float("nan")


def retention_samples(student_rows, teacher_rows, lower_is_better, idx):
    """(B,) retention under each resample (non-finite where the denominator resampled to 0)."""
    if len(student_rows) != len(teacher_rows):
        raise ValueError(f"student has {len(student_rows)} items but teacher has {len(teacher_rows)}: a paired "
                         "retention needs the same items for both")
    s, t = resampled_scores(student_rows, idx), resampled_scores(teacher_rows, idx)
    with np.errstate(divide="ignore", invalid="ignore"):
        return t / s if lower_is_better else s / t


def percentile_ci(samples, level=LEVEL):
    """Percentile interval ``[lo, hi]`` over the finite samples (None when none is finite)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def clamp_ci(value, ci):
    """Widen ``ci`` by rounding slack so it contains ``value`` (summing resampled items in another order moves the
    last bits: a student identical to its teacher must not get [0.99999999, 0.99999999] around 1.0)."""
    if ci is None or value is None or not math.isfinite(value):
        return ci
    lo, hi = ci
    slack = 1e-9 * max(1.0, abs(value))
    lo = value if value < lo <= value + slack else lo
    hi = value if value - slack <= hi < value else hi
    return [lo, hi]


def aggregate(samples_by_cap, values_by_cap, weights=None, level=LEVEL):
    """Minimum, mean and weighted mean over capabilities, each with a joint bootstrap CI.

    ``samples_by_cap``: CAP -> (B,) retention samples (same B for all); ``values_by_cap``: CAP -> point retention.
    Capabilities whose value is not finite are left out (the caller lists them as undefined).
    """
    caps = [c for c, v in values_by_cap.items() if v is not None and math.isfinite(v)]
    if not caps:
        return None
    values = np.array([values_by_cap[c] for c in caps])
    stack = np.stack([samples_by_cap[c] for c in caps])  # (C, B)
    w = np.array([(weights or {}).get(c, 1.0) for c in caps], dtype=np.float64)
    w = w / w.sum()
    worst = int(np.argmin(values))
    with np.errstate(invalid="ignore"):
        mins, means, wmeans = stack.min(0), stack.mean(0), (w[:, None] * stack).sum(0)
    out = {
        "min": {"value": float(values[worst]), "ci": percentile_ci(mins, level), "capability": caps[worst]},
        "mean": {"value": float(values.mean()), "ci": percentile_ci(means, level), "capabilities": caps},
        "weighted_mean": {"value": float((w * values).sum()), "ci": percentile_ci(wmeans, level),
                          "weights": {c: float(x) for c, x in zip(caps, w)}},
    }
    for entry in out.values():
        entry["ci"] = clamp_ci(entry["value"], entry["ci"])
    return out
