"""Cached vs uncached greedy generation on a real student (issue 15): are the tokens the same?

transformers 5.25 passes the KV cache to ``forward`` as ``cache=``; a Nexus model that only took ``past_key_values``
lost it, so every decoding step saw one token and greedy output looped. This bench loads an exported student with
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` (the way a user does) and generates greedily with
``use_cache=True`` and ``use_cache=False`` on prompts of every capability the student serves:

- prose and code: the first tokens of windows cut from the bundled held-out text;
- arithmetic: held-out items (seed 7, none of them the demo's validation items' seed 0).

For fp32 and bf16 autocast it records how many sequences are token-for-token identical, the first differing position
of each one that is not, and the cached / uncached wall-time ratio (one run, interleaved).

    python bench/generation_cache.py [--student runs/demo/export] [--prompts 16] [--new-tokens 24]

Writes bench/results/generation_cache.json. Prints a table; asserts nothing.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from nexus.conversion.atomic_output import atomic_file
from nexus.conversion.corpora import arithmetic_items, corpus_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import RESULTS  # noqa: E402


def prompts_for(capability, n, tokenizer, prompt_tokens=24):
    if capability == "arithmetic":
        return [item["prompt"] for item in arithmetic_items(n, seed=7)]
    text = corpus_text(capability, "heldout")
    step = max(1, len(text) // n)
    out = []
    for i in range(n):
        ids = tokenizer(text[i * step:i * step + 400], add_special_tokens=False).input_ids[:prompt_tokens]
        out.append(tokenizer.decode(ids))
    return out


def generate(model, tokenizer, prompt, new_tokens, use_cache, capability, bf16):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=use_cache, capability=capability, pad_token_id=tokenizer.pad_token_id or 0)
    return out[0, ids.shape[1]:].tolist()


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, default=Path("runs/demo/export"))
    parser.add_argument("--prompts", type=int, default=16, help="prompts per capability")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=RESULTS / "generation_cache.json")
    args = parser.parse_args()
    if not (args.student / "config.json").is_file():
        raise SystemExit(f"error: no exported student at {args.student} (run `nexus demo` first, or pass --student)")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.student, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.student, trust_remote_code=True)  # as the README instructs
    capabilities = sorted(model.config.capability_to_tower)
    rows = []
    for bf16 in (False, True):
        for cap in capabilities:
            same, diffs, seconds = 0, [], {True: 0.0, False: 0.0}
            for prompt in prompts_for(cap, args.prompts, tokenizer):
                got = {}
                for use_cache in (True, False) if len(rows) % 2 == 0 else (False, True):  # interleave the order
                    t = time.perf_counter()
                    got[use_cache] = generate(model, tokenizer, prompt, args.new_tokens, use_cache, cap, bf16)
                    seconds[use_cache] += time.perf_counter() - t
                pos = first_difference(got[True], got[False])
                if pos is None:
                    same += 1
                else:
                    diffs.append({"prompt": prompt, "first_difference": pos,
                                  "cached": tokenizer.decode(got[True]), "uncached": tokenizer.decode(got[False])})
            rows.append({"precision": "bf16 autocast" if bf16 else "fp32", "capability": cap, "prompts": args.prompts,
                         "identical": same, "differing": diffs,
                         "cached_over_uncached_time": seconds[True] / seconds[False]})
    result = {"student": str(args.student), "new_tokens": args.new_tokens, "transformers": transformers.__version__,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2))

    table = Table(title=f"cached vs uncached greedy generate, {args.new_tokens} new tokens "
                        f"(transformers {transformers.__version__})")
    for col in ("precision", "capability", "identical", "first difference at", "cached ÷ uncached time"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["precision"], r["capability"], f"{r['identical']}/{r['prompts']}",
                      ", ".join(str(d["first_difference"]) for d in r["differing"]) or "–",
                      f"{r['cached_over_uncached_time']:.2f}")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
