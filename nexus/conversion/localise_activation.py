"""Localisation stage 2, activation: score every FFN neuron and attention head by how specific its attribution (or
its activation) is to the capability's data versus the reference set, and select the stand-out units.

``attribution: gradient`` (the default) is activation x gradient, i.e. attribution patching (Nanda 2023; Syed et al.
2023, "Attribution Patching Outperforms Automated Circuit Discovery"): for a unit with activation ``a`` and
ablation value ``m`` (its mean, or 0 in zero mode), ``(a - m) . d objective / d a`` summed over an item's positions
is the first-order estimate of how much the item's objective falls when the unit is ablated, for every unit from ONE
forward and backward pass. The objective is the mean **log-odds** of the item's target tokens (log p - log(1 - p);
multiple choice: the right choice's summed log-odds minus the likely wrong choices'): the log-likelihood's gradient
vanishes wherever the model is confident, which would hide exactly the units a confident capability relies on
(Kramar et al. 2024, "AtP*"); the log-odds' does not.
``attribution: activation`` uses the mean |a - m| instead (no gradient, but blind to whether the output is used).

Per capability and unit: ``importance`` = mean attribution on the capability's items (log-odds per target token; for
``activation``, mean |a - m|), ``specificity`` = importance - max(0, the same on the reference items) (``activation``:
log of the capability / reference ratio). Selection, per kind:
units whose specificity is an outlier (robust z = (s - median) / (1.4826 MAD) >= ``z_threshold``), at least
``min_share_of_top`` of the best unit's specificity, at most ``max_neuron_fraction`` / ``max_head_fraction`` of the
kind. Two selections: **global** (any layer) and **in flagged layers** (only the layers stage 1 flagged).

Confidence: split-half stability, the Jaccard overlap of the selections made from two disjoint halves of the items
(each half selecting as many units of each kind as the full selection did).
"""

import numpy as np

from .localise_items import run_rows

FINE = ("neuron", "head")


class AttributionRecorder:
    """Hooks at ``down_proj`` / ``o_proj`` inputs: per row, each unit's attribution and mean |a - m|."""

    def __init__(self, units, means, n_rows):
        self.units = units
        self.means = means  # UnitMeans or None (zero mode)
        self.attr = {k: {} for k in FINE}
        self.act = {k: {} for k in FINE}
        for info in units.layers:
            if info.ffn_size:
                self.attr["neuron"][info.index] = np.zeros((n_rows, info.ffn_size))
                self.act["neuron"][info.index] = np.zeros((n_rows, info.ffn_size))
            if info.num_heads:
                self.attr["head"][info.index] = np.zeros((n_rows, info.num_heads))
                self.act["head"][info.index] = np.zeros((n_rows, info.num_heads))
        self.batch, self.mask = None, None
        self._handles = []

    def before_batch(self, batch, mask):
        self.batch = np.asarray(batch)
        self.mask = mask

    def _centre(self, kind, l, a):
        x = a.detach().float()
        if self.means is not None:
            mean = (self.means.neuron_in if kind == "neuron" else self.means.head_in)[l]
            x = x - mean
        return x  # (B, T, D)

    def _hook(self, kind, l):
        info = self.units.layers[l]

        def pre_hook(module, args):
            a = args[0]
            x = self._centre(kind, l, a)
            rows, mask = self.batch, self.mask[:, :x.shape[1]].float()  # (B, T)
            if kind == "head":
                size = x.reshape(*x.shape[:2], info.num_heads, info.head_dim).norm(dim=-1)  # (B, T, nh)
            else:
                size = x.abs()
            tokens = mask.sum(1, keepdim=True).clamp(min=1)
            self.act[kind][l][rows] += ((size * mask[..., None]).sum(1) / tokens).numpy()
            if a.requires_grad:
                def grad_hook(g, x=x, rows=rows):
                    prod = x * g.float()  # (B, T, D)
                    if kind == "head":
                        prod = prod.reshape(*prod.shape[:2], info.num_heads, info.head_dim).sum(-1)
                    self.attr[kind][l][rows] += prod.sum(1).numpy()

                a.register_hook(grad_hook)

        return pre_hook

    def __enter__(self):
        for info in self.units.layers:
            if info.ffn_size:
                self._handles.append(info.mlp.down_proj.register_forward_pre_hook(self._hook("neuron", info.index)))
            if info.num_heads:
                self._handles.append(info.attn.o_proj.register_forward_pre_hook(self._hook("head", info.index)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False


def _grad_through_activations(model):
    """Parameters frozen, embedding output marked as requiring grad: backward reaches activations only."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))

    def restore():
        handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)

    return restore


def record_attributions(ctx, progress=None):
    """One forward (+ backward) pass over every row; returns per item, per kind, (items, units) matrices of
    attribution and mean |a - m|, units ordered as ``ctx.units.units(kind)``."""
    items, units = ctx.items, ctx.units
    recorder = AttributionRecorder(units, ctx.means, len(items.rows))
    gradient = ctx.options.attribution == "gradient"
    weights = items.choice_weights(ctx.base_rows[0]) if gradient else None
    restore = _grad_through_activations(ctx.model) if gradient else (lambda: None)
    try:
        with recorder:
            ctx.forwards += 1
            run_rows(ctx.model, items, units.forward_kwargs, ctx.options.autocast, recorder.before_batch,
                     row_weights=weights, progress=progress)
    finally:
        restore()
    row_item = np.array([row.item for row in items.rows])
    rows_per_item = np.bincount(row_item, minlength=items.n_items).astype(np.float64)
    out = {}
    for kind in FINE:
        layers = sorted(recorder.attr[kind])
        attr = np.concatenate([recorder.attr[kind][l] for l in layers], axis=1) if layers else np.zeros((len(row_item), 0))
        act = np.concatenate([recorder.act[kind][l] for l in layers], axis=1) if layers else np.zeros((len(row_item), 0))
        item_attr = np.zeros((items.n_items, attr.shape[1]))
        item_act = np.zeros((items.n_items, act.shape[1]))
        np.add.at(item_attr, row_item, attr)
        np.add.at(item_act, row_item, act)
        out[kind] = {"attribution": item_attr, "activation": item_act / rows_per_item[:, None]}
    return out


# ------------------------------------------------------------------------------------------------- scoring


def unit_scores(ctx, name, records, cap_idx=None, ref_idx=None):
    """Per kind ``(importance, specificity)`` arrays for capability ``name`` (optionally on an item subset)."""
    cap_idx = ctx.cap_items(name) if cap_idx is None else cap_idx
    ref_idx = ctx.ref_items(name) if ref_idx is None else ref_idx
    out = {}
    if ctx.options.attribution == "gradient":
        for kind in FINE:
            attr = records[kind]["attribution"]  # (items, units)
            importance = attr[cap_idx].mean(0)
            ref = attr[ref_idx].mean(0)
            out[kind] = (importance, importance - np.maximum(ref, 0.0))
    else:
        for kind in FINE:
            act = records[kind]["activation"]
            cap, ref = act[cap_idx].mean(0), act[ref_idx].mean(0)
            eps = 1e-6 * max(float(act.mean()), 1e-12)
            out[kind] = (cap, np.log((cap + eps) / (ref + eps)))
    return out


def robust_z(values):
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    med = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - med))
    scale = mad if mad > 0 else values.std()
    return (values - med) / scale if scale > 0 else np.zeros_like(values)


def select_units(ctx, scores, allowed_layers=None):
    """``{kind: [unit ids]}`` of the stand-out units (see the module docstring), best first."""
    opts, units = ctx.options, ctx.units
    best = {k: float(scores[k][1].max()) if scores[k][1].size else 0.0 for k in FINE}
    if opts.attribution == "gradient":  # attributions share one unit (log-odds), so compare across kinds
        best = dict.fromkeys(FINE, max(best.values()))
    limits = {"neuron": opts.max_neuron_fraction, "head": opts.max_head_fraction}
    selection = {}
    for kind in FINE:
        spec = scores[kind][1]
        ids = units.units(kind)
        if spec.size == 0:
            selection[kind] = []
            continue
        z = robust_z(spec)
        ok = (z >= opts.z_threshold) & (spec > 0) & (spec >= opts.min_share_of_top * best[kind])
        if allowed_layers is not None:
            allowed = set(allowed_layers)
            ok &= np.array([u[0] in allowed for u in ids])
        order = [i for i in np.argsort(-spec, kind="stable") if ok[i]]
        cap = max(1, int(limits[kind] * len(ids)))
        selection[kind] = [ids[i] for i in order[:cap]]
    return selection


def _top_n(ctx, scores, counts, allowed_layers=None):
    units = ctx.units
    out = set()
    for kind in FINE:
        ids = units.units(kind)
        spec = scores[kind][1].copy()
        if allowed_layers is not None:
            allowed = set(allowed_layers)
            spec[[u[0] not in allowed for u in ids]] = -np.inf
        out |= {(kind, ids[i]) for i in np.argsort(-spec, kind="stable")[:counts[kind]]}
    return out


def split_half_stability(ctx, name, records, selection, allowed_layers=None):
    """Jaccard overlap of the selections made on two disjoint halves of the items (same size per kind)."""
    counts = {k: len(selection[k]) for k in FINE}
    if not sum(counts.values()):
        return 0.0
    rng = np.random.default_rng(ctx.options.seed)
    cap, ref = rng.permutation(ctx.cap_items(name)), rng.permutation(ctx.ref_items(name))
    if len(cap) < 2 or len(ref) < 2:
        return 0.0
    halves = []
    for part in (0, 1):
        c = cap[part::2]
        r = ref[part::2]
        halves.append(_top_n(ctx, unit_scores(ctx, name, records, c, r), counts, allowed_layers))
    union = halves[0] | halves[1]
    return len(halves[0] & halves[1]) / len(union) if union else 0.0


def _sig(values, digits=4):
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64)]


def _per_layer(ctx, kind, values):
    widths = ctx.units.widths(kind)
    out, start = [], 0
    for w in widths:
        out.append(_sig(values[start:start + w]))
        start += w
    return out


def activation_stage(ctx, capabilities, flagged, records):
    """Stage 2 for each capability, from `record_attributions`' ``records``; returns ``{cap: (result, selections)}``
    where ``selections = {"global": {...}, "flagged": {...}}``."""
    results = {}
    for name in capabilities:
        scores = unit_scores(ctx, name, records)
        chosen = {"global": select_units(ctx, scores), "flagged": select_units(ctx, scores, flagged[name])}
        stability = {"global": split_half_stability(ctx, name, records, chosen["global"]),
                     "flagged": split_half_stability(ctx, name, records, chosen["flagged"], flagged[name])}
        result = {"method": ctx.options.attribution}
        for kind in FINE:
            importance, specificity = scores[kind]
            result[kind] = {"importance": _per_layer(ctx, kind, importance),
                            "specificity": _per_layer(ctx, kind, specificity)}
        head_spec = scores["head"][1]
        kv, start = [], 0
        for info in ctx.units.layers:
            size = info.group_size
            layer = head_spec[start:start + info.num_heads]
            kv.append(_sig([layer[g * size:(g + 1) * size].sum() for g in range(info.num_kv_heads)]))
            start += info.num_heads
        result["kv_group"] = {"specificity": kv, "note": "sum of the group's head specificities"}
        result["selected"] = {k: [list(u) for u in chosen["global"][k]] for k in FINE}
        result["selected_in_flagged"] = {k: [list(u) for u in chosen["flagged"][k]] for k in FINE}
        result["split_half_jaccard"] = round(stability["global"], 4)
        result["split_half_jaccard_in_flagged"] = round(stability["flagged"], 4)
        results[name] = (result, chosen)
    return results
