"""bf16 vs fp32 weights on this CPU: why localisation holds a bf16 teacher in fp32 where bf16 matmuls are not native.

    python bench/bf16_matmul_speed.py [--gguf /work/cache/gemma-3-270m-q4_k_m.gguf] [--threads 1]

Measures, in one process and under the same load, forward and forward + backward wall time with the weights in bf16
and in fp32:
1. one linear layer of Gemma-3-270M's FFN shape (640 -> 2048) on 512 tokens;
2. Gemma-3-270M's decoder body (18 layers, no head) on 64 tokens, from input embeddings that require grad, as the
   localise stage's activation x gradient pass runs it (parameters frozen).
Writes ``bench/results/bf16_matmul_speed.json`` with the seconds and the bf16 / fp32 ratios, and whether this CPU
has native bf16 matmuls (`native_bf16_matmul`). Asserts nothing.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402
from nexus.conversion.probes.compute_mode import native_bf16_matmul  # noqa: E402


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def linear_case(dtype, repeats):
    torch.manual_seed(0)
    lin = torch.nn.Linear(640, 2048).to(dtype)
    x = torch.randn(512, 640, dtype=dtype)

    def forward():
        with torch.no_grad():
            lin(x)

    def backward():
        xi = x.clone().requires_grad_(True)
        lin(xi).float().sum().backward()

    return {"forward_s": timed(forward, repeats), "forward_backward_s": timed(backward, repeats)}


def gemma_case(folder, dtype, tokens, repeats):
    from nexus.conversion.teacher_source import load_teacher

    model, _ = load_teacher(folder, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(10, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach()

    def forward():
        with torch.no_grad():
            model.model(inputs_embeds=embeds)

    def backward():
        e = embeds.clone().requires_grad_(True)
        model.model(inputs_embeds=e).last_hidden_state.float().pow(2).mean().backward()

    return {"forward_s": timed(forward, repeats), "forward_backward_s": timed(backward, repeats)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=Path("/work/cache/gemma-3-270m-q4_k_m.gguf"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/work/cache/gguf"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "bf16_matmul_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nexus.conversion.teacher_source import resolve_teacher_folder

    folder = resolve_teacher_folder(args.gguf, False, args.cache_dir)
    result = {"cpu": platform.processor() or platform.machine(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16_matmul": native_bf16_matmul(),
              "threads": args.threads, "torch": torch.__version__, "cases": {}}
    for name, run in (("linear 640->2048, 512 tokens", lambda d: linear_case(d, 5)),
                      (f"gemma-3-270m body, {args.tokens} tokens", lambda d: gemma_case(folder, d, args.tokens,
                                                                                        args.repeats))):
        case = {"fp32": run(torch.float32), "bf16": run(torch.bfloat16)}
        case["bf16_over_fp32"] = {k: case["bf16"][k] / case["fp32"][k] for k in case["fp32"]}
        result["cases"][name] = case
        r = case["bf16_over_fp32"]
        print(f"{name}: forward fp32 {case['fp32']['forward_s']:.3f} s, bf16 {case['bf16']['forward_s']:.3f} s "
              f"({r['forward_s']:.1f}x); forward+backward fp32 {case['fp32']['forward_backward_s']:.3f} s, bf16 "
              f"{case['bf16']['forward_backward_s']:.3f} s ({r['forward_backward_s']:.1f}x)")
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"native bf16 matmul: {result['native_bf16_matmul']} ({result['cpu_capability']}); wrote {args.out}")


if __name__ == "__main__":
    main()
