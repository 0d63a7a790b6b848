"""The next lever for general text at the 0.5 point (issue 16), measured before it is built: keep the base teacher's
WHOLE vocabulary, with the rows the trimmed student keeps stored exactly and every other row ("the tail") as a rank-r
factor A·B (SVD of the tail rows), instead of dropping the tail and splitting unseen words into smaller pieces.

    python bench/tail_rank.py --teacher /work/cache/gguf/gemma-3-270m-q4_k_m-b5faddd9b22b714a \
        --student bench/out/size-sweep-runs/0.5-long/compare/variants/nexus/distill/student

The teacher (tied embedding and LM head) is scored on the held-out general text of the size sweep (Debian's license
texts, `heldout_text.py`: same items, bits per byte) with its own weights, then with the tail rows replaced by their
rank-r approximation on both the input and the output side, for each r. Retention = exact bpb / factored bpb with a
paired bootstrap 95% CI; the parameter cost is kept rows x hidden + tail rows x r + r x hidden. The kept rows are the
student's vocabulary (its token strings looked up in the teacher's tokenizer). Writes bench/results/tail_rank.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout_text import DEFAULT_TEXT, license_text  # noqa: E402
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


def kept_teacher_ids(student, teacher_tok):
    from transformers import PreTrainedTokenizerFast

    path = Path(student) / "tokenizer.json"  # the tokenizer file alone: the student's remote code is not run
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: --student must be a student folder with a fast tokenizer")
    student_tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    ids = teacher_tok.convert_tokens_to_ids(student_tok.convert_ids_to_tokens(list(range(len(student_tok)))))
    unk = teacher_tok.unk_token_id
    missing = sum(1 for i in ids if i is None or (i == unk and unk is not None))
    if missing > 1:
        raise SystemExit(f"error: {missing} of the student's tokens are not in the teacher's vocabulary: "
                         f"{student} is not a trimmed copy of this teacher's tokenizer")
    return sorted({int(i) for i in ids if i is not None})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="the base teacher's HF folder (tied embedding)")
    parser.add_argument("--student", required=True, help="a student whose tokenizer is the trimmed base tokenizer")
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--out", type=Path, default=RESULTS / "tail_rank.json")
    args = parser.parse_args(argv)

    model, tok = load_teacher(args.teacher, dtype=torch.float32)
    model.eval()
    weight = model.get_input_embeddings().weight
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is not weight:
        raise SystemExit(f"error: {args.teacher}: the LM head is not tied to the embedding (this bench factors one "
                         "matrix)")
    kept = kept_teacher_ids(args.student, tok)
    vocab, hidden = weight.shape
    tail = torch.ones(vocab, dtype=torch.bool)
    tail[kept] = False
    original = weight.detach().clone()
    scratch = RESULTS / ".tail_rank.tmp"
    scratch.write_text(license_text(DEFAULT_TEXT, 400_000))
    try:
        probe = LMProbe(scratch, settings=ProbeSettings(max_items=args.items, window_tokens=256, compute="auto")).load()
    finally:
        scratch.unlink(missing_ok=True)
    start = time.perf_counter()
    exact = probe.score(model, tok)
    exact_rows = item_rows("lm", exact.items, "bpb")
    idx = resample_indices(len(probe.chunks), 1000, 0)
    u, s, vh = torch.linalg.svd(original[tail], full_matrices=False)
    energy = (s ** 2).cumsum(0) / (s ** 2).sum()
    rows = []
    for r in args.ranks:
        approx = (u[:, :r] * s[:r]) @ vh[:r]
        with torch.no_grad():
            weight.copy_(original)
            weight[tail] = approx
        scored = probe.score(model, tok)
        f_rows = item_rows("lm", scored.items, "bpb")
        value = retention_value(f_rows, exact_rows, lower_is_better=True)
        ci = percentile_ci(retention_samples(f_rows, exact_rows, True, idx))
        params = len(kept) * hidden + int(tail.sum()) * r + r * hidden
        rel = float((approx - original[tail]).norm() / original[tail].norm())
        rows.append({"rank": r, "bpb": scored.summary["bpb"], "retention": value, "retention_ci": ci,
                     "embedding_params": params, "tail_relative_error": rel,
                     "tail_energy_kept": float(energy[r - 1])})
        print(f"rank {r}: bpb {scored.summary['bpb']:.4f} vs exact {exact.summary['bpb']:.4f}; retention "
              f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]; embedding {params:,} params; tail rows' relative error "
              f"{rel:.3f}")
    with torch.no_grad():
        weight.copy_(original)
    record = {"schema": "nexus.bench.tail_rank/1", "teacher": args.teacher, "student": args.student,
              "text": DEFAULT_TEXT, "items": len(probe.chunks), "vocab": vocab, "hidden": hidden,
              "kept_rows": len(kept), "tail_rows": int(tail.sum()), "kept_rows_params": len(kept) * hidden,
              "full_embedding_params": vocab * hidden, "exact_bpb": exact.summary["bpb"], "ranks": rows,
              "seconds": round(time.perf_counter() - start, 1)}
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(record, indent=1, allow_nan=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
