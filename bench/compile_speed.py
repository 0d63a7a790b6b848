"""torch.compile of a real student's forced-tower forward: graph breaks, and compiled / eager speed in one run.

Loads an exported student as a user does (``trust_remote_code``; a copy with this project's current modeling code, as
``bench/quantise.py`` does) in fp32, forces one tower (``capability=``, so the routing needs no tensor read) and:

1. counts graph breaks with ``torch._dynamo.explain`` for the forced forward and for the router's forward;
2. compiles the forced forward with ``torch.compile(model, fullgraph=True, dynamic=False)`` (inductor), warms both up,
   then times eager and compiled calls interleaved (``--repeats`` pairs, no grad, a fixed (``--batch``, ``--tokens``)
   batch) and reports the ratio of the median times. Both run in the same process on the same inputs, so the ratio,
   not the seconds, is the figure to read; other jobs on the machine slow both alike.

    python bench/compile_speed.py [--student bench/out/runs/gemma_own_vocab/export] [--capability prose]

Writes bench/results/compile_speed.json. Prints the figures; asserts nothing.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from nexus.conversion.atomic_output import atomic_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py, bench/quantise.py
from paths import ARTEFACTS, RESULTS  # noqa: E402
from quantise import DEFAULT_STUDENTS, with_current_code  # noqa: E402


def graph_breaks(model, ids, **kw):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, **kw)
    return explained.graph_break_count, sorted({str(r.reason).splitlines()[0][:160] for r in explained.break_reasons})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, default=None)
    parser.add_argument("--capability", default=None, help="the tower to force, by a capability it serves "
                        "(default: one served by the largest tower)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "compile_speed.json")
    args = parser.parse_args()
    source = args.student or next((p for p in DEFAULT_STUDENTS if (p / "config.json").is_file()), None)
    if source is None or not (source / "config.json").is_file():
        raise SystemExit("error: no exported student found (run `nexus demo` first, or pass --student)")
    student = with_current_code(source, ARTEFACTS / "compile_speed" / "student")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(student, trust_remote_code=True, dtype=torch.float32).eval()
    sizes = [sum(p.numel() for p in tower.parameters()) for tower in model.model.towers]
    capability = args.capability or max(sorted(model.config.capability_to_tower),
                                        key=lambda c: sizes[model.config.capability_to_tower[c]])
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))
    forced = {"capability": capability, "use_cache": False}

    with torch.no_grad():
        breaks_forced, reasons_forced = graph_breaks(model, ids, **forced)
        breaks_router, reasons_router = graph_breaks(model, ids, use_cache=False)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        start = time.perf_counter()
        compiled_logits = compiled(ids, **forced).logits
        compile_seconds = time.perf_counter() - start
        eager_logits = model(ids, **forced).logits
        max_diff = (compiled_logits - eager_logits).abs().max().item()
        for _ in range(2):  # warm-up
            model(ids, **forced)
            compiled(ids, **forced)
        eager_t, compiled_t = [], []
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both
            t = time.perf_counter()
            model(ids, **forced)
            eager_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            compiled(ids, **forced)
            compiled_t.append(time.perf_counter() - t)

    ratio = statistics.median(eager_t) / statistics.median(compiled_t)
    summary = {
        "student": str(source), "capability_forced": capability,
        "tower_forced_parameters": sizes[model.config.capability_to_tower[capability]], "batch": args.batch, "tokens": args.tokens,
        "repeats": args.repeats, "parameters": sum(p.numel() for p in model.parameters()),
        "graph_breaks_forced_tower": breaks_forced, "graph_break_reasons_forced_tower": reasons_forced,
        "graph_breaks_router": breaks_router, "graph_break_reasons_router": reasons_router,
        "compiled_speedup_over_eager": ratio,
        "compiled_vs_eager_max_abs_logit_diff": max_diff,
        "first_compiled_call_seconds": round(compile_seconds, 1),
        "median_seconds": {"eager": statistics.median(eager_t), "compiled": statistics.median(compiled_t)},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
    }
    print(f"graph breaks: forced tower ({capability}) {breaks_forced}, router {breaks_router} {reasons_router}")
    print(f"compiled / eager speed (median of {args.repeats} interleaved calls, one run): {ratio:.2f}x "
          f"(max |dlogit| {max_diff:.2e}; first compiled call {compile_seconds:.0f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
