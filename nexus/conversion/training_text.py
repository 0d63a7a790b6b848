"""The text a capability is *trained* on (student construction and distillation), never the held-out text it is scored on.

A capability's ``data`` in the recipe is what validation scores; training needs another source, resolved here:

- ``bundled:prose`` / ``bundled:code`` -> the bundled train split (``corpus_text(name, "train")``), cut into chunks;
- ``bundled:arithmetic`` / ``bundled:reversal`` -> generated items ``prompt + answer`` from seeds
  `ARITHMETIC_TRAIN_SEED`, ... (never the probe's held-out seed); any item whose prompt is also a held-out prompt is
  dropped;
- anything else needs an explicit training source (``stages.distill.train_data.CAP``): a UTF-8 text file (cut into
  chunks), a JSONL file of ``{"prompt", "answer"}`` items (one chunk per item), or a bundled source.

A chunk is one training window's text. Text is cut at line ends into chunks of about ``chunk_chars`` characters (a
single longer line is cut where it is), so a chunk's tokens fit a teacher's context.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .corpora import GENERATED_ITEMS, corpus_text
from .probes.data_source import ARITHMETIC_HELDOUT_SEED, ARITHMETIC_ITEMS, is_bundled, parse_bundled

ARITHMETIC_TRAIN_SEED = 700_000  # far from the probe's held-out seed and from the specialists' seeds
ITEMS_PER_SEED = 10_000


class TrainingTextError(ValueError):
    pass


@dataclass
class TrainingText:
    """A capability's training chunks; ``kind`` is "text" or "items" (then ``prompts`` holds each item's prompt)."""

    capability: str
    chunks: list
    kind: str
    source: str
    prompts: list | None = None


def text_chunks(text, chunk_chars):
    """``text`` cut at line ends into chunks of about ``chunk_chars`` characters (no chunk is empty)."""
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:  # an over-long line is cut where it is
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if current and len(current) + len(line) > chunk_chars:
            chunks.append(current)
            current = ""
        current += line
    if current.strip():
        chunks.append(current)
    return [c for c in chunks if c.strip()]


def arithmetic_training_items(n, name="arithmetic"):
    """``n`` generated items of ``name`` (arithmetic, reversal) from the training seeds, none sharing a prompt with the
    held-out items."""
    generate = GENERATED_ITEMS[name]
    held_out = {i["prompt"] for i in generate(ARITHMETIC_ITEMS, ARITHMETIC_HELDOUT_SEED)}
    items, seed = [], ARITHMETIC_TRAIN_SEED
    while len(items) < n:
        items += [i for i in generate(min(ITEMS_PER_SEED, n - len(items)), seed) if i["prompt"] not in held_out]
        seed += 1
    return items[:n]


def _items_text(capability, items, source):
    return TrainingText(capability, [i["prompt"] + i["answer"] for i in items], "items", source,
                        prompts=[i["prompt"] for i in items])


def training_text(capability, data, train_data=None, chunk_chars=400, max_chunks=None, items=2000):
    """The `TrainingText` of ``capability`` (its recipe ``data``; ``train_data`` overrides the source).

    ``max_chunks`` keeps the first chunks only; ``items`` is how many arithmetic items to generate.
    """
    source = train_data or data
    where = f"stages.distill.train_data.{capability}"
    if is_bundled(source):
        name, _ = parse_bundled(source)
        if name in GENERATED_ITEMS:
            result = _items_text(capability, arithmetic_training_items(items, name),
                                 f"bundled:{name} (seeds from {ARITHMETIC_TRAIN_SEED})")
        else:
            result = TrainingText(capability, text_chunks(corpus_text(name, "train"), chunk_chars), "text",
                                  f"bundled:{name}:train")
    elif train_data is None:
        raise TrainingTextError(f"capability {capability!r}: its data {data} is what it is scored on; give a separate "
                                f"training source in {where} (a text file, a JSONL of prompt/answer items, or "
                                "bundled:prose|code|arithmetic|reversal)")
    else:
        path = Path(source)
        if not path.is_file():
            raise TrainingTextError(f"{where}: training file {path} does not exist")
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            records = []
            for n, line in enumerate(raw.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainingTextError(f"{where}: {path} line {n}: not valid JSON ({exc.msg})") from None
                if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or "answer" not in r:
                    raise TrainingTextError(f"{where}: {path} line {n}: expected {{'prompt': str, 'answer': ...}}")
                records.append({"prompt": r["prompt"], "answer": str(r["answer"])})
            result = _items_text(capability, records, str(path))
        else:
            result = TrainingText(capability, text_chunks(raw, chunk_chars), "text", str(path))
    if not result.chunks:
        raise TrainingTextError(f"{where}: the training source {result.source} of {capability!r} is empty")
    if max_chunks is not None:
        result.chunks = result.chunks[:max_chunks]
        if result.prompts is not None:
            result.prompts = result.prompts[:max_chunks]
    return result


def training_texts_digest(texts) -> str:
    """sha256 of ``{capability: TrainingText}`` in order: every chunk and prompt a stage trains on.

    Stages key their caches by the content, not the path: a training file edited in place invalidates them, a file
    moved with the same content does not.
    """
    digest = hashlib.sha256()
    for cap, t in texts.items():
        digest.update(json.dumps([cap, t.kind, t.chunks, t.prompts]).encode())
    return digest.hexdigest()
