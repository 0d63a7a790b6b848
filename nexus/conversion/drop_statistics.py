"""Drops with bootstrap CIs, for many units at once.

A *drop* is the per-item fall of a capability score when a unit is ablated (``base - ablated``), expressed as a
fraction of the capability's margin over chance (`relative_drops`), so capabilities with different score scales can
share one heatmap and one threshold. Items are resampled with replacement (percentile bootstrap, as in `bootstrap`);
every unit is resampled with the *same* item indices, so the comparison between units is paired. A *specific* drop is
the capability's drop minus the reference set's: the two item sets are different, so they are resampled
independently. One-sided confidences are the share of resamples on the claimed side of zero.
"""

import numpy as np

from .bootstrap import bootstrap_ci


def presence(base, chance, n_bootstrap=1000, seed=0):
    """Is the model above chance on these items? ``{"score", "chance", "margin", "margin_ci", "confidence",
    "present"}``: present when the 95% CI of the mean (score - chance) is above zero."""
    diff = np.asarray(base, dtype=np.float64) - np.asarray(chance, dtype=np.float64)
    lo, hi = bootstrap_ci(diff, n=n_bootstrap, seed=seed)
    means = resampled_means(diff[None, :], n_bootstrap, seed)[0]
    return {"score": float(np.mean(base)), "chance": float(np.mean(chance)), "margin": float(diff.mean()),
            "margin_ci": [lo, hi], "confidence": float((means > 0).mean()), "present": bool(lo > 0)}


def resampled_means(matrix, n_bootstrap=1000, seed=0):
    """(units, items) -> (units, n_bootstrap) means over item resamples shared by every unit."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"need a (units, items) matrix with at least one item, got shape {matrix.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, matrix.shape[1], size=(n_bootstrap, matrix.shape[1]))  # (n_boot, items)
    counts = np.zeros((n_bootstrap, matrix.shape[1]))
    np.add.at(counts, (np.arange(n_bootstrap)[:, None], idx), 1.0)  # how often each item is drawn
    return matrix @ counts.T / matrix.shape[1]  # (units, n_boot)


def _interval(resamples, level=0.95):
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(resamples, [tail, 100.0 - tail], axis=-1)
    return lo, hi


def drop_summary(drops, n_bootstrap=1000, seed=0):
    """Per unit ``(mean, lo, hi, confidence>0)`` of a (units, items) matrix of per-item drops."""
    drops = np.asarray(drops, dtype=np.float64)
    boot = resampled_means(drops, n_bootstrap, seed)
    lo, hi = _interval(boot)
    return drops.mean(1), lo, hi, (boot > 0).mean(1)


def specific_summary(cap_drops, ref_drops, n_bootstrap=1000, seed=0):
    """Per unit ``(mean, lo, hi, confidence>0)`` of mean(cap drops) - mean(ref drops), the item sets resampled
    independently."""
    cap = resampled_means(cap_drops, n_bootstrap, seed)
    ref = resampled_means(ref_drops, n_bootstrap, seed + 1)
    diff = cap - ref
    lo, hi = _interval(diff)
    mean = np.asarray(cap_drops, dtype=np.float64).mean(1) - np.asarray(ref_drops, dtype=np.float64).mean(1)
    return mean, lo, hi, (diff > 0).mean(1)


def relative_drops(base, ablated, normaliser):
    """(base - ablated) / normaliser, per item; ``ablated`` may be (units, items)."""
    return (np.asarray(base)[None, :] - np.atleast_2d(ablated)) / np.asarray(normaliser)[None, :]


def bonferroni_confidence(confidences):
    """Confidence that the best of several one-sided tests is real: 1 - min(1, k * min p)."""
    confidences = np.asarray(confidences, dtype=np.float64)
    if confidences.size == 0:
        return 0.0
    p = 1.0 - confidences.max()
    return float(max(0.0, 1.0 - min(1.0, confidences.size * p)))
