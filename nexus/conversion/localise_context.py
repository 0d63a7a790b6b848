"""What the four localisation sub-stages share for one resident teacher: the model, its units, every capability's
items, the unablated scores, the unit means, and how a per-item drop is normalised.

`TeacherLocalisation.evaluate(selection)` is the one primitive the perturbation and causal stages need: ablate a unit
set, run every item once (all capabilities share the forward, so one ablation serves every capability and its
reference set), return the per-item scores.

Normalisation: a drop on an item of capability ``c`` is divided by ``c``'s margin over chance (so 1.0 = the whole
above-chance score is gone). Reference items of a capability the teacher does not have are divided by the margin of
the capability being localised instead. Margins are floored at ``min_margin`` so a barely-present reference cannot
blow up its drops.
"""

import contextlib

import numpy as np

from .ablation import MeanRecorder, ablate
from .drop_statistics import presence
from .layer_replay import LayerReplay
from .localise_items import run_rows


class TeacherLocalisation:
    def __init__(self, model, units, items, options, progress=None):
        self.model = model
        self.units = units
        self.items = items
        self.options = options
        self.progress = progress  # callable(k) advancing a progress bar by k rows, or None
        self.means = None
        self.base = None
        self.base_rows = None
        self.presence = {}
        self.references = {}  # capability -> reference capability names
        self.forwards = 0
        self.replay = LayerReplay(units)

    # ------------------------------------------------------------------------------------------- passes
    def run_base(self):
        """The unablated pass: per-item scores, every layer's output (for `LayerReplay`) and, in mean mode, every
        cut point's mean over all items' tokens."""
        recorder = MeanRecorder(self.units) if self.options.ablation == "mean" else None

        def before_batch(batch, mask):
            self.replay.before_batch(batch, mask)
            if recorder is not None:
                recorder.count(mask)

        with self.replay.recording(), (recorder or contextlib.nullcontext()):
            rows = self._run(before_batch=before_batch)
        if recorder is not None:
            self.means = recorder.means()
        self.base_rows = rows
        self.base = self.items.item_scores(*rows, score=self.options.score)
        return self.base

    def _run(self, **kwargs):
        self.forwards += 1
        return run_rows(self.model, self.items, self.units.forward_kwargs, self.options.autocast,
                        progress=self.progress, **kwargs)

    def evaluate(self, selection):
        """Per-item scores with every unit of ``selection`` (``{kind: [unit ids]}``) ablated; the layers before the
        first ablated one are replayed from the unablated pass, not recomputed."""
        first = min((u[0] for members in selection.values() for u in members), default=0)
        with ablate(self.units, selection, self.options.ablation, self.means), self.replay.replaying(first):
            rows = self._run(before_batch=self.replay.before_batch)
        return self.items.item_scores(*rows, score=self.options.score)

    # ------------------------------------------------------------------------------------------- capabilities
    def chance(self):
        return self.items.chance(self.options.score)

    def measure_presence(self, name):
        cap = self.items.capabilities[name]
        result = presence(self.base[cap.items], self.chance()[cap.items], self.options.n_bootstrap,
                          self.options.seed)
        result["n"] = len(cap.items)
        self.presence[name] = result
        return result

    def margin(self, name):
        return max(self.presence[name]["margin"], self.options.min_margin)

    def cap_items(self, name):
        return self.items.capabilities[name].items

    def ref_items(self, name):
        refs = self.references[name]
        return np.concatenate([self.items.capabilities[r].items for r in refs]) if refs else np.zeros(0, int)

    def normaliser(self, name):
        """Per item (all items), the divisor that turns a drop into a fraction of a margin, for localising ``name``."""
        out = np.full(self.items.n_items, self.margin(name))
        for other, cap in self.items.capabilities.items():
            if other != name and self.presence.get(other, {}).get("present"):
                out[cap.items] = self.margin(other)
        return out
