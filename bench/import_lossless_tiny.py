"""Max |logit difference| between tiny random teachers of every supported family and their Nexus import (fp32).

    python bench/import_lossless_tiny.py

The same teachers the tests build (tests/conftest.py::tiny_teacher); the tests assert <= 1e-4, this prints the figure.
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "tests"))
from conftest import tiny_teacher, FAMILIES
from nexus.conversion.teacher_import import nexus_from_teacher
for fam in FAMILIES:
    t = tiny_teacher(fam); n = nexus_from_teacher(t)
    ids = torch.randint(4, 97, (2, 24), generator=torch.Generator().manual_seed(0)); m = torch.ones_like(ids); m[1, :5] = 0
    with torch.no_grad():
        a = (t(ids).logits - n(ids).logits).abs().max().item()
        b = (t(ids, attention_mask=m).logits - n(ids, attention_mask=m).logits)[m.bool()].abs().max().item()
    print(f"{fam:7s} max|dlogit| no-pad {a:.2e}  left-padded {b:.2e}")
