"""Where a capability's data comes from: a file, or a bundled source (``bundled:prose``, ``bundled:code``,
``bundled:arithmetic``, ``bundled:reversal``), read with errors that name the file and the line.

``bundled:prose`` / ``bundled:code`` are the held-out slices shipped in ``nexus/conversion/data/`` (``bundled:prose:train``
names the training slice). ``bundled:arithmetic`` is generated exact-match items from a fixed held-out seed that
differs from any seed the specialists train on, so a specialist is never scored on its own training items;
``bundled:reversal`` (digit strings written backwards) is generated the same way, from the same seed.
"""

import json
from pathlib import Path

from ..corpora import CORPORA, GENERATED_ITEMS, corpus_path

BUNDLED_PREFIX = "bundled:"
BUNDLED_KINDS = {"prose": "text", "code": "text", **{name: "jsonl" for name in GENERATED_ITEMS}}
ARITHMETIC_HELDOUT_SEED = 90_210  # the held-out seed and item count of every generated set (arithmetic, reversal)
ARITHMETIC_ITEMS = 1000


class ProbeDataError(ValueError):
    """A capability's data is missing, empty or malformed; the message names the file (and line)."""


def is_bundled(data):
    return isinstance(data, str) and data.startswith(BUNDLED_PREFIX)


def parse_bundled(data):
    """``"bundled:prose:train"`` -> ``("prose", "train")``; the error lists the bundled sources."""
    parts = data[len(BUNDLED_PREFIX):].split(":")
    name, split = parts[0], (parts[1] if len(parts) > 1 else "heldout")
    if name not in BUNDLED_KINDS or len(parts) > 2 or split not in ("train", "heldout"):
        choices = ", ".join(f"bundled:{n}" for n in BUNDLED_KINDS)
        raise ProbeDataError(f"unknown bundled data {data!r}; bundled sources: {choices} (text ones take :train)")
    if name not in CORPORA and len(parts) > 1:
        raise ProbeDataError(f"bundled data {data!r}: generated items have no train/heldout split")
    return name, split


def data_kind(data):
    """``"text"`` or ``"jsonl"`` for a bundled source, else None (a file: its probe decides)."""
    return BUNDLED_KINDS[parse_bundled(data)[0]] if is_bundled(data) else None


def _existing_file(data):
    path = Path(data)
    if not path.exists():
        raise ProbeDataError(f"data file {path} does not exist")
    if not path.is_file():
        raise ProbeDataError(f"data path {path} is not a file")
    return path


def read_text(data):
    """(text, label) of a text source; an empty or non-UTF-8 file is an error naming it."""
    if is_bundled(data):
        name, split = parse_bundled(data)
        if BUNDLED_KINDS[name] != "text":
            raise ProbeDataError(f"{data} holds prompt/answer items, not text")
        path = corpus_path(name, split)
    else:
        path = _existing_file(data)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProbeDataError(f"data file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if not text.strip():
        raise ProbeDataError(f"data file {path} is empty")
    return text, str(path)


def read_jsonl(data):
    """(records, label): ``records`` is a list of ``(line_number, dict)``; bad lines are errors naming file:line."""
    if is_bundled(data):
        name, _ = parse_bundled(data)
        if BUNDLED_KINDS[name] != "jsonl":
            raise ProbeDataError(f"{data} is plain text, not JSONL items")
        items = GENERATED_ITEMS[name](ARITHMETIC_ITEMS, seed=ARITHMETIC_HELDOUT_SEED)
        return list(enumerate(items, start=1)), data
    path = _existing_file(data)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ProbeDataError(f"data file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProbeDataError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise ProbeDataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise ProbeDataError(f"data file {path} is empty (no JSONL records)")
    return records, str(path)


def require_string(record, key, label, number, allow_empty=False):
    """``record[key]`` as a string, or an error naming the file, line and key."""
    if key not in record:
        raise ProbeDataError(f"{label} line {number}: missing {key!r} (each line needs {key!r})")
    value = record[key]
    if not isinstance(value, str):
        raise ProbeDataError(f"{label} line {number}: {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ProbeDataError(f"{label} line {number}: {key!r} is empty")
    return value
