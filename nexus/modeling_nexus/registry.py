"""Explicit registries for the pluggable parts of a Nexus model.

A Nexus checkpoint stores the *names* of its parts (``"decoder"``, ``"pooled_linear"``) in its JSON config; this
registry resolves a name to the class that builds it. Adding a tower type means registering one class:

    @register("tower", "decoder")
    class NexusDecoderTower(nn.Module): ...

Names are unique per kind; registering a second class under a taken name is an error, never a silent override.
"""

KINDS = ("tower", "router", "encoder", "vocoder")

_REGISTRY = {kind: {} for kind in KINDS}


def register(kind, name):
    """Class decorator that adds ``cls`` to the registry of ``kind`` under ``name``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; known kinds: {', '.join(KINDS)}")

    def decorator(cls):
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} type {name!r} is already registered to {existing.__qualname__}")
        _REGISTRY[kind][name] = cls
        cls.registered_name = name
        return cls

    return decorator


def resolve(kind, name, where="config"):
    """Return the class registered as ``name`` for ``kind``; the error names the config path and the known types."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; known kinds: {', '.join(KINDS)}")
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY[kind])) or "none registered"
        raise ValueError(f"{where}: unknown {kind} type {name!r}; registered {kind} types: {known}") from None


def registered(kind):
    """Names registered for ``kind``, sorted."""
    return sorted(_REGISTRY[kind])
