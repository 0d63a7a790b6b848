"""The probe registry: probe name (as written in a recipe's ``capabilities[i].probe``) -> probe class.

Probes register themselves when `nexus.conversion.probes` imports their modules (an explicit list in its
``__init__``, so an import error surfaces instead of a probe silently missing).
"""

PROBES: dict[str, type] = {}


def register_probe(name, cls):
    """Add ``cls`` under ``name``; a name that is already taken is an error, never a silent override."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"probe name must be a non-empty string, got {name!r}")
    if name in PROBES:
        raise ValueError(f"probe {name!r} is already registered (by {PROBES[name].__qualname__})")
    cls.name = name
    PROBES[name] = cls
    return cls


def probe_class(name):
    """The probe class registered as ``name``; the error lists the registered probes."""
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}; registered probes: {', '.join(sorted(PROBES))}")
    return PROBES[name]
