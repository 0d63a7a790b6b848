"""Critical units: the attention heads and FFN neurons the localiser found causally necessary for a capability, kept
by compression and protected by preservation (issue 17, item 2).

A unit is **critical** for a tower when, for a capability the tower serves, the feature map (`feature_map.py`)
selected it (``activation.selected``) *and* that selection passed the causal check: ablating exactly those units
lowered the capability more than random sets of the same composition in at least ``min_confidence`` of the joint
resamples (``causal.confidence``, stage 4 of `nexus localise`). A selection that did not pass is not trusted: its
units get no protection (the record says so, per capability).

Three uses, one representation (``{"head": {(layer, index)}, "neuron": {(layer, index)}}`` in the teacher's
numbering, or the student tower's after pruning):

- `critical_units`: read them from the feature map for a teacher and the capabilities its tower serves;
- `protect_scores`: raise their importance scores above every other unit's, so the allocator keeps them first
  (a budget too small to hold them all keeps the best-scored ones and the record says how many were lost);
- `student_numbering` and `critical_importance`: map the kept ones to the pruned tower's indices and build the
  preservation importance (1 on exactly the rows/columns of those units, 0 elsewhere).
"""

import torch

KINDS = ("head", "neuron")


def critical_units(fm: dict, teacher: str, capabilities, min_confidence: float = 0.95) -> tuple[dict, dict]:
    """``(units, report)``: the union of the causally confirmed selections of ``capabilities`` in ``teacher``'s entry
    of the feature map ``fm``; ``report`` {capability: {"used", "reason", "heads", "neurons"}}."""
    units = {k: set() for k in KINDS}
    report = {}
    entry = fm.get(teacher) or {}
    for cap in capabilities:
        c = entry.get(cap)
        if c is None:
            report[cap] = {"used": False, "reason": f"the feature map has no entry for {teacher!r} x {cap!r}"}
            continue
        if not c.get("present"):
            report[cap] = {"used": False, "reason": c.get("reason") or "capability not present in this teacher"}
            continue
        causal = c.get("causal") or {}
        confidence = causal.get("confidence")
        selected = (c.get("activation") or {}).get("selected") or {}
        if confidence is None or confidence < min_confidence:
            report[cap] = {"used": False, "causal_confidence": confidence,
                           "reason": f"the selection did not beat random units of the same size (causal confidence "
                                     f"{confidence} < {min_confidence})"}
            continue
        found = {k: {tuple(int(x) for x in u) for u in selected.get(k, [])} for k in KINDS}
        for k in KINDS:
            units[k] |= found[k]
        report[cap] = {"used": True, "causal_confidence": confidence, "heads": len(found["head"]),
                       "neurons": len(found["neuron"])}
    return units, report


def protect_scores(scores, units: dict):
    """``scores`` (a `StructureScores`) with every unit in ``units`` ranked above every other unit of its kind.

    Each protected score becomes ``top + 1 + its own score`` (``top``: the largest score of that kind anywhere), so
    protected units keep their order among themselves and stay ahead under any threshold the allocator tries."""
    for kind, lists in (("head", scores.heads), ("neuron", scores.neurons)):
        chosen = units.get(kind) or set()
        if not chosen:
            continue
        present = [t for t in lists if t is not None and t.numel()]
        if not present:
            continue
        top = max(float(t.max()) for t in present)
        for layer, index in chosen:
            if layer >= len(lists) or lists[layer] is None or index >= lists[layer].numel():
                raise ValueError(f"critical {kind} ({layer}, {index}) is outside the model being compressed "
                                 "(the feature map describes another architecture)")
            lists[layer][index] = top + 1.0 + float(lists[layer][index])
    return scores


def student_numbering(units: dict, widths: list) -> dict:
    """The kept critical units renumbered for the pruned tower: ``widths`` is the allocator's per-layer list
    (``{"layer", "dropped", "heads": [kept teacher head indices], "ffn"}``) and ``kept_neurons`` {layer: [kept
    teacher neuron indices]}; layers left with no unit are removed from the student, so layer numbers shift too.
    Returns ``{"head": [[l, i]], "neuron": [[l, i]], "lost": {"head": n, "neuron": n}}``."""
    out = {"head": [], "neuron": [], "lost": {"head": 0, "neuron": 0}}
    student_layer = 0
    for w in widths:
        if w["dropped"] or (not w["heads"] and not w["ffn"]):
            continue
        heads = {h: i for i, h in enumerate(w["heads"])}
        neurons = {n: i for i, n in enumerate(w.get("neurons", []))}
        for kind, position in (("head", heads), ("neuron", neurons)):
            for layer, index in sorted(units.get(kind) or ()):
                if layer == w["layer"] and index in position:
                    out[kind].append([student_layer, position[index]])
        student_layer += 1
    for kind in KINDS:
        out["lost"][kind] = len(units.get(kind) or ()) - len(out[kind])
    return out


def critical_importance(model, tower: int, units: dict) -> dict:
    """Preservation importance ``{parameter name: tensor}``: 1 on the rows/columns of ``units`` (the tower's own
    numbering, as `student_numbering` gives) and 0 elsewhere in those matrices; other parameters are left out."""
    importance = {}
    prefix = f"model.towers.{tower}.layers"
    params = dict(model.named_parameters())
    tower_module = model.model.towers[tower]
    for kind, layer, index in [("head", *u) for u in units.get("head", [])] + \
                              [("neuron", *u) for u in units.get("neuron", [])]:
        block = tower_module.layers[layer]
        if kind == "head":
            attn = block.self_attn
            d = attn.head_dim
            group = attn.num_heads // attn.num_kv_heads
            rows = {"q_proj": (index * d, (index + 1) * d), "k_proj": ((index // group) * d, (index // group + 1) * d),
                    "v_proj": ((index // group) * d, (index // group + 1) * d)}
            for name, (a, b) in rows.items():
                _mark(importance, params, f"{prefix}.{layer}.self_attn.{name}.weight", rows=(a, b))
            _mark(importance, params, f"{prefix}.{layer}.self_attn.o_proj.weight", cols=(index * d, (index + 1) * d))
        else:
            for name in ("gate_proj", "up_proj"):
                _mark(importance, params, f"{prefix}.{layer}.mlp.{name}.weight", rows=(index, index + 1))
            _mark(importance, params, f"{prefix}.{layer}.mlp.down_proj.weight", cols=(index, index + 1))
    return importance


def _mark(importance, params, name, rows=None, cols=None):
    p = params.get(name)
    if p is None:  # a layout without this projection (e.g. no gate): nothing to protect there
        return
    t = importance.setdefault(name, torch.zeros_like(p, dtype=torch.float32))
    if rows is not None:
        t[rows[0]:rows[1]] = 1.0
    if cols is not None:
        t[:, cols[0]:cols[1]] = 1.0
