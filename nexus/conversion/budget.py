"""Dynamic budgeting: turn importance scores and a parameter budget into a `PrunePlan` whose size meets the budget.

Parameters are counted analytically from a Nexus config (`config_parameter_count`, equal to
`structured_prune.parameter_count` of the built model; the tests check it), so the allocator can try thousands of
width assignments without building one.

Order of decisions (each kind keeps its own structural rules):

1. vocabulary: fixed beforehand by `vocab_trim` (it only changes the embedding size here);
2. hidden channels: the top ``hidden_keep`` fraction by score (the residual width is shared by every layer);
3. whole layers: the ``drop_layers`` lowest-scoring layers go;
4. heads and FFN units share what is left. One knob ``f`` in [0, 1] keeps the top ``f`` fraction of the heads and
   the top ``f`` fraction of the FFN units, and ``f`` is the largest value whose model fits the budget (bisection;
   the count grows monotonically with ``f``). With ``allocation="dynamic"`` the top fraction is taken over the
   *whole stack*, so a layer whose units score high keeps more of them and per-layer widths differ; with
   ``"uniform"`` every layer keeps the same fraction (Minitron). ``max_deviation`` bounds how far a layer's kept
   fraction may stray from ``f`` under dynamic allocation (OWL-style, Yin et al. 2024: 1.0 = pure global ranking,
   0.1 = each layer keeps ``f`` +- 10% of its units). Dynamic allocation then spends the remainder on the
   next-best FFN units, so the result sits within one unit's cost of the budget.

Heads obey grouped-query attention: a layer keeps ``g`` kv groups with ``q`` query heads each (equal groups); for a
head allowance ``n`` the best-scoring feasible set with ``g * q <= n`` is kept. A layer left with no head loses its
attention sub-block, one with no FFN unit its MLP (`apply_prune_plan` notes both).
"""

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..modeling_nexus import NexusConfig
from .structured_prune import PrunePlan, TowerPlan


class BudgetError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- counting


def _matrix(in_f, out_f, rank=None):
    """Weights of one projection: dense ``in x out``, or its two factors ``rank x (in + out)``."""
    return in_f * out_f if rank is None else rank * (in_f + out_f)


def layer_parameter_count(spec, hidden, heads, kv_heads, head_dim, ffn, ranks=None):
    """Parameters of one decoder layer of tower ``spec`` at residual width ``hidden`` with the given widths
    (``ranks``: the layer's factored projections, ``{name: rank}``)."""
    r = ranks or {}
    total = 0
    if heads > 0:
        q, kv = heads * head_dim, kv_heads * head_dim
        total += hidden  # input_layernorm
        total += _matrix(hidden, q, r.get("q_proj")) + _matrix(hidden, kv, r.get("k_proj"))
        total += _matrix(hidden, kv, r.get("v_proj")) + (q + 2 * kv if spec["attention_bias"] else 0)
        total += _matrix(q, hidden, r.get("o_proj")) + (hidden if spec["attention_out_bias"] else 0)
        total += 2 * head_dim if spec["qk_norm"] else 0
        total += hidden if spec["sandwich_norms"] else 0
    if ffn > 0:
        total += hidden  # pre_feedforward_layernorm
        total += _matrix(hidden, ffn, r.get("gate_proj")) + _matrix(hidden, ffn, r.get("up_proj"))
        total += _matrix(ffn, hidden, r.get("down_proj")) + (2 * ffn + hidden if spec["mlp_bias"] else 0)
        total += hidden if spec["sandwich_norms"] else 0
    return total


def _fixed_count(config, hidden, vocab):
    """(embedding-like params, other non-layer params) at shared width ``hidden`` and vocabulary ``vocab``."""
    embedding = vocab * hidden * (1 if config.tie_word_embeddings else 2)
    other = hidden  # final norm
    if len(config.towers) > 1:
        other += hidden * len(config.towers) + len(config.towers)  # router
    for spec in config.towers:
        if spec["hidden_size"] != config.hidden_size:
            other += 2 * config.hidden_size * spec["hidden_size"]
    return embedding, other


def config_parameter_count(config):
    """``{"total", "embedding", "non_embedding"}`` of a `NexusConfig` (embedding = input embedding + untied head)."""
    if isinstance(config, dict):
        config = NexusConfig(**config)
    embedding, other = _fixed_count(config, config.hidden_size, config.vocab_size)
    layers = 0
    for spec in config.towers:
        for layer in spec["layers"]:
            layers += layer_parameter_count(spec, spec["hidden_size"], layer["num_attention_heads"],
                                            layer["num_key_value_heads"], layer["head_dim"], layer["intermediate_size"],
                                            layer.get("ranks"))
    total = embedding + other + layers
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


# ---------------------------------------------------------------------------------------------- budget


@dataclass
class Budget:
    """A resolved target: at most ``params`` parameters, counted as ``counts`` ("non_embedding" or "total")."""

    params: int
    counts: Literal["non_embedding", "total"] = "non_embedding"
    source: str = ""


def resolve_budget(params=None, fraction=None, memory_gb=None, counts="non_embedding", bytes_per_param=2,
                   teacher_counts=None):
    """A `Budget` from exactly one of ``params``, ``fraction`` (of the teacher's count) or ``memory_gb``.

    A memory budget counts every parameter (the embedding takes memory too) at ``bytes_per_param`` (bf16: 2).
    """
    given = [x is not None for x in (params, fraction, memory_gb)]
    if sum(given) != 1:
        raise BudgetError("budget: give exactly one of params, fraction or memory_gb")
    if counts not in ("non_embedding", "total"):
        raise BudgetError(f"budget.counts must be 'non_embedding' or 'total', got {counts!r}")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise BudgetError(f"budget.fraction must be in (0, 1], got {fraction}")
        if teacher_counts is None:
            raise BudgetError("budget.fraction needs the teacher's parameter count")
        return Budget(int(fraction * teacher_counts[counts]), counts, f"{fraction:g} x teacher {counts} params")
    if memory_gb is not None:
        if memory_gb <= 0:
            raise BudgetError(f"budget.memory_gb must be positive, got {memory_gb}")
        return Budget(int(memory_gb * 2**30 / bytes_per_param), "total",
                      f"{memory_gb:g} GB at {bytes_per_param} bytes/param")
    if params <= 0:
        raise BudgetError(f"budget.params must be positive, got {params}")
    return Budget(int(params), counts, f"{params} {counts} params")


# ---------------------------------------------------------------------------------------------- allocation


@dataclass
class AllocationOptions:
    allocation: Literal["dynamic", "uniform"] = "dynamic"
    hidden_keep: float = 1.0
    drop_layers: int = 0
    max_deviation: float = 1.0


@dataclass
class Allocation:
    plan: PrunePlan
    params: dict  # config_parameter_count of the planned model
    target: Budget
    keep_fraction: float  # the f that was found
    widths: list = field(default_factory=list)  # per original layer: {"heads", "kv_heads", "ffn", "dropped"}


def _head_options(scores, num_heads, num_kv):
    """For one layer: best (score, heads) for every feasible kept-head count (equal heads per kept kv group)."""
    group = num_heads // num_kv
    best = {0: (0.0, [])}
    per_group = [sorted(range(g * group, (g + 1) * group), key=lambda h: -float(scores[h])) for g in range(num_kv)]
    for q in range(1, group + 1):
        tops = [(sum(float(scores[h]) for h in heads[:q]), heads[:q]) for heads in per_group]
        tops.sort(key=lambda t: -t[0])
        for g in range(1, num_kv + 1):
            total = sum(t[0] for t in tops[:g])
            size = g * q
            if size not in best or total > best[size][0]:
                best[size] = (total, sorted(h for t in tops[:g] for h in t[1]))
    sizes = sorted(best)
    # for an allowance n: the best option among sizes <= n
    table, current = [], best[0]
    for n in range(num_heads + 1):
        if n in best and best[n][0] >= current[0]:
            current = best[n]
        table.append(current[1])
    return table, sizes


class _Stack:
    """The layers of one tower as plain numbers, with the scores, for fast counting."""

    def __init__(self, config, tower, scores, hidden, vocab, dropped):
        self.config, self.spec = config, config.towers[tower]
        self.layers = self.spec["layers"]
        self.hidden = hidden
        self.embedding, self.other = _fixed_count(config, hidden, vocab)
        if self.spec["hidden_size"] != config.hidden_size:
            raise BudgetError("budgeting a tower with its own width (edge projections) is not supported")
        self.live = [i for i in range(len(self.layers)) if i not in dropped]
        self.heads = {i: scores.heads[i] for i in self.live if self.layers[i]["num_attention_heads"] > 0}
        self.neurons = {i: scores.neurons[i] for i in self.live if self.layers[i]["intermediate_size"] > 0}
        self.head_tables = {i: _head_options(s, self.layers[i]["num_attention_heads"],
                                             self.layers[i]["num_key_value_heads"])[0] for i, s in self.heads.items()}
        self.neuron_rank = {i: torch.argsort(s.float(), descending=True, stable=True).tolist()
                            for i, s in self.neurons.items()}
        self.neuron_pos = {i: {j: p for p, j in enumerate(r)} for i, r in self.neuron_rank.items()}
        self.head_order = self._order(self.heads)
        self.neuron_order = self._order(self.neurons)

    @staticmethod
    def _order(per_layer):
        """Every unit (layer, index) of the stack, most important first (ties: lower layer, lower index)."""
        units = [(float(s[j]), l, j) for l, s in per_layer.items() for j in range(len(s))]
        units.sort(key=lambda u: (-u[0], u[1], u[2]))
        return [(u[1], u[2]) for u in units]

    def count(self, heads, neurons, counts):
        """Params of the stack keeping ``heads`` ({layer: [heads]}) and ``neurons`` ({layer: n kept})."""
        total = self.other + (self.embedding if counts == "total" else 0)
        for i in self.live:
            layer = self.layers[i]
            kept = heads.get(i, [])
            group = layer["num_attention_heads"] // max(1, layer["num_key_value_heads"])
            kv = len({h // group for h in kept})
            total += layer_parameter_count(self.spec, self.hidden, len(kept), kv, layer["head_dim"],
                                           neurons.get(i, 0))
        return total

    @staticmethod
    def bounds(f, n, deviation):
        """Kept-count limits of a layer with ``n`` units at global keep fraction ``f``: within ``deviation``."""
        return math.floor(max(0.0, f - deviation) * n), math.ceil(min(1.0, f + deviation) * n)

    def select(self, f, allocation, deviation=1.0):
        """({layer: kept heads}, {layer: number of kept units}) for keep-fraction ``f``; kept units of a layer are
        its top-scoring ones (`neuron_rank`)."""
        if allocation == "uniform":
            heads = {i: self.head_tables[i][math.ceil(f * len(s))] for i, s in self.heads.items()}
            return heads, {i: math.ceil(f * len(s)) for i, s in self.neurons.items()}
        allowance, counts = {}, {}
        for l, _ in self.head_order[:round(f * len(self.head_order))]:
            allowance[l] = allowance.get(l, 0) + 1
        for l, _ in self.neuron_order[:round(f * len(self.neuron_order))]:
            counts[l] = counts.get(l, 0) + 1
        heads = {}
        for i, s in self.heads.items():
            lo, hi = self.bounds(f, len(s), deviation)
            heads[i] = self.head_tables[i][min(hi, max(lo, allowance.get(i, 0)))]
        for i, s in self.neurons.items():
            lo, hi = self.bounds(f, len(s), deviation)
            counts[i] = min(hi, max(lo, counts.get(i, 0)))
        return heads, counts


def allocate(config, scores, budget, options=None, tower=0, vocab_size=None):
    """An `Allocation` (plan + its exact parameter count) for ``scores`` under ``budget`` (a `Budget`).

    Raises `BudgetError` when the budget is larger than the teacher or smaller than the smallest model this
    allocation can build (the fixed parameters plus one FFN unit; with uniform allocation, one head group and one
    FFN unit in every layer).
    """
    options = options or AllocationOptions()
    if options.allocation not in ("dynamic", "uniform"):
        raise BudgetError(f"allocation must be 'dynamic' or 'uniform', got {options.allocation!r}")
    if not 0 < options.hidden_keep <= 1:
        raise BudgetError(f"hidden_keep must be in (0, 1], got {options.hidden_keep}")
    if not 0 <= options.max_deviation <= 1:
        raise BudgetError(f"max_deviation must be in [0, 1], got {options.max_deviation}")
    if len(config.towers) != 1:
        raise BudgetError(f"compression budgets a one-tower model (an imported teacher); this one has "
                          f"{len(config.towers)} towers")
    n_layers = len(config.towers[tower]["layers"])
    if not 0 <= options.drop_layers < n_layers:
        raise BudgetError(f"drop_layers must be in [0, {n_layers - 1}] (a tower keeps a layer), got "
                          f"{options.drop_layers}")
    teacher = config_parameter_count(config)[budget.counts]
    if budget.params > teacher:
        raise BudgetError(f"budget of {budget.params:,} {budget.counts} params ({budget.source}) is larger than the "
                          f"teacher itself ({teacher:,}); nothing to prune")
    vocab = vocab_size or config.vocab_size
    hidden = max(1, round(options.hidden_keep * config.hidden_size))
    channels = None
    if hidden < config.hidden_size:
        channels = sorted(torch.argsort(scores.hidden.float(), descending=True, stable=True)[:hidden].tolist())
    dropped = []
    if options.drop_layers:
        dropped = sorted(torch.argsort(scores.layers.float(), stable=True)[:options.drop_layers].tolist())
    stack = _Stack(config, tower, scores, hidden, vocab, set(dropped))
    deviation = options.max_deviation

    def size(f):
        heads, counts = stack.select(f, options.allocation, deviation)
        return stack.count(heads, counts, budget.counts), heads, counts

    if not stack.neurons:
        raise BudgetError("the tower has no FFN units to budget (every layer's MLP is already gone)")
    floor = stack.count({}, {}, budget.counts) + layer_parameter_count(stack.spec, hidden, 0, 0, 0, 1)
    if options.allocation == "uniform":
        floor = size(1e-9)[0]
    if budget.params < floor:
        raise BudgetError(f"budget of {budget.params:,} {budget.counts} params ({budget.source}) is smaller than the "
                          f"smallest model this allocation can build ({floor:,}: the parameters that are not pruned"
                          + (" plus one head group and one FFN unit per layer" if options.allocation == "uniform"
                             else " plus one FFN unit") + ")")
    lo, hi = 0.0, 1.0
    if size(1.0)[0] <= budget.params:
        lo = 1.0
    else:
        for _ in range(40):
            mid = (lo + hi) / 2
            if size(mid)[0] <= budget.params:
                lo = mid
            else:
                hi = mid
    count, heads, counts = size(lo)
    if options.allocation == "dynamic":  # spend the rest on the next-best units, within each layer's limit
        per_unit = 3 * hidden + (2 if stack.spec["mlp_bias"] else 0)
        for l, j in stack.neuron_order:
            have = counts.get(l, 0)
            if stack.neuron_pos[l][j] != have or have >= stack.bounds(lo, len(stack.neurons[l]), deviation)[1]:
                continue
            counts[l] = have + 1
            new = stack.count(heads, counts, budget.counts) if have == 0 else count + per_unit
            if new > budget.params:
                counts[l] = have
                continue
            count = new
    if count > budget.params:  # only possible when nothing fits: the floor check above should have caught it
        raise BudgetError(f"could not fit {budget.params:,} params (smallest found {count:,})")
    neurons = {i: sorted(stack.neuron_rank[i][:c]) for i, c in counts.items()}

    tplan = TowerPlan(drop_layers=list(dropped))
    widths = []
    for i, layer in enumerate(stack.layers):
        nh, ffn = layer["num_attention_heads"], layer["intermediate_size"]
        if i in dropped:
            widths.append({"layer": i, "dropped": True, "heads": [], "ffn": 0})
            continue
        kept_heads = heads.get(i, []) if nh else []
        kept_units = neurons.get(i, []) if ffn else []
        if nh and len(kept_heads) < nh:
            tplan.heads[i] = list(kept_heads)
        if ffn and len(kept_units) < ffn:
            tplan.neurons[i] = list(kept_units)
        widths.append({"layer": i, "dropped": False, "heads": list(kept_heads), "ffn": len(kept_units)})
    plan = PrunePlan(towers={tower: tplan}, hidden_channels=channels)
    params = _planned_counts(config, tower, widths, hidden, vocab)
    return Allocation(plan, params, budget, lo, widths)


def _planned_counts(config, tower, widths, hidden, vocab):
    cfg = config.to_dict()
    for key in ("auto_map", "architectures", "transformers_version", "model_type"):
        cfg.pop(key, None)
    spec = dict(cfg["towers"][tower])
    layers = []
    for w, layer in zip(widths, spec["layers"]):
        if w["dropped"] or (not w["heads"] and not w["ffn"]):
            continue
        layer = dict(layer)
        group = layer["num_attention_heads"] // max(1, layer["num_key_value_heads"])
        layer["num_key_value_heads"] = len({h // group for h in w["heads"]})
        layer["num_attention_heads"] = len(w["heads"])
        layer["intermediate_size"] = w["ffn"]
        layers.append(layer)
    spec["layers"] = layers
    spec["hidden_size"] = hidden
    cfg["towers"] = [dict(t, hidden_size=hidden) if t.get("hidden_size") in (None, config.hidden_size) else t
                     for t in cfg["towers"]]
    cfg["towers"][tower] = spec
    cfg["hidden_size"], cfg["vocab_size"] = hidden, vocab
    return config_parameter_count(NexusConfig(**cfg))
