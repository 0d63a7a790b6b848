"""Capability probes. Importing this package registers every built-in probe (an explicit list, no discovery).

A probe scores one model on one capability's data: ``probe_class(name)(data, options, settings)``, then
``.load()``, ``.cannot_score(tokenizer, config)``, ``.score(model, tokenizer)`` and ``.baseline()``.
"""

from . import exact_match, lm, lm_eval_task, multiple_choice  # noqa: F401  (each registers itself)
from .base import ProbeResult, ProbeSettings
from .data_source import ProbeDataError
from .registry import PROBES, probe_class, register_probe

__all__ = ["PROBES", "ProbeDataError", "ProbeResult", "ProbeSettings", "probe_class", "register_probe"]
