"""JSON has no NaN or infinity: `json_finite` turns them into ``null`` throughout a nested dict/list."""

import math


def json_finite(obj):
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, recursing into dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_finite(v) for v in obj]
    return obj
