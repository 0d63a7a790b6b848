"""The memory planner against measured peak RSS on a real teacher (Gemma-3-270M, bf16 safetensors).

Every measurement runs in a fresh child process (one at a time, 1 thread) and reads the kernel's peak RSS (VmHWM in
/proc/self/status), so nothing a previous measurement allocated can hide or inflate a peak:

* ``runtime``: Python + torch + transformers + nexus imported, nothing loaded;
* ``tokenizer``: + the tokenizer (its resident size and its parse peak: the planner's calibration constants);
* ``load``: + tokenizer + teacher (from_pretrained, bf16);
* ``forward``: + one no-grad forward of batch 8 x 256 tokens (the stage's peak);
* ``plan``: the planner's numbers, from config.json and the tokenizer's file size only, in the same fresh runtime;
* ``profile_stage``: the whole profile stage (`run_profile`, one prose capability of ``--items`` chunks, batch x
  seq) against the plan `nexus consolidate` makes before it (`stage_memory.plan_profile_ram`: safetensors headers,
  tokenizer, the probes' vocabulary-sliced head under the compute mode's dtype), both in the same fresh child.

Prints plan-vs-measured tables with the ratio and writes bench/results/memory_plan_real.json
(``--stage-only``: bench/results/memory_plan_profile_stage.json).

    OMP_NUM_THREADS=1 python bench/memory_plan_real.py [--folder F] [--batch 8] [--seq 256] [--items 8]
                                                       [--stage-only]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import RESULTS  # noqa: E402

FOLDER = "/work/cache/gguf/gemma-3-270m-q4_k_m-e4f5d8795dcf8661-bfloat16"
OUT = RESULTS / "memory_plan_real.json"
OUT_STAGE_ONLY = OUT.with_name("memory_plan_profile_stage.json")  # --stage-only leaves the full record in place
MODES = ("runtime", "tokenizer", "load", "forward", "plan")
STAGE_MODE = "profile_stage"


def _status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def profile_stage(folder, batch, seq, items):
    """The profile stage on one bf16 teacher in this fresh process: the consolidate plan, then the measured peak."""
    import shutil
    import tempfile

    from nexus.conversion.peak_rss import current_rss
    from nexus.conversion.profile import run_profile
    from nexus.conversion.recipe import validate_recipe
    from nexus.conversion.stage_memory import plan_profile_ram

    run_dir = tempfile.mkdtemp(prefix="nexus-memory-plan-")
    try:
        recipe = validate_recipe({
            "name": "memory-plan", "run_dir": run_dir,
            "teachers": [{"name": "gemma", "source": folder, "dtype": "bf16"}],
            "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose"}],
            "stages": {"profile": {"max_items": items, "batch_size": batch, "window_tokens": seq, "n_bootstrap": 100}},
        })
        plan = plan_profile_ram(recipe, current_rss())
        profile = run_profile(recipe, show_progress=False)
        return {"stage_plan": plan, "stage_peak_rss": _status("VmHWM"), "profile_memory": profile["memory"],
                "tokens": profile["capabilities"]["prose"]["gemma"].get("tokens")}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def child(mode, folder, batch, seq, items=8):
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (same imports in every mode)

    from nexus.conversion import memory_plan

    torch.set_num_threads(1)
    record = {"mode": mode, "runtime_rss": _status("VmRSS")}
    if mode == STAGE_MODE:
        record.update(profile_stage(folder, batch, seq, items))
        print("RESULT " + json.dumps(record, default=str), flush=True)
        return
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
           "--seq", str(args.seq), "--items", str(args.items)]
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
    parser.add_argument("--items", type=int, default=8, help="profile_stage: prose chunks scored (one batch of 8)")
    parser.add_argument("--stage-only", action="store_true", help="only the profile stage against its plan")
    parser.add_argument("--child", choices=MODES + (STAGE_MODE,))
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.folder, args.batch, args.seq, args.items)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    stage = run_child(STAGE_MODE, args)
    stage_rows = stage_table(console, stage, args)
    if args.stage_only:
        return write({"folder": args.folder, "batch": args.batch, "seq_len": args.seq, "threads": 1,
                      "profile_stage": {"rows": stage_rows, **stage}}, console, OUT_STAGE_ONLY)
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
    console.print(table)
    console.print("plan components (forward phase): " + ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in c.items()))
    console.print(f"activations: logits {p['activations']['logits'] / 2**20:,.0f} MiB (measured tensor "
                  f"{m['forward']['logits_bytes'] / 2**20:,.0f} MiB), layer working set "
                  f"{p['activations']['layer_working_set'] / 2**20:,.0f} MiB")
    console.print(f"params: analytic {p['params']:,} vs loaded model {m['load']['params']:,}")
    console.print(f"tokenizer.json {tok_file / 2**20:.1f} MiB: resident / file = "
                  f"{measured['tokenizer resident'] / tok_file:.2f}, load peak / file = "
                  f"{measured['tokenizer load peak'] / tok_file:.2f} (planner constants "
                  f"{plan['assumptions']['tokenizer_resident_per_file_byte']}, "
                  f"{plan['assumptions']['tokenizer_load_peak_per_file_byte']})")
    write({"folder": args.folder, "batch": args.batch, "seq_len": args.seq, "threads": 1, "rows": rows, "plan": plan,
           "measurements": m, "profile_stage": {"rows": stage_rows, **stage}}, console)


def stage_table(console, stage, args):
    """Print the profile stage's plan against its measured peak RSS; returns the rows."""
    from rich.table import Table

    plan = stage["stage_plan"]
    measured = stage["stage_peak_rss"]
    table = Table(title=f"profile stage (run_profile, Gemma-3-270M bf16, {args.items} prose chunks, batch "
                        f"{args.batch} x {args.seq}, 1 thread): consolidate's plan vs measured peak RSS")
    for col in ("row", "MiB"):
        table.add_column(col, justify="left" if col == "row" else "right")
    rows = [{"row": f"plan: {k}", "bytes": v} for k, v in plan["components"].items()]
    rows += [{"row": "plan: total", "bytes": plan["total_bytes"]}, {"row": "measured peak RSS", "bytes": measured}]
    for r in rows:
        table.add_row(r["row"], f"{r['bytes'] / 2**20:,.0f}")
    console.print(table)
    console.print(f"profile stage: plan / measured = {plan['total_bytes'] / measured:.3f} "
                  f"({stage['tokens']} tokens scored; weights counted from {plan['assumptions'].get('params_from')})")
    return rows + [{"row": "plan / measured", "ratio": plan["total_bytes"] / measured}]


def write(record, console, path=OUT):
    from nexus.conversion.atomic_output import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=str))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
