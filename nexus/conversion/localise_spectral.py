"""Localisation stage 3, spectral: do the selected units' weights form a coherent low-rank structure?

Every selected unit contributes residual-stream directions: what it **writes** (a neuron's ``down_proj`` column, a
head's ``head_dim`` columns of ``o_proj``) and what it **reads** (a neuron's ``gate_proj`` row, a head's ``q_proj``
rows). Rows are scaled to unit norm (so a large-norm unit cannot fake structure), stacked, and decomposed by SVD.

- ``top_k_energy``: the share of the squared singular values in the top ``k``;
- ``effective_rank``: exp(entropy of the normalised squared singular values) (Roy & Vetterli 2007).

Both are compared with ``spectral_random_sets`` random unit sets of the same composition (as many neurons and heads),
drawn from the whole model and, separately, layer-matched (the same number per layer: units of one layer share more
structure than units of different layers, so this is the stricter comparison). ``p_value`` is the share of random
sets whose effective rank is at most the selection's (one-sided: lower = more coherent); the stage confidence is
1 - min(1, 2 x the smaller of the write and read p-values) under the recipe's headline control.
"""

import numpy as np
import torch

from .localise_activation import FINE
from .random_control import CONTROLS, random_selection


def spectrum(matrix, k):
    """(top-k energy, effective rank) of a (rows, hidden) matrix with unit-norm rows."""
    matrix = matrix / matrix.norm(dim=1, keepdim=True).clamp(min=1e-12)
    s = torch.linalg.svdvals(matrix.double())
    energy = s**2
    total = float(energy.sum())
    if total <= 0:
        return 0.0, 0.0
    p = energy / total
    p = p[p > 0]
    return float(energy[:k].sum() / total), float(torch.exp(-(p * p.log()).sum()))


def _matrix(units, selection, side):
    rows = []
    for kind in FINE:
        for unit in selection.get(kind, []):
            vec = units.write_vectors(kind, tuple(unit)) if side == "write" else units.read_vectors(kind, tuple(unit))
            rows.append(vec)
    return torch.cat(rows) if rows else None


def _summary(values):
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return {"mean": round(float(values.mean()), 5), "interval": [round(float(lo), 5), round(float(hi), 5)]}


def spectral_stage(ctx, selection):
    """Stage 3 for one selection; returns the result dict (with ``confidence``)."""
    opts, units = ctx.options, ctx.units
    size = sum(len(selection.get(k, [])) for k in FINE)
    if size == 0:
        return {"units": 0, "confidence": 0.0, "note": "no unit selected"}
    rng = np.random.default_rng(opts.seed)
    controls = {c: [random_selection(units, selection, rng, c == "layer_matched")
                    for _ in range(opts.spectral_random_sets)] for c in CONTROLS}
    headline = opts.controls[0]
    result = {"units": size, "k": opts.spectral_top_k, "control": headline}
    p_values = []
    for side in ("write", "read"):
        matrix = _matrix(units, selection, side)
        energy, erank = spectrum(matrix, opts.spectral_top_k)
        result[side] = {"rows": int(matrix.shape[0]), "top_k_energy": round(energy, 5),
                        "effective_rank": round(erank, 4)}
        for control, randoms in controls.items():
            rand = np.array([spectrum(_matrix(units, r, side), opts.spectral_top_k) for r in randoms])  # (n, 2)
            p = float((rand[:, 1] <= erank).mean())
            figures = {
                "random_top_k_energy": _summary(rand[:, 0]), "random_effective_rank": _summary(rand[:, 1]),
                "effective_rank_ratio": round(erank / max(float(rand[:, 1].mean()), 1e-12), 4),
                "p_value": round(p, 4),
            }
            if control == headline:
                result[side].update(figures)
                p_values.append(p)
            else:
                result[side][control] = figures
    result["confidence"] = round(max(0.0, 1.0 - min(1.0, 2 * min(p_values))), 4)
    return result
