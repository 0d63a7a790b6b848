"""The bundled capability data: English prose, Python code, and seeded exact-match items (arithmetic, reversal).

Prose and code are small slices shipped in ``nexus/conversion/data/`` (cut by ``bench/make_corpora.py`` from python3-doc
and the Python stdlib); the train and held-out halves come from disjoint source files. Arithmetic and reversal items
are generated (`GENERATED_ITEMS`), so any number of them can be made reproducibly from a seed.
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


def _little_endian(value, digits):
    """``value`` zero-padded to ``digits`` digits, least-significant digit first: 567 -> ``"7650"``."""
    return f"{value:0{digits}d}"[::-1]


def arithmetic_items(n, seed=0, min_digits=3, max_digits=4):
    """``n`` addition/subtraction items of 3-4-digit numbers, reproducible from ``seed``, written little-endian.

    Every number is written least-significant digit first and zero-padded: operands to ``max_digits`` digits, the
    answer to ``max_digits + 1``. So 1234 + 567 = 1801 is ``{"prompt": "4321+7650=", "answer": "10810"}``, and
    subtraction is always larger minus smaller. Why this layout: in it, digits of equal significance sit at fixed
    offsets and the answer is produced in the order carries propagate. Measured here, a 0.9M-parameter
    Llama (6 layers, width 96, AdamW with weight decay on every parameter, lr 2e-3, 64 items per step) reached 100%
    digit accuracy in about 1,500 steps in this layout, and was still at 0% exact match after 4,000 steps with
    numbers written the usual way. `arithmetic_value` reads a number back.
    """
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a_digits = rng.randint(min_digits, max_digits)  # draw the digit count once: two draws could give (1000, 1000)
        a = rng.randrange(10 ** (a_digits - 1), 10 ** a_digits)
        b = rng.randrange(10 ** (min_digits - 1), 10 ** rng.randint(min_digits, max_digits))
        if rng.random() < 0.5:
            op, result = "+", a + b
        else:
            a, b = max(a, b), min(a, b)
            op, result = "-", a - b
        items.append({"prompt": f"{_little_endian(a, max_digits)}{op}{_little_endian(b, max_digits)}=",
                      "answer": _little_endian(result, max_digits + 1)})
    return items


def arithmetic_value(text):
    """The integer a little-endian number string stands for: ``"10810"`` -> 1801."""
    return int(text[::-1])


def arithmetic_check(item):
    """True when ``item``'s answer is the sum or difference its prompt asks for (both read little-endian)."""
    left, right = item["prompt"].rstrip("=").replace("-", "+").split("+")
    a, b = arithmetic_value(left), arithmetic_value(right)
    expected = a + b if "+" in item["prompt"] else a - b
    return arithmetic_value(item["answer"]) == expected


def reversal_items(n, seed=0, min_digits=5, max_digits=8):
    """``n`` string-reversal items over digit strings of 5-8 digits, reproducible from ``seed``.

    ``{"prompt": "~48213=", "answer": "31284"}``: the string between ``~`` and ``=`` written backwards. Digits and
    the two markers because Gemma's tokenizer splits every digit into its own token, as a character tokenizer does,
    so a character-level teacher's tower reads the student's tokens one to one (`tower_vocabulary`).
    """
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        text = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits)))
        items.append({"prompt": f"~{text}=", "answer": text[::-1]})
    return items


# name -> items(n, seed): the bundled exact-match item sets (``bundled:NAME``), generated rather than shipped
GENERATED_ITEMS = {"arithmetic": arithmetic_items, "reversal": reversal_items}


def write_items_jsonl(path, n, seed=0, name="arithmetic"):
    """Write ``n`` generated items of ``name`` as JSONL (one ``{"prompt", "answer"}`` per line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in GENERATED_ITEMS[name](n, seed)))
    return path


def write_arithmetic_jsonl(path, n, seed=0):
    """Write ``n`` arithmetic items as JSONL (one ``{"prompt", "answer"}`` per line); returns the path."""
    return write_items_jsonl(path, n, seed, "arithmetic")
