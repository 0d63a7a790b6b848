"""YAML read strictly: a duplicate key is an error (PyYAML keeps the last one silently), and so is a non-finite
number (``.inf``, ``.nan``), which JSON outputs cannot hold.

    load_strict_yaml("a: 1\\na: 2\\n")        # StrictYAMLError: duplicate key 'a' (line 2, column 1; first on line 1)
    nonfinite_paths({"w": float("inf")})     # ["w"]
"""

import math

import yaml


class StrictYAMLError(ValueError):
    """A YAML document with a duplicate key; the message names the key and both lines."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue  # the base constructor reports an unhashable key itself
                if key in seen:
                    mark = key_node.start_mark
                    raise StrictYAMLError(f"duplicate key {key!r} (line {mark.line + 1}, column {mark.column + 1}; "
                                          f"first on line {seen[key] + 1}); keep only one")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_strict_yaml(text):
    """``yaml.safe_load(text)``, but a duplicate key in any mapping raises `StrictYAMLError`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def nonfinite_paths(obj, path="") -> list[str]:
    """Field paths (``capabilities[0].weight``) of every NaN or infinite float in a parsed document."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return [path or "(top level)"]
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += nonfinite_paths(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found += nonfinite_paths(value, f"{path}[{i}]")
    return found
