"""Inference speed (issue 2, acceptance 6): a one-tower Nexus model vs. the HF model of the same dims.

The baseline is a randomly initialised HF model (``LlamaForCausalLM``, or ``Gemma3ForCausalLM`` for the Gemma-shaped
case); the Nexus model is imported from it with `nexus_from_teacher`, so both hold the same weights (checked: fp32
logits agree). Measured: forward tokens/s (batch x seq, no cache) and greedy ``generate`` tokens/s (fixed number of
new tokens, KV cache on), in fp32 and in bf16 autocast. Repetitions are interleaved (HF, Nexus, Nexus, HF, ...) so
load from other processes hits both alike; figures are medians and the ratio Nexus / HF is taken within this one run,
on wall clock and on process CPU time (the steadier one when other jobs share the cores). One thread by default: on a
shared 2-core machine two OpenMP threads stall whenever one is descheduled, which made paired ratios swing 0.55-1.4.

    python bench/inference_speed.py [--shapes llama gemma] [--reps 5]

Writes bench/results/inference_speed.json and prints a table. Asserts nothing.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from nexus.conversion.atomic_output import atomic_file
from nexus.conversion.teacher_import import nexus_from_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import RESULTS  # noqa: E402

SHAPES = {
    # the reference shape
    "llama": dict(hidden=512, layers=8, heads=8, kv_heads=2, head_dim=64, ffn=1536, vocab=8192),
    # Gemma-3-270M's blocks (18 layers, 4 heads x 256, 1 kv head, GeGLU 2048, sandwich norms, q/k-norm, 5:1
    # sliding/global) with a 8k vocabulary instead of 262k, so the LM head does not swamp the blocks
    "gemma": dict(hidden=640, layers=18, heads=4, kv_heads=1, head_dim=256, ffn=2048, vocab=8192),
}


def hf_baseline(shape_name, seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape_name]
    torch.manual_seed(seed)
    if shape_name == "llama":
        config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                             num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                             head_dim=s["head_dim"], intermediate_size=s["ffn"], max_position_embeddings=4096,
                             tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    else:
        config = Gemma3TextConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                  num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                                  head_dim=s["head_dim"], intermediate_size=s["ffn"], sliding_window=512,
                                  query_pre_attn_scalar=s["head_dim"], max_position_embeddings=4096)
        model = Gemma3ForCausalLM(config)
    return model.eval()


def timed(fn):
    """(wall seconds, CPU seconds of this process) for one call. CPU time barely moves when other processes take
    the cores away, so its ratio is the steadier one on a shared machine; wall time is what a user waits."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def forward_fn(model, ids, bf16):
    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids, use_cache=False)

    return run


def generate_fn(model, prompt, new_tokens, bf16):
    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                 pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + new_tokens, "generate stopped early"

    return run


def interleaved_medians(fns, reps, progress, label):
    """Run each of ``fns`` (name -> callable) once to warm up, then ``reps`` rounds in alternating order."""
    names = list(fns)
    times = {n: {"wall": [], "cpu": []} for n in names}
    task = progress.add_task(label, total=(reps + 1) * len(names))
    for n in names:
        fns[n]()
        progress.advance(task)
    for r in range(reps):
        for n in names if r % 2 == 0 else reversed(names):  # A B, B A, A B, ...: no position bias
            wall, cpu = timed(fns[n])
            times[n]["wall"].append(wall)
            times[n]["cpu"].append(cpu)
            progress.advance(task)
    medians = {n: {clock: statistics.median(v) for clock, v in t.items()} for n, t in times.items()}
    return medians, times


def bench_shape(shape_name, args, progress):
    hf = hf_baseline(shape_name)
    nexus = nexus_from_teacher(hf, name=shape_name)
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[shape_name]["vocab"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    prompt = torch.randint(0, vocab, (args.gen_batch, args.prompt), generator=g)
    with torch.no_grad():
        check = (hf(input_ids=ids[:1, :64]).logits - nexus(input_ids=ids[:1, :64]).logits).abs().max().item()

    rows = []
    for precision in args.precisions:
        bf16 = precision == "bf16_autocast"
        for kind in ("forward", "generate"):
            if kind == "forward":
                fns = {"hf": forward_fn(hf, ids, bf16), "nexus": forward_fn(nexus, ids, bf16)}
                tokens = args.batch * args.seq
            else:
                fns = {"hf": generate_fn(hf, prompt, args.new_tokens, bf16),
                       "nexus": generate_fn(nexus, prompt, args.new_tokens, bf16)}
                tokens = args.gen_batch * args.new_tokens
            reps = args.bf16_reps if bf16 and args.bf16_reps else args.reps
            medians, raw = interleaved_medians(fns, reps, progress, f"{shape_name} {kind} {precision}")
            hf_t, nx_t = medians["hf"], medians["nexus"]
            rows.append({
                "shape": shape_name, "kind": kind, "precision": precision, "tokens_per_call": tokens, "reps": reps,
                "hf_tokens_per_s": tokens / hf_t["wall"], "nexus_tokens_per_s": tokens / nx_t["wall"],
                "ratio_nexus_over_hf": hf_t["wall"] / nx_t["wall"],
                "ratio_nexus_over_hf_cpu_time": hf_t["cpu"] / nx_t["cpu"],
                # each repetition's HF and Nexus calls ran back to back: their ratio cancels slow load drift
                "paired_ratios": [h / n for h, n in zip(raw["hf"]["wall"], raw["nexus"]["wall"])],
                "hf_seconds": raw["hf"], "nexus_seconds": raw["nexus"],
            })
    return {"baseline": type(hf).__name__, "baseline_attention": hf.config._attn_implementation,
            "dims": SHAPES[shape_name], "fp32_max_abs_logit_diff": check,
            "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama"], choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--gen-batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bf16-reps", type=int, default=None, help="fewer reps for the slow bf16 cells")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16_autocast"],
                        choices=["fp32", "bf16_autocast"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "inference_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)

    load_at_start = os.getloadavg()
    results = {}
    with Progress(console=console) as progress:
        for shape in args.shapes:
            results[shape] = bench_shape(shape, args, progress)

    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "note": "ratio = HF median time / Nexus median time (> 1: Nexus faster), wall clock and process CPU "
                "time; measured in this one run",
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title="Nexus vs HF: tokens/s (medians of interleaved repetitions)")
    for col in ("shape", "baseline", "kind", "precision", "reps", "HF tok/s", "Nexus tok/s", "Nexus/HF",
                "paired min..max", "Nexus/HF (CPU time)"):
        table.add_column(col, justify="left" if col in ("shape", "baseline", "kind", "precision") else "right")
    for shape, res in results.items():
        for r in res["rows"]:
            paired = r["paired_ratios"]
            table.add_row(shape, res["baseline"], r["kind"], r["precision"], str(r["reps"]),
                          f"{r['hf_tokens_per_s']:.1f}", f"{r['nexus_tokens_per_s']:.1f}",
                          f"{r['ratio_nexus_over_hf']:.3f}", f"{min(paired):.2f}..{max(paired):.2f}",
                          f"{r['ratio_nexus_over_hf_cpu_time']:.3f}")
    console.print(table)
    for shape, res in results.items():
        console.print(f"{shape}: fp32 max |logit diff| HF vs Nexus = {res['fp32_max_abs_logit_diff']:.3g}")
    console.print(f"1-min load average: {load_at_start[0]:.1f} at start, {report['load_average_at_end'][0]:.1f} at end "
                  f"({os.cpu_count()} cores)")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
