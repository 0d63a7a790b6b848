"""The capability specs a student serves, recorded in its folder (``nexus_capabilities.json``).

``add-teacher`` scores the existing student on its old capabilities, so it needs their probes and data. A student
written by ``add-teacher`` or ``remove-capability`` records them here (the recipe's capability entries, data paths
absolute, plus each one's distillation training source), so a later ``add-teacher`` needs no recipe; a student made
by ``consolidate`` has none, and the fragment names its recipe instead (``student_recipe``).

    {"schema": "nexus.capabilities/1", "capabilities": [{"name": "prose", "probe": "lm", "data": "...", ...}],
     "train_data": {"prose": "..."}, "profile": {...profile stage options...}, "validate": {...}}
"""

import json
from pathlib import Path

CAPABILITIES_FILE = "nexus_capabilities.json"
SCHEMA = "nexus.capabilities/1"


def read_student_capabilities(folder) -> dict | None:
    """The record in ``folder``, or None when there is none."""
    path = Path(folder) / CAPABILITIES_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema is not {SCHEMA!r}")
    return record


def write_student_capabilities(folder, record: dict) -> Path:
    path = Path(folder) / CAPABILITIES_FILE
    path.write_text(json.dumps({"schema": SCHEMA, **record}, indent=1, default=str) + "\n")
    return path


def capability_record(recipe, names) -> dict:
    """The record of ``recipe``'s capabilities in ``names`` (recipe order), with their training sources and the
    profile / validate options that chose their probe items."""
    train = dict(getattr(recipe.stages.get("distill"), "train_data", {}) or {})
    caps = [c.model_dump(mode="json") for c in recipe.capabilities if c.name in names]
    return {"capabilities": caps, "train_data": {c["name"]: train[c["name"]] for c in caps if c["name"] in train},
            "profile": recipe.stage("profile").model_dump(mode="json"),
            "validate": recipe.stage("validate").model_dump(mode="json")}
