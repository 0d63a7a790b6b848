"""What consolidation costs outside the capability corpora: a student and a teacher scored on general text that no
training source holds (by default Debian's license texts, /usr/share/common-licenses), paired item by item.

    python bench/heldout_text.py --student bench/out/runs/gemma_own_vocab/export \
        --teacher /work/cache/gguf/gemma-3-270m-q4_k_m-ac0f3f44807c682d --out bench/results/heldout_text.json

The `lm` probe cuts the text into chunks (items) of at most 1000 characters; both models score the same items in
bits per byte (comparable across tokenizers); retention = teacher bpb / student bpb with a paired bootstrap 95% CI.
The student runs as deployed: its router picks the tower of every chunk (the routed towers are counted).
Prints a line and writes JSON (atomically).
"""

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402
from nexus.conversion.probes.base import ProbeSettings  # noqa: E402
from nexus.conversion.probes.lm import LMProbe  # noqa: E402
from nexus.conversion.retention import (  # noqa: E402
    item_rows,
    percentile_ci,
    resample_indices,
    retention_samples,
    retention_value,
)
from nexus.conversion.teacher_source import load_teacher  # noqa: E402

DEFAULT_TEXT = "/usr/share/common-licenses"


def license_text(folder, max_chars):
    """The text files of ``folder`` (sorted, symlinks to files followed once), joined, at most ``max_chars``."""
    parts, seen = [], set()
    for path in sorted(Path(folder).iterdir()):
        real = path.resolve()
        if not real.is_file() or real in seen:
            continue
        seen.add(real)
        try:
            parts.append(real.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    if not parts:
        raise SystemExit(f"error: no UTF-8 text files under {folder}")
    return "\n".join(parts)[:max_chars]


def routed_towers(model, tokenizer, chunks):
    if getattr(model.model, "router", None) is None:
        return None
    names = [t.name for t in model.model.towers]
    counts = Counter()
    with torch.no_grad():
        for chunk in chunks:
            ids = tokenizer(chunk, return_tensors="pt").input_ids[:, :256]
            counts[names[int(model.model.router(model.model.embed_tokens(ids)).argmax(-1))]] += 1
    return dict(counts)


def general_text_retention(student, teacher, text=DEFAULT_TEXT, max_items=120, max_chars=400_000, window=256,
                           scratch=None):
    """Score ``teacher`` and ``student`` on the same general-text items; returns the record (see the module doc)."""
    text_path = Path(text)
    tmp = None
    if text_path.is_dir():
        tmp = Path(scratch or RESULTS) / ".heldout_text.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(license_text(text_path, max_chars))
    settings = ProbeSettings(max_items=max_items, window_tokens=window, compute="auto")
    try:
        probe = LMProbe(tmp or text_path, settings=settings).load()
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    results, seconds = {}, {}
    for role, source in (("teacher", teacher), ("student", student)):
        start = time.perf_counter()
        model, tok = load_teacher(source, dtype=torch.float32, trust_remote_code=role == "student")
        model.eval()
        results[role] = probe.score(model, tok)
        if role == "student":
            results["routed"] = routed_towers(model, tok, probe.chunks)
        seconds[role] = round(time.perf_counter() - start, 1)
        del model
    rows = {r: item_rows("lm", results[r].items, "bpb") for r in ("teacher", "student")}
    value = retention_value(rows["student"], rows["teacher"], lower_is_better=True)
    idx = resample_indices(len(probe.chunks), 1000, 0)
    ci = percentile_ci(retention_samples(rows["student"], rows["teacher"], True, idx))
    return {
        "text": str(text), "items": len(probe.chunks), "bytes": int(sum(probe.chunk_bytes)),
        "teacher": str(teacher), "student": str(student),
        "teacher_bpb": results["teacher"].summary["bpb"], "student_bpb": results["student"].summary["bpb"],
        "retention": value, "retention_ci": ci, "routed": results["routed"], "seconds": seconds,
        "tokens": {"teacher": results["teacher"].summary["tokens"], "student": results["student"].summary["tokens"]},
        "per_item_bpb_ratio_median": float(np.median(rows["teacher"][:, 0] / rows["student"][:, 0])),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="an exported Nexus student folder")
    parser.add_argument("--teacher", required=True, help="the teacher to compare with (an HF folder or a .gguf)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="a text file or a folder of text files")
    parser.add_argument("--max-items", type=int, default=120)
    parser.add_argument("--max-chars", type=int, default=400_000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "heldout_text.json"))
    args = parser.parse_args()
    out = general_text_retention(args.student, args.teacher, args.text, args.max_items, args.max_chars, args.window,
                                 scratch=Path(args.out).parent)
    with atomic_file(Path(args.out)) as f:
        f.write_text(json.dumps(out, indent=1))
    value, ci = out["retention"], out["retention_ci"]
    print(f"general text ({out['items']} items, {out['bytes']:,} bytes): teacher {out['teacher_bpb']:.4f} bpb, "
          f"student {out['student_bpb']:.4f} bpb, retention {value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]; "
          f"tokens student/teacher {out['tokens']['student'] / out['tokens']['teacher']:.3f}; routed "
          f"{out['routed']}; wrote {args.out}")


if __name__ == "__main__":
    main()
