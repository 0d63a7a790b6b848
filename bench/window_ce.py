"""Held-out cross-entropy of text students in fixed windows, with and without a BOS at each window's start
(issue 16: why a longer distillation scores worse in validate while its held-out loss falls).

The LM probe scores each held-out chunk from a BOS. This bench cuts each capability's held-out file into windows of
``--window`` student tokens and scores every window twice: as a plain slice of running text, and with the
tokenizer's BOS put in front (the first token a Gemma-family model attends to). Both numbers are the mean
next-token cross-entropy over every scored position, in nats per token, with the tower that serves the capability
forced (routing plays no part).

    python bench/window_ce.py --student 100=bench/out/speech/text_student_0.25 \
        --student 300=bench/out/size-sweep-runs/0.25/compare/variants/nexus/distill/student

Writes bench/results/window_ce.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402
from nexus.conversion.corpora import corpus_path  # noqa: E402


def windows(ids, length, bos=None):
    """(N, length) windows of running text; with ``bos``, each is BOS + ``length - 1`` tokens."""
    step = length - (bos is not None)
    rows = [ids[i * step:(i + 1) * step] for i in range(len(ids) // step)]
    return torch.tensor([([bos] if bos is not None else []) + r for r in rows])


@torch.no_grad()
def window_ce(model, ids, tower, batch=16):
    total, count = 0.0, 0
    for b in range(0, len(ids), batch):
        x = ids[b:b + batch]
        logits = model(input_ids=x, tower=tower, use_cache=False).logits[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(),
                                                         reduction="sum"))
        count += x[:, 1:].numel()
    return total / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", action="append", required=True, help="LABEL=FOLDER (repeat)")
    ap.add_argument("--capabilities", nargs="+", default=["prose", "code"])
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from nexus.modeling_nexus import NexusForCausalLM

    result = {"window_tokens": args.window, "unit": "nats per scored token", "students": {}}
    for spec in args.student:
        label, _, folder = spec.partition("=")
        if not folder or not Path(folder, "config.json").is_file():
            raise SystemExit(f"error: --student {spec!r}: expected LABEL=FOLDER of a NEXUS student")
        model = NexusForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # (our own checkpoint)
        rows = {}
        for cap in args.capabilities:
            ids = tok(corpus_path(cap).read_text(), add_special_tokens=False)["input_ids"]
            tower = model.config.capability_to_tower[cap]
            plain, with_bos = windows(ids, args.window), windows(ids, args.window, tok.bos_token_id)
            rows[cap] = {"windows": len(plain), "plain": window_ce(model, plain, tower),
                         "bos_first": window_ce(model, with_bos, tower)}
            print(f"{label} {cap}: plain {rows[cap]['plain']:.4f}, BOS first {rows[cap]['bos_first']:.4f} "
                  f"({rows[cap]['windows']} windows)", flush=True)
        result["students"][label] = {"folder": folder, "capabilities": rows}
    path = RESULTS / "window_ce.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
