"""The memory planner against measured peak RSS on a real teacher (Gemma-3-270M, bf16 safetensors).

Every measurement runs in a fresh child process (one at a time, 1 thread) and reads the kernel's peak RSS (VmHWM in
/proc/self/status), so nothing a previous measurement allocated can hide or inflate a peak:

* ``runtime``: Python + torch + transformers + nexus imported, nothing loaded;
* ``tokenizer``: + the tokenizer (its resident size and its parse peak: the planner's calibration constants);
* ``load``: + tokenizer + teacher (from_pretrained, bf16);
* ``forward``: + one no-grad forward of batch 8 x 256 tokens (the stage's peak);
* ``plan``: the planner's numbers, from config.json and the tokenizer's file size only, in the same fresh runtime.

Prints a plan-vs-measured table with the ratio and writes bench/out/memory_plan_real.json.

    OMP_NUM_THREADS=1 python bench/memory_plan_real.py [--folder F] [--batch 8] [--seq 256]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

FOLDER = "/work/cache/gguf/gemma-3-270m-q4_k_m-e4f5d8795dcf8661-bfloat16"
OUT = Path(__file__).resolve().parent / "out" / "memory_plan_real.json"
MODES = ("runtime", "tokenizer", "load", "forward", "plan")


def _status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(mode, folder, batch, seq):
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (same imports in every mode)

    from nexus.conversion import memory_plan

    torch.set_num_threads(1)
    record = {"mode": mode, "runtime_rss": _status("VmRSS")}
    if mode == "plan":
        plan = memory_plan.plan_stage([("gemma", folder, "bf16", folder)], stage="forward", batch=batch,
                                      seq_len=seq)
        record["plan"] = plan
    if mode in ("tokenizer", "load", "forward"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        record["tokenizer_rss"] = _status("VmRSS")
        record["tokenizer_file_bytes"] = memory_plan.tokenizer_file_bytes(folder)
    if mode in ("load", "forward"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        record["load_rss"] = _status("VmRSS")
        record["params"] = sum(p.numel() for p in model.parameters())
    if mode == "forward":
        ids = torch.randint(0, len(tokenizer), (batch, seq), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits
        record["forward_rss"] = _status("VmRSS")
        record["logits_bytes"] = logits.numel() * logits.element_size()
    record["peak_rss"] = _status("VmHWM")
    print("RESULT " + json.dumps(record, default=str), flush=True)


def run_child(mode, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", mode, "--folder", args.folder, "--batch", str(args.batch),
           "--seq", str(args.seq)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=FOLDER)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.folder, args.batch, args.seq)

    from rich.console import Console
    from rich.table import Table

    m = {mode: run_child(mode, args) for mode in MODES}
    plan = m["plan"]["plan"]
    c = plan["components"]
    p = plan["per_teacher"]["gemma"]
    tok_file = m["tokenizer"]["tokenizer_file_bytes"]
    runtime = m["runtime"]["peak_rss"]
    measured = {
        "runtime": runtime,
        "tokenizer resident": m["tokenizer"]["tokenizer_rss"] - m["tokenizer"]["runtime_rss"],
        "tokenizer load peak": m["tokenizer"]["peak_rss"] - m["tokenizer"]["runtime_rss"],
        "weights + activations (forward)": m["forward"]["peak_rss"] - m["forward"]["tokenizer_rss"],
        "after load (no forward)": m["load"]["load_rss"],
        "stage peak (load + forward)": m["forward"]["peak_rss"],
    }
    planned = {
        "runtime": c["runtime"],
        "tokenizer resident": c["tokenizer"],
        "tokenizer load peak": int(tok_file * plan["assumptions"]["tokenizer_load_peak_per_file_byte"]),
        "weights + activations (forward)": c["teacher_weights"] + c["activations"],
        "after load (no forward)": c["runtime"] + c["tokenizer"] + c["teacher_weights"],
        "stage peak (load + forward)": plan["total_bytes"],
    }
    table = Table(title=f"memory plan vs measured peak RSS: Gemma-3-270M bf16, forward {args.batch}x{args.seq}, "
                        "1 thread")
    for col in ("row", "plan MiB", "measured MiB", "plan / measured"):
        table.add_column(col, justify="left" if col == "row" else "right")
    rows = []
    for name in measured:
        ratio = planned[name] / measured[name]
        rows.append({"row": name, "plan_bytes": planned[name], "measured_bytes": measured[name], "ratio": ratio})
        table.add_row(name, f"{planned[name] / 2**20:,.0f}", f"{measured[name] / 2**20:,.0f}", f"{ratio:.3f}")
    console = Console(width=140)
    console.print(table)
    console.print(f"plan components (forward phase): " + ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in c.items()))
    console.print(f"activations: logits {p['activations']['logits'] / 2**20:,.0f} MiB (measured tensor "
                  f"{m['forward']['logits_bytes'] / 2**20:,.0f} MiB), layer working set "
                  f"{p['activations']['layer_working_set'] / 2**20:,.0f} MiB")
    console.print(f"params: analytic {p['params']:,} vs loaded model {m['load']['params']:,}")
    console.print(f"tokenizer.json {tok_file / 2**20:.1f} MiB: resident / file = "
                  f"{measured['tokenizer resident'] / tok_file:.2f}, load peak / file = "
                  f"{measured['tokenizer load peak'] / tok_file:.2f} (planner constants "
                  f"{plan['assumptions']['tokenizer_resident_per_file_byte']}, "
                  f"{plan['assumptions']['tokenizer_load_peak_per_file_byte']})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    from nexus.conversion.atomic_output import atomic_file

    with atomic_file(OUT) as tmp:
        tmp.write_text(json.dumps({"folder": args.folder, "batch": args.batch, "seq_len": args.seq, "threads": 1,
                                   "rows": rows, "plan": plan, "measurements": m}, indent=1, default=str))
    console.print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
