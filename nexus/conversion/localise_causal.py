"""Localisation stage 4, causal: ablate exactly the selected units, and separately ``random_sets`` (>= 5) random sets
of the same composition; the selection's drop must clearly exceed the random control's.

Reported per control (``global`` always; ``layer_matched`` when asked, see `random_control`):

- ``drop``: mean relative drop on the capability's items (a fraction of its margin over chance), with a 95% CI;
  ``drop_nats``: the same in raw score units; ``reference_drop``: the relative drop on the reference items;
- ``random_drop``: the mean over random sets, with a 95% CI resampling both items and sets;
- ``ratio`` = drop / random_drop (None when the random drop is not positive: the ratio is then unbounded, and
  ``confidence`` carries the verdict), with a bootstrap CI;
- ``confidence``: the share of joint (item, set) resamples in which the selection's drop exceeds the random drop.

Items are resampled with the same indices for the selection and every random set, so the comparison is paired.
"""

import numpy as np

from .drop_statistics import relative_drops, resampled_means
from .localise_activation import FINE
from .random_control import random_selection


def _r(x, digits=5):
    return None if x is None or not np.isfinite(x) else round(float(x), digits)


def _control(ctx, name, drop_items, selection, layer_matched, on_eval, salt):
    opts = ctx.options
    rng = np.random.default_rng([opts.seed, salt, int(layer_matched)])
    norm = ctx.normaliser(name)
    cap = ctx.cap_items(name)
    rows = []
    for _ in range(opts.random_sets):
        random_set = random_selection(ctx.units, selection, rng, layer_matched)
        if on_eval:
            on_eval()
        rows.append(relative_drops(ctx.base, ctx.evaluate(random_set), norm)[0, cap])
    random = np.array(rows)  # (sets, items)
    d_boot = resampled_means(drop_items[None, :], opts.n_bootstrap, opts.seed)[0]  # (n_boot,)
    r_items = resampled_means(random, opts.n_bootstrap, opts.seed)  # same item resamples, (sets, n_boot)
    set_idx = rng.integers(0, random.shape[0], size=(opts.n_bootstrap, random.shape[0]))
    r_boot = r_items[set_idx, np.arange(opts.n_bootstrap)[:, None]].mean(1)  # (n_boot,)
    drop, random_drop = float(drop_items.mean()), float(random.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(r_boot > 0, d_boot / r_boot, np.inf)
    ratio_ci = np.percentile(ratios, [2.5, 97.5]) if np.isfinite(ratios).mean() >= 0.975 else None
    lo, hi = np.percentile(r_boot, [2.5, 97.5])
    return {
        "random_drop": _r(random_drop), "random_drop_ci": [_r(lo), _r(hi)],
        "random_drops": [_r(x) for x in random.mean(1)],
        "ratio": _r(drop / random_drop) if random_drop > 0 else None,
        "ratio_ci": [_r(x, 3) for x in ratio_ci] if ratio_ci is not None else None,
        "confidence": round(float((d_boot > r_boot).mean()), 4),
    }


def causal_stage(ctx, name, selection, controls=("global",), on_eval=None):
    """Stage 4 for one capability and one selection; returns the result dict."""
    size = {k: len(selection.get(k, [])) for k in FINE}
    if not sum(size.values()):
        return {"units": size, "drop": None, "random_drop": None, "ratio": None, "confidence": 0.0,
                "note": "no unit selected: nothing to ablate"}
    opts = ctx.options
    if on_eval:
        on_eval()
    ablated = ctx.evaluate(selection)
    norm = ctx.normaliser(name)
    rel = relative_drops(ctx.base, ablated, norm)[0]
    cap, ref = ctx.cap_items(name), ctx.ref_items(name)
    d = rel[cap]
    d_boot = resampled_means(d[None, :], opts.n_bootstrap, opts.seed)[0]
    lo, hi = np.percentile(d_boot, [2.5, 97.5])
    out = {
        "units": size,
        "drop": _r(d.mean()), "drop_ci": [_r(lo), _r(hi)],
        "drop_nats": _r((ctx.base[cap] - ablated[cap]).mean()),
        "reference_drop": _r(rel[ref].mean()) if len(ref) else None,
    }
    for i, control in enumerate(controls):
        result = _control(ctx, name, d, selection, control == "layer_matched", on_eval, salt=i)
        if i == 0:  # the first control is the headline
            out.update(result)
            out["control"] = control
        else:
            out[control] = result
    return out
