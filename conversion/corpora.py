"""The bundled capability data: English prose, Python code, and seeded arithmetic exact-match items.

Prose and code are small slices shipped in ``conversion/data/`` (cut by ``bench/make_corpora.py`` from python3-doc
and the Python stdlib); the train and held-out halves come from disjoint source files. Arithmetic items are generated,
so any number of them can be made reproducibly from a seed.
"""

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPORA = ("prose", "code")


def corpus_path(name, split="heldout"):
    """Path of a bundled corpus: ``name`` in {prose, code}, ``split`` in {train, heldout}."""
    if name not in CORPORA:
        raise ValueError(f"unknown bundled corpus {name!r}; bundled: {', '.join(CORPORA)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    return DATA_DIR / f"{name}_{split}.txt"


def corpus_text(name, split="heldout"):
    return corpus_path(name, split).read_text(encoding="utf-8")


def arithmetic_items(n, seed=0, min_digits=3, max_digits=4):
    """``n`` addition/subtraction items ``{"prompt": "1234+567=", "answer": "1801"}``, reproducible from ``seed``."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a_digits = rng.randint(min_digits, max_digits)  # draw the digit count once: two draws could give (1000, 1000)
        a = rng.randrange(10 ** (a_digits - 1), 10 ** a_digits)
        b = rng.randrange(10 ** (min_digits - 1), 10 ** rng.randint(min_digits, max_digits))
        if rng.random() < 0.5:
            items.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
        else:
            a, b = max(a, b), min(a, b)
            items.append({"prompt": f"{a}-{b}=", "answer": str(a - b)})
    return items


def write_arithmetic_jsonl(path, n, seed=0):
    """Write ``n`` arithmetic items as JSONL (one ``{"prompt", "answer"}`` per line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in arithmetic_items(n, seed)))
    return path
