"""Localisation stage 1, perturbation: ablate each layer, attention block, FFN block and head in turn and measure the
capability's drop, against the drop on its reference set.

Every ablation runs every capability's items at once, so the cost is one pass per unit for the whole recipe, not per
capability. Heads are ablated one by one in the layers some capability flagged (``heads: flagged``, the default), in
every layer (``heads: all``) or not at all (``heads: none``): a per-layer pass first, then per-head only where it
matters, which keeps a real teacher's cost at (3 x layers + heads in flagged layers) passes.

Per unit and capability: ``drop`` (mean relative drop on the capability's items, with a 95% CI), ``ref_drop`` (on its
reference items), ``specific`` = drop - ref_drop with its CI. A layer is **flagged** for a capability when one of its
blocks (the layer, its attention or its FFN) has a specific drop whose CI is above zero and a drop of at least
``flag_min_drop``. The stage confidence is the Bonferroni-corrected one-sided confidence that the most specific block
is really specific (1 - min(1, tests x p)).

Method: the "causal tracing by ablation" family; mean-ablation as in Wang et al. 2022 (IOI), head ablation as in
Michel et al. 2019 ("Are Sixteen Heads Really Better than One?").
"""

import numpy as np

from .drop_statistics import (
    bonferroni_confidence,
    drop_summary,
    relative_drops,
    specific_summary,
)

BLOCKS = ("layer", "attention", "ffn")


def _round(values, digits=5):
    return [None if v is None or not np.isfinite(v) else round(float(v), digits) for v in values]


def _summaries(ctx, name, scores):
    """Per-unit statistics of an ablation score matrix (units, all items) for capability ``name``."""
    opts = ctx.options
    if scores.shape[0] == 0:
        empty = np.zeros(0)
        return {k: empty for k in ("drop", "drop_lo", "drop_hi", "ref_drop", "specific", "specific_lo",
                                   "specific_hi", "confidence")}
    rel = relative_drops(ctx.base, scores, ctx.normaliser(name))  # (units, items)
    cap, ref = rel[:, ctx.cap_items(name)], rel[:, ctx.ref_items(name)]
    drop, lo, hi, _ = drop_summary(cap, opts.n_bootstrap, opts.seed)
    ref_drop = ref.mean(1)
    spec, slo, shi, sconf = specific_summary(cap, ref, opts.n_bootstrap, opts.seed)
    return {"drop": drop, "drop_lo": lo, "drop_hi": hi, "ref_drop": ref_drop, "specific": spec,
            "specific_lo": slo, "specific_hi": shi, "confidence": sconf}


def _per_layer(stats, units, n_layers):
    """Spread per-unit statistics over layers (None where a layer has no such block)."""
    where = {u[0]: i for i, u in enumerate(units)}

    def spread(key):
        return [stats[key][where[l]] if l in where else None for l in range(n_layers)]

    return {
        "drop": _round(spread("drop")),
        "drop_ci": [None if l not in where else _round([stats["drop_lo"][where[l]], stats["drop_hi"][where[l]]])
                    for l in range(n_layers)],
        "ref_drop": _round(spread("ref_drop")),
        "specific": _round(spread("specific")),
        "specific_ci": [None if l not in where else
                        _round([stats["specific_lo"][where[l]], stats["specific_hi"][where[l]]])
                        for l in range(n_layers)],
        "confidence": _round(spread("confidence"), 4),
    }


def flagged_layers(stats_by_kind, units_by_kind, min_drop):
    flagged = set()
    for kind in BLOCKS:
        stats = stats_by_kind[kind]
        for i, unit in enumerate(units_by_kind[kind]):
            if stats["specific_lo"][i] > 0 and stats["drop"][i] >= min_drop:
                flagged.add(unit[0])
    return sorted(flagged)


def _strongest(layers, stats, block_units, capabilities, kinds=("layer", "attention")):
    """``layers`` ordered by their largest capability-specific drop (layer or attention block, any capability)."""
    best = {}
    for c in capabilities:
        for kind in kinds:
            for i, unit in enumerate(block_units[kind]):
                if unit[0] in layers:
                    best[unit[0]] = max(best.get(unit[0], -np.inf), stats[c][kind]["specific"][i])
    return sorted(layers, key=lambda l: -best.get(l, -np.inf))


def perturbation_stage(ctx, capabilities, on_unit=None, on_heads=None, on_blocks=None):
    """Stage 1 for every capability in ``capabilities`` (present ones); returns ``{cap: result dict}``.

    ``on_unit(kind, unit)`` is called before each ablation, ``on_blocks(n)`` / ``on_heads(n)`` once the number of
    block / head ablations is known (progress reporting).
    """
    units, opts = ctx.units, ctx.options
    n_layers = len(units)
    block_units = {"layer": units.units("layer")}
    scores = {}

    def sweep(kind, members):
        rows = []
        for unit in members:
            if on_unit:
                on_unit(kind, unit)
            rows.append(ctx.evaluate({kind: [unit]}))
        return np.array(rows).reshape(len(rows), ctx.items.n_items)

    scores["layer"] = sweep("layer", block_units["layer"])
    if opts.blocks == "all":
        block_layers = None
    else:  # only where some capability's whole-layer ablation was flagged
        layer_stats = {c: _summaries(ctx, c, scores["layer"]) for c in capabilities}
        block_layers = sorted({u[0] for c in capabilities for i, u in enumerate(block_units["layer"])
                               if layer_stats[c]["specific_lo"][i] > 0 and
                               layer_stats[c]["drop"][i] >= opts.flag_min_drop})
        if opts.max_detail_layers is not None and len(block_layers) > opts.max_detail_layers:
            strongest = _strongest(block_layers, {c: {"layer": layer_stats[c]} for c in capabilities},
                                   block_units, capabilities, kinds=("layer",))
            block_layers = sorted(strongest[:opts.max_detail_layers])
        if on_blocks:
            on_blocks(2 * len(block_layers))
    for kind in ("attention", "ffn"):
        block_units[kind] = units.units(kind, block_layers)
        scores[kind] = sweep(kind, block_units[kind])
    stats = {c: {kind: _summaries(ctx, c, scores[kind]) for kind in BLOCKS} for c in capabilities}
    flagged = {c: flagged_layers(stats[c], block_units, opts.flag_min_drop) for c in capabilities}

    if opts.heads == "all":
        head_layers = list(range(n_layers))
    elif opts.heads == "flagged":
        head_layers = sorted(set().union(*flagged.values())) if flagged else []
        if opts.max_detail_layers is not None and len(head_layers) > opts.max_detail_layers:
            strongest = _strongest(head_layers, stats, block_units, capabilities)
            head_layers = sorted(strongest[:opts.max_detail_layers])
    else:
        head_layers = []
    head_units = units.units("head", head_layers)
    if on_heads:
        on_heads(len(head_units))
    head_scores = sweep("head", head_units)

    results = {}
    for c in capabilities:
        out = {kind: _per_layer(stats[c][kind], block_units[kind], n_layers) for kind in BLOCKS}
        head = {"drop": [None] * n_layers, "specific": [None] * n_layers, "specific_ci": [None] * n_layers,
                "confidence": [None] * n_layers}
        kv = {"specific": [None] * n_layers}
        if head_units:
            hs = _summaries(ctx, c, head_scores)
            for l in head_layers:
                idx = [i for i, u in enumerate(head_units) if u[0] == l]
                if not idx:
                    continue
                head["drop"][l] = _round(hs["drop"][idx])
                head["specific"][l] = _round(hs["specific"][idx])
                head["specific_ci"][l] = [_round([hs["specific_lo"][i], hs["specific_hi"][i]]) for i in idx]
                head["confidence"][l] = _round(hs["confidence"][idx], 4)
                size = units.layers[l].group_size
                spec = hs["specific"][idx]
                kv["specific"][l] = _round([spec[g * size:(g + 1) * size].sum() for g in range(len(idx) // size)])
        out["head"] = head
        out["kv_group"] = {**kv, "note": "sum of the group's per-head specific drops (not ablated jointly)"}
        out["head_layers"] = head_layers
        out["flagged_layers"] = flagged[c]
        tests = np.concatenate([stats[c][kind]["confidence"] for kind in BLOCKS])
        out["confidence"] = round(bonferroni_confidence(tests), 4)
        results[c] = out
    return results


def perturbation_passes(units, options):
    """How many ablation passes are known up front (blocks in flagged layers and heads depend on the flags)."""
    kinds = BLOCKS if options.blocks == "all" else ("layer",)
    return sum(len(units.units(kind)) for kind in kinds)
