"""What every probe is: data in, per-item scores and a summary with a bootstrap 95% CI out.

Lifecycle: ``probe = Cls(data, options, settings)`` -> ``probe.load()`` reads and validates the data (before any
teacher loads, so bad data fails fast) -> ``probe.cannot_score(tokenizer, config)`` says why a teacher cannot be
scored (None when it can) -> ``probe.score(model, tokenizer)`` -> `ProbeResult`. ``probe.baseline()`` scores a
trivial model on the same items, so a teacher's competence is visible.

A summary is ``{"metric", "score", "ci": [lo, hi], "n", "higher_is_better", ...extras}``.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..bootstrap import bootstrap_ci
from .compute_mode import compute_context


class NoOptions(BaseModel):
    """This probe takes no options."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ProbeSettings:
    """Run-wide settings every probe shares (from the recipe's ``stages.profile``)."""

    max_items: int = 200
    n_bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 8
    window_tokens: int = 256
    compute: str = "auto"  # see compute_mode: auto | bf16 | fp32 | native
    autocast: bool | None = None  # older spelling: True means compute="bf16", False means compute="native"

    def __post_init__(self):
        if self.autocast is not None:
            object.__setattr__(self, "compute", "bf16" if self.autocast else "native")


@dataclass
class ProbeResult:
    items: list  # one entry per item (a float, or a dict of the numbers the summary is built from)
    summary: dict = field(default_factory=dict)


def summary(metric, score, ci, n, higher_is_better, **extras):
    score, lo, hi = float(score), float(ci[0]), float(ci[1])
    slack = 1e-9 * max(1.0, abs(score))  # summing resampled items in another order moves the last bits
    lo = score if score < lo <= score + slack else lo
    hi = score if score - slack <= hi < score else hi
    return {"metric": metric, "score": score, "ci": [lo, hi], "n": int(n),
            "higher_is_better": bool(higher_is_better), **extras}


def mean_summary(metric, values, settings, higher_is_better=True, **extras):
    """Summary of per-item 0/1 (or real) scores: their mean and its bootstrap CI."""
    values = np.asarray(values, dtype=np.float64)
    ci = bootstrap_ci(values, n=settings.n_bootstrap, seed=settings.seed)
    return summary(metric, values.mean(), ci, len(values), higher_is_better, **extras)


def select_items(count, max_items, seed):
    """Indices of at most ``max_items`` of ``count`` items: a seeded random subset, kept in data order."""
    if count <= max_items:
        return list(range(count))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(count, size=max_items, replace=False).tolist())


def model_max_positions(config):
    """The longest sequence the model's position encoding is built for (None when the config does not say)."""
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def inference_context(model, settings):
    """Inference mode plus the settings' compute mode (bf16 autocast, or fp32 matmuls over bf16 weights)."""
    return compute_context(model, settings.compute)


class Probe:
    """Base class. Subclasses set the class attributes and implement `_load`, `score` and `baseline`."""

    name: ClassVar[str] = ""  # set by register_probe
    data_kind: ClassVar[str] = "jsonl"  # "text", "jsonl" or "lm_eval_task": which bundled sources fit
    metric: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, data, options=None, settings=None):
        self.data = str(data)
        if options is None:
            options = self.Options()
        elif isinstance(options, dict):
            options = self.Options(**options)
        self.options = options
        self.settings = settings or ProbeSettings()
        self.label = self.data
        self._loaded = False

    def load(self):
        """Read and validate the data once; errors name the file and line."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def _load(self):
        raise NotImplementedError

    def __len__(self):
        """The number of items that will be scored (after `load`)."""
        raise NotImplementedError

    def cannot_score(self, tokenizer, config):
        """Why a teacher with this tokenizer/config cannot be scored (a sentence), or None when it can."""
        return

    def roundtrip_texts(self) -> list:
        """The texts of the items to score (after `load`), for the teacher tokenizers' round-trip check."""
        return []

    def unk_tolerance(self) -> float:
        """The fraction of a teacher's tokens on this data that may be the unk token (0: none)."""
        return 0.0

    def baseline(self):
        """A trivial model's summary on the same items."""
        raise NotImplementedError

    def score(self, model, tokenizer, advance=None):
        """Score ``model``; call ``advance(k)`` after every k items (for a progress bar)."""
        raise NotImplementedError

    def _require_loaded(self):
        if not self._loaded:
            raise RuntimeError(f"probe {self.name!r}: call load() before scoring")
