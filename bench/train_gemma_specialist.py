"""Fine-tune Gemma-3-270M into a same-family specialist (issue 17, item 3): the pair the align stage merges.

    python bench/train_gemma_specialist.py [--capability code] [--minutes 25] [--out /work/cache/gemma-code]

The decoder layers are trained (the 168M-parameter embedding stays frozen, so the two teachers share it exactly and
differ only where a tower lives) on the capability's bundled training text, fp32 (``--bf16``: autocast), AdamW, over
Gemma's whole vocabulary (a softmax over only the text's tokens, tried first at lr 1e-4, raised the held-out code
loss from 2.42 to 3.12: the other 250k logits are never pushed down), within a stated CPU budget (``--minutes``,
default 25: the issue's limit is 30). The result is an ordinary HF folder (safetensors, Gemma's tokenizer) with
``train_log.json``; a finished folder with the same settings is reused, not retrained.

Printed and written to ``bench/results/gemma_specialist.json``: the next-token loss of Gemma and of the specialist on
the held-out text of every bundled text capability (the specialist must beat Gemma on its own capability to be a
tower teacher; the other capability's loss shows what the fine-tune cost).
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from nexus.conversion.align import next_token_loss
from nexus.conversion.atomic_output import atomic_dir, atomic_file
from nexus.conversion.calibration import token_windows
from nexus.conversion.teacher_source import load_teacher
from nexus.conversion.training_text import training_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import RESULTS  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "nexus" / "conversion" / "data"
GGUF = "/work/cache/gemma-3-270m-q4_k_m.gguf"
GGUF_CACHE = "/work/cache/gguf"


def heldout_windows(tokenizer, capability, tokens, window):
    return token_windows(tokenizer, (DATA / f"{capability}_heldout.txt").read_text(), tokens, window)


def mean_loss(model, windows, bf16=False):
    """Mean next-token loss (nats) over ``windows``: the align stage's measure, batches of 8."""
    return next_token_loss(model, windows, batch_size=8, autocast=bf16)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", default="code", choices=("code", "prose"))
    parser.add_argument("--gguf", default=GGUF)
    parser.add_argument("--out", type=Path, default=None, help="default /work/cache/gemma-<capability>")
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget (the issue: <= 30)")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs with AVX512-BF16/AMX; "
                                                            "on AVX2-only CPUs it is several times slower than fp32)")
    parser.add_argument("--summary", type=Path, default=RESULTS / "gemma_specialist.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(f"/work/cache/gemma-{args.capability}")
    settings = {k: getattr(args, k) for k in ("capability", "gguf", "minutes", "max_steps", "lr", "batch", "seq",
                                               "bf16")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    base, tok = load_teacher(args.gguf, dtype=torch.float32, cache_root=GGUF_CACHE)
    evals = {cap: heldout_windows(tok, cap, args.eval_tokens, args.seq) for cap in ("prose", "code")}
    log_path = out / "train_log.json"
    if log_path.is_file() and json.loads(log_path.read_text()).get("key") == key:
        log = json.loads(log_path.read_text())
        print(f"reused {out} (same settings; delete it to retrain)")
    else:
        chunks = training_text(args.capability, f"bundled:{args.capability}").chunks
        train = token_windows(tok, "\n".join(chunks), 10**9, args.seq)
        before = {cap: mean_loss(base, w, args.bf16) for cap, w in evals.items()}
        print(f"Gemma-3-270M held-out loss: {before}; {len(train)} training windows of {args.seq} tokens")
        for p in base.parameters():
            p.requires_grad_(False)
        trained = [p for n, p in base.named_parameters() if ".layers." in n]
        for p in trained:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        base.train()
        start, cpu0, step, losses = time.perf_counter(), time.process_time(), 0, []
        while step < args.max_steps and time.perf_counter() - start < 60 * args.minutes:
            ids = train[torch.randint(len(train), (args.batch,), generator=gen)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = base(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 25 == 0 or step <= 3:
                print(f"step {step}: loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                      f"({time.perf_counter() - start:.0f} s)",
                      flush=True)
        base.eval()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        log = {"key": key, "settings": settings, "steps": step, "tokens": step * args.batch * args.seq,
               "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "threads": torch.get_num_threads(),
               "first_loss": losses[0] if losses else None,
               "final_loss": sum(losses[-25:]) / max(1, len(losses[-25:])),
               "trained_params": sum(p.numel() for p in trained), "heldout_loss_base": before}
        with atomic_dir(out, overwrite=True) as tmp:
            base.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            with atomic_file(tmp / "train_log.json") as f:
                f.write_text(json.dumps(log, indent=1))
    specialist, _ = load_teacher(out, dtype=torch.float32, with_tokenizer=False)
    after = {cap: mean_loss(specialist, w, args.bf16) for cap, w in evals.items()}
    before = log["heldout_loss_base"]
    summary = {**{k: v for k, v in log.items() if k != "key"}, "folder": str(out), "heldout_loss_specialist": after,
               "heldout_tokens": {cap: int(w[:, 1:].numel()) for cap, w in evals.items()},
               "specialist_better_on": [c for c in after if after[c] < before[c]]}
    with atomic_file(args.summary) as f:
        f.write_text(json.dumps(summary, indent=1))
    for cap in after:
        print(f"{cap}: held-out loss Gemma {before[cap]:.4f} -> specialist {after[cap]:.4f}")
    print(f"{log['steps']} steps, {log['tokens']:,} tokens, {log['wall_seconds']} s wall; wrote {args.summary}")


if __name__ == "__main__":
    main()
