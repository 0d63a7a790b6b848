"""Random unit sets of the same composition as a selection: the control every localisation claim is measured against.

``global``: as many units of each kind (neurons, heads) drawn uniformly from the whole model. ``layer_matched``: as many
of each kind drawn from each layer the selection touches, a stricter control that removes the "some layers matter
more" explanation and leaves only "these units within the layer".
"""

FINE_KINDS = ("neuron", "head")
CONTROLS = ("global", "layer_matched")


def random_selection(units, selection, rng, layer_matched=False):
    """A random ``{kind: [unit ids]}`` with the composition of ``selection`` (see the module docstring)."""
    out = {}
    for kind in FINE_KINDS:
        members = [tuple(u) for u in selection.get(kind, [])]
        if not members:
            out[kind] = []
            continue
        if layer_matched:
            picked = []
            for layer in sorted({u[0] for u in members}):
                pool = units.units(kind, [layer])
                n = sum(1 for u in members if u[0] == layer)
                picked += [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
            out[kind] = picked
        else:
            pool = units.units(kind)
            out[kind] = [pool[i] for i in rng.choice(len(pool), size=len(members), replace=False)]
    return out
