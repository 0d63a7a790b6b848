"""Importance scorers: one pruner, several ways to say what matters. A scorer maps a decoder stack (plus, for most,
calibration statistics per capability) to a `StructureScores`: one number per head, FFN unit, layer and hidden
channel, higher = keep. The budget allocator (`budget.py`) turns scores into a `PrunePlan`.

Registered scorers (``SCORERS``; add one with `register_scorer`):

``capability`` (NEXUS)
    For every capability ``c`` with recipe weight ``w_c``: first-order Taylor and activation statistics on ``c``'s
    calibration data (`structure_statistics`), plus the localisation feature map's per-unit scores when one is
    given. Each term is normalised per structure kind (divided by its mean over the whole stack, so layers stay
    comparable and dynamic budgeting can move width between them), mixed with ``mix`` and summed with weights
    ``w_c / sum(w)``. Allocation: ``auto`` (`compress.select_allocation`: uniform or dynamic with a bounded
    per-layer deviation, whichever pruned model has the lowest loss on held-aside calibration text); auto also
    chooses the mix (`CapabilityScorer.variants`: the configured one, activation alone, Taylor alone) the same way.
``minitron`` (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation")
    Activation importance on the pooled calibration data, no gradients: head = mean ``||head output||``, neuron =
    mean ``|activation|``, hidden channel = summed ``|RMSNorm output|``, layer = block influence. Allocation:
    uniform width (every layer keeps the same fraction), as Minitron prunes.
``magnitude``
    Weight norms: a head = the norm of its ``q_proj`` rows and ``o_proj`` columns, a unit = its ``gate``/``up`` rows
    and ``down`` column, a channel = every weight that reads or writes it, a layer = the norm of what it writes.
``weight_pca`` (SliceGPT-like baseline, Ashkboos et al. 2024)
    Variance-based selection from the weights alone. For each set of units (one layer's heads, one layer's FFN units,
    the residual channels) stack each unit's weights into a row of ``M`` (unit x features), take the principal
    subspace of ``M`` holding ``energy`` (default 90%) of its variance, and score a unit by its leverage in that
    subspace (``||U_k[unit]||^2``): the units that carry the dominant weight variance. SliceGPT proper rotates the
    residual stream into its principal basis and slices the trailing directions; a Nexus tower stores unrotated
    weights and Gemma's post-sub-block norms are not rotation invariant, so this baseline keeps the *units* that
    span the principal weight subspace instead of rotating. Layers: their share of the stack's weight variance.
``random``
    Seeded uniform scores (``seed`` option).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from .decoder_units import DecoderUnits

ALLOCATIONS = ("auto", "dynamic", "uniform")


@dataclass
class StructureScores:
    """Higher = more important. Lists hold one tensor per layer (None where the layer has no heads / no MLP)."""

    heads: list
    neurons: list
    layers: torch.Tensor  # (layers,)
    hidden: torch.Tensor  # (hidden,)

    def check(self, units):
        """Raise when the shapes do not match the stack (a scorer bug or a feature map of another model)."""
        for info in units.layers:
            for kind, value, width in (("heads", self.heads[info.index], info.num_heads),
                                       ("neurons", self.neurons[info.index], info.ffn_size)):
                size = 0 if value is None else value.numel()
                if size != width:
                    raise ValueError(f"{kind} scores of layer {info.index}: {size} values for {width} units")
        if self.layers.numel() != len(units.layers) or self.hidden.numel() != units.hidden_size:
            raise ValueError("layer / hidden-channel scores do not match the model")
        return self


SCORERS: dict[str, type] = {}


def register_scorer(name, cls):
    """Add a scorer class under ``name``; a taken name is an error, never a silent override."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"scorer name must be a non-empty string, got {name!r}")
    if name in SCORERS:
        raise ValueError(f"scorer {name!r} is already registered (by {SCORERS[name].__qualname__})")
    cls.name = name
    SCORERS[name] = cls
    return cls


def make_scorer(name, **options):
    """An instance of the scorer registered as ``name``; the error lists the registered scorers."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; registered scorers: {', '.join(sorted(SCORERS))}")
    return SCORERS[name](**options)


class Scorer:
    """Base class. ``needs`` says which calibration statistics `score` wants: None, "activations" or "gradients"."""

    name: ClassVar[str] = ""
    needs: ClassVar[str | None] = None
    allocation: ClassVar[str] = "dynamic"

    def __init__(self, **options):
        if options:
            raise ValueError(f"scorer {self.name!r} takes no options, got {sorted(options)}")

    def score(self, units: DecoderUnits, statistics=None, weights=None, feature_map=None) -> StructureScores:
        raise NotImplementedError

    def variants(self) -> dict:
        """{name: scorer} that ``allocation: auto`` may also choose between (by held-aside loss); this one alone."""
        return {"": self}


def _per_layer(units, fn_attn, fn_mlp):
    heads = [fn_attn(info) if info.attn is not None else None for info in units.layers]
    neurons = [fn_mlp(info) if info.mlp is not None else None for info in units.layers]
    return heads, neurons


# ---------------------------------------------------------------------------------------------- random


class RandomScorer(Scorer):
    def __init__(self, seed=0):
        self.seed = int(seed)

    def score(self, units, statistics=None, weights=None, feature_map=None):
        g = torch.Generator().manual_seed(self.seed)
        heads, neurons = _per_layer(units, lambda i: torch.rand(i.num_heads, generator=g),
                                    lambda i: torch.rand(i.ffn_size, generator=g))
        return StructureScores(heads, neurons, torch.rand(len(units.layers), generator=g),
                               torch.rand(units.hidden_size, generator=g))


# ---------------------------------------------------------------------------------------------- magnitude


def _w(linear):
    return linear.weight.detach().float()


def _head_blocks(info):
    """(num_heads, features) weights of each query head: its q_proj rows and o_proj columns, flattened."""
    nh, hd = info.num_heads, info.head_dim
    q = _w(info.attn.q_proj).reshape(nh, hd * _w(info.attn.q_proj).shape[1])
    o = _w(info.attn.o_proj).reshape(-1, nh, hd).permute(1, 0, 2).reshape(nh, -1)
    return torch.cat([q, o], 1)


def _neuron_blocks(info):
    """(ffn_size, 3 * hidden): gate row, up row, down column of each FFN unit."""
    mlp = info.mlp
    return torch.cat([_w(mlp.gate_proj), _w(mlp.up_proj), _w(mlp.down_proj).T], 1)


def _channel_gram(units):
    """(hidden, hidden) Gram matrix ``M M^T`` of the (hidden x features) matrix ``M`` that stacks every weight of the
    stack reading (q/k/v/gate/up) or writing (o/down) each residual channel, accumulated without materialising ``M``
    (for Gemma-3-270M, ``M`` would hold 100M numbers)."""
    gram = torch.zeros(units.hidden_size, units.hidden_size, dtype=torch.float64)
    for info in units.layers:
        parts = []
        if info.attn is not None:
            a = info.attn
            parts += [_w(a.q_proj).T, _w(a.k_proj).T, _w(a.v_proj).T, _w(a.o_proj)]
        if info.mlp is not None:
            parts += [_w(info.mlp.gate_proj).T, _w(info.mlp.up_proj).T, _w(info.mlp.down_proj)]
        for part in parts:
            gram += (part @ part.T).double()  # fp32 products (4x cheaper), accumulated in fp64
    return gram


def _layer_writes(info):
    out = []
    if info.attn is not None:
        out.append(_w(info.attn.o_proj).reshape(-1))
    if info.mlp is not None:
        out.append(_w(info.mlp.down_proj).reshape(-1))
    return torch.cat(out) if out else torch.zeros(1)


class MagnitudeScorer(Scorer):
    def score(self, units, statistics=None, weights=None, feature_map=None):
        heads, neurons = _per_layer(units, lambda i: _head_blocks(i).norm(dim=1),
                                    lambda i: _neuron_blocks(i).norm(dim=1))
        layers = torch.stack([_layer_writes(i).norm() for i in units.layers])
        gram = _channel_gram(units)
        return StructureScores(heads, neurons, layers, gram.diagonal().sqrt().float())


# ---------------------------------------------------------------------------------------------- weight PCA


def _leverage(evals, evecs, energy):
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)  # descending
    if evals.sum() <= 0:
        return None, 0
    share = evals.cumsum(0) / evals.sum()
    k = int((share < energy).sum()) + 1
    return evecs[:, :k], k


def _leverage_from_gram(gram, energy):
    """Row leverages ``||U_k[row]||^2`` from the (rows x rows) Gram matrix of a row-centred matrix ``U S V^T``."""
    evals, evecs = torch.linalg.eigh(gram)
    u, _ = _leverage(evals, evecs, energy)
    return torch.ones(gram.shape[0]) if u is None else (u**2).sum(1).float()


def leverage_scores(matrix, energy=0.9):
    """Leverage of each row of ``matrix`` (rows x features) in the principal subspace holding ``energy`` of its
    variance: ``||U_k[row]||^2`` where ``matrix - mean = U S V^T`` and k is the smallest rank reaching ``energy``.
    Uses the smaller of the row and feature Gram matrices (``U = M V / S``)."""
    if matrix.shape[0] < 2:
        return torch.ones(matrix.shape[0])
    centred = matrix - matrix.mean(0, keepdim=True)
    if min(centred.shape) <= 256:  # small: double precision is free; large (Gemma's 2048 x 1920): fp32, 4x cheaper
        centred = centred.double()
    if centred.shape[0] <= centred.shape[1]:
        return _leverage_from_gram(centred @ centred.T, energy)
    evals, evecs = torch.linalg.eigh(centred.T @ centred)
    v, k = _leverage(evals, evecs, energy)
    if v is None:
        return torch.ones(matrix.shape[0])
    s2 = evals.flip(0)[:k].clamp(min=1e-30)
    return (((centred @ v) ** 2) / s2).sum(1).float()


class WeightPCAScorer(Scorer):
    def __init__(self, energy=0.9):
        if not 0 < energy <= 1:
            raise ValueError(f"weight_pca energy must be in (0, 1], got {energy}")
        self.energy = float(energy)

    def _scaled(self, block):
        # leverages sum to k in every layer: scale by the layer's total variance so layers compare (dynamic budgets)
        return leverage_scores(block, self.energy) * block.var(0).sum() * block.shape[0]

    def score(self, units, statistics=None, weights=None, feature_map=None):
        heads, neurons = _per_layer(units, lambda i: self._scaled(_head_blocks(i)),
                                    lambda i: self._scaled(_neuron_blocks(i)))
        variance = torch.stack([_layer_writes(i).var() * _layer_writes(i).numel() for i in units.layers])
        # rows of M centred (minus the mean row): their Gram matrix is C G C with C = I - 1 1^T / H
        centre = torch.eye(units.hidden_size, dtype=torch.float64) - 1.0 / units.hidden_size
        hidden = _leverage_from_gram(centre @ _channel_gram(units) @ centre, self.energy)
        return StructureScores(heads, neurons, variance / variance.sum(), hidden)


# ---------------------------------------------------------------------------------------------- activations


def _pooled(statistics, weights=None):
    """Token-weighted (or capability-weighted) average of several `StructureStatistics`."""
    caps = list(statistics)
    w = {c: (weights or {}).get(c, 1.0) * (1.0 if weights else statistics[c].tokens) for c in caps}
    total = sum(w.values())

    def avg(getter):
        values = [getter(statistics[c]) for c in caps]
        if any(v is None for v in values):
            return None
        return sum(w[c] * v for c, v in zip(caps, values)) / total

    return avg


def _check_statistics(name, statistics, gradients=False):
    if not statistics:
        raise ValueError(f"scorer {name!r} needs calibration statistics (capability data); none were given")
    if gradients and not all(s.gradients for s in statistics.values()):
        raise ValueError(f"scorer {name!r} needs gradient statistics; collect them with gradients=True")


class MinitronScorer(Scorer):
    needs = "activations"
    allocation = "uniform"

    def score(self, units, statistics=None, weights=None, feature_map=None):
        _check_statistics(self.name, statistics)
        avg = _pooled(statistics)
        n = len(units.layers)
        heads = [avg(lambda s, l=l: s.head_activation[l]) for l in range(n)]
        neurons = [avg(lambda s, l=l: s.neuron_activation[l]) for l in range(n)]
        return StructureScores(heads, neurons, avg(lambda s: s.layer_redundancy), avg(lambda s: s.hidden_activation))


# ---------------------------------------------------------------------------------------------- capability


def _normalised(values):
    """Divide a kind's per-layer tensors by their common mean, so layers stay comparable to one another."""
    present = [v for v in values if v is not None]
    if not present:
        return values
    mean = torch.cat([v.reshape(-1) for v in present]).mean()
    mean = mean if mean > 0 else torch.tensor(1.0)
    return [None if v is None else v / mean for v in values]


def _norm_vector(v):
    if v is None:
        return None
    mean = v.mean()
    return v / mean if mean > 0 else v


def mix_name(taylor, activation):
    """``taylor+activation`` / ``activation`` / ``taylor`` (with the weights when they are not 0 or 1)."""
    parts = [name if w == 1 else f"{w:g}*{name}" for name, w in (("taylor", taylor), ("activation", activation)) if w]
    return "+".join(parts) or "feature_map"


class CapabilityScorer(Scorer):
    """Capability-weighted importance (see the module docstring); ``mix`` weighs its three terms."""

    needs = "gradients"
    allocation = "auto"

    def __init__(self, taylor=1.0, activation=1.0, feature_map=1.0):
        self.mix = {"taylor": float(taylor), "activation": float(activation), "feature_map": float(feature_map)}
        if any(v < 0 for v in self.mix.values()) or not any(self.mix.values()):
            raise ValueError(f"capability scorer mix weights must be >= 0 and not all 0, got {self.mix}")

    def variants(self):
        """The configured mix, activation alone and Taylor alone (the feature-map weight kept in each): which one
        prunes best differs by teacher and budget, so ``allocation: auto`` picks by held-aside loss."""
        fm = self.mix["feature_map"]
        out = {}
        for taylor, activation in ((self.mix["taylor"], self.mix["activation"]), (0.0, 1.0), (1.0, 0.0)):
            name = mix_name(taylor, activation)
            if name not in out and (taylor or activation or fm):
                out[name] = CapabilityScorer(taylor=taylor, activation=activation, feature_map=fm)
        return out

    def _terms(self, s, fmap):
        n = len(s.head_taylor)
        terms = [
            (self.mix["taylor"], _normalised(s.head_taylor), _normalised(s.neuron_taylor),
             _norm_vector(s.layer_taylor), _norm_vector(s.hidden_taylor)),
            (self.mix["activation"], _normalised(s.head_activation), _normalised(s.neuron_activation),
             _norm_vector(s.layer_redundancy), _norm_vector(s.hidden_activation)),
        ]
        if fmap is not None and self.mix["feature_map"]:
            heads = _normalised(fmap.get("heads") or [None] * n)
            neurons = _normalised(fmap.get("neurons") or [None] * n)
            layers = _norm_vector(fmap.get("layers"))
            terms.append((self.mix["feature_map"] * float(fmap.get("confidence", 1.0)), heads, neurons, layers, None))
        return terms

    def score(self, units, statistics=None, weights=None, feature_map=None):
        _check_statistics(self.name, statistics, gradients=True)
        weights = {c: float((weights or {}).get(c, 1.0)) for c in statistics}
        total_w = sum(weights.values())
        n = len(units.layers)
        heads = [None if i.attn is None else torch.zeros(i.num_heads) for i in units.layers]
        neurons = [None if i.mlp is None else torch.zeros(i.ffn_size) for i in units.layers]
        layers, hidden = torch.zeros(n), torch.zeros(units.hidden_size)
        for cap, stats in statistics.items():
            fmap = (feature_map or {}).get(cap)
            for mix, h, nr, lay, hid in self._terms(stats, fmap):
                w = weights[cap] / total_w * mix
                for l in range(n):
                    if heads[l] is not None and h[l] is not None:
                        heads[l] += w * h[l]
                    if neurons[l] is not None and nr[l] is not None:
                        neurons[l] += w * nr[l]
                if lay is not None:
                    layers += w * lay
                if hid is not None:
                    hidden += w * hid
        return StructureScores(heads, neurons, layers, hidden)


register_scorer("capability", CapabilityScorer)
register_scorer("minitron", MinitronScorer)
register_scorer("magnitude", MagnitudeScorer)
register_scorer("weight_pca", WeightPCAScorer)
register_scorer("random", RandomScorer)
