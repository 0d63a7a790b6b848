"""Regenerate nexus/conversion/data/{prose,code}_{train,heldout}.txt from python3-doc and the Python stdlib.

    apt-get install -y python3-doc && python bench/make_corpora.py

The repository ships the output; this script only documents where it came from and makes it reproducible.
"""

import re
import sysconfig
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
OUT = Path(__file__).resolve().parent.parent / "nexus" / "conversion" / "data"
TRAIN_BYTES, HELDOUT_BYTES = 300_000, 40_000


def prose_paragraphs(path):
    """Paragraphs of English from a .rst source: drop directives, code blocks, tables and markup."""
    text = path.read_text(encoding="utf-8", errors="ignore")
    paras = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(l.startswith((" ", "\t", "..", "=", "-", "*", "+", "|", ">>>")) for l in lines):
            continue
        para = " ".join(l.strip() for l in lines)
        para = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", para)  # :role:`text <target>` -> text
        para = re.sub(r"`+([^`]*)`+_?", r"\1", para).replace("**", "").replace("\\", "")
        if len(para) > 80 and para.count(" ") > 12 and para.isascii():
            paras.append(para)
    return paras


def code_chunks(path):
    text = path.read_text(encoding="utf-8", errors="ignore")
    if not text.isascii():
        return []
    return [c.strip("\n") + "\n" for c in re.split(r"\n(?=def |class )", text) if 200 < len(c) < 4000]


def take(items, budget):
    out, size = [], 0
    for item in items:
        if size >= budget:
            break
        out.append(item)
        size += len(item) + 1
    return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    docs = sorted(p for p in DOCS.rglob("*.rst.txt") if "whatsnew" not in p.parts and "c-api" not in p.parts)
    heldout_docs = [p for i, p in enumerate(docs) if i % 7 == 3]
    train_docs = [p for i, p in enumerate(docs) if i % 7 != 3]
    (OUT / "prose_train.txt").write_text("\n".join(take((q for p in train_docs for q in prose_paragraphs(p)), TRAIN_BYTES)) + "\n")
    (OUT / "prose_heldout.txt").write_text("\n".join(take((q for p in heldout_docs for q in prose_paragraphs(p)), HELDOUT_BYTES)) + "\n")
    mods = sorted(p for p in STDLIB.glob("*.py") if not p.name.startswith(("test", "_")))
    heldout_mods = [p for i, p in enumerate(mods) if i % 7 == 3]
    train_mods = [p for i, p in enumerate(mods) if i % 7 != 3]
    (OUT / "code_train.txt").write_text("\n".join(take((c for p in train_mods for c in code_chunks(p)), TRAIN_BYTES)))
    (OUT / "code_heldout.txt").write_text("\n".join(take((c for p in heldout_mods for c in code_chunks(p)), HELDOUT_BYTES)))
    for p in sorted(OUT.glob("*.txt")):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
