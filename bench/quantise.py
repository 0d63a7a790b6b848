"""Quantised loading of a real student: logit error and perplexity change of each path vs fp32 and bf16 (issue 18).

Loads an exported student the way a user does (``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``)
in fp32, bf16 and through every quantisation path of ``nexus.hub.quantised_load`` (bitsandbytes LLM.int8 and NF4,
torchao int8 weight-only), with no extra arguments, and scores the same held-out windows with each:

- prose and code: windows of ``--tokens`` tokens cut from the bundled held-out text;
- arithmetic: ``8 x --windows`` held-out items (seed 7), one per row, of which only the answer's tokens are scored,
  right after the prompt (exact match, in validation, first strips the whitespace a student may open with, so this
  perplexity is not that metric: read its change across paths).

The router picks the tower (the default path). For each path it records max and mean |logit - reference| against fp32
and against bf16 over every scored position, the perplexity (exp of the mean next-token NLL, per capability and
overall), its relative change vs bf16, and how many windows are routed as fp32 routes them. A path that fails to load or
run is recorded with its one-line error.

    python bench/quantise.py [--student bench/out/runs/gemma_own_vocab/export] [--windows 4] [--tokens 96]

Writes bench/results/quantise.json. Prints a table; asserts nothing.
"""

import argparse
import json
import math
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from nexus.conversion.atomic_output import atomic_file
from nexus.conversion.corpora import arithmetic_items, corpus_text
from nexus.hub.quantised_load import METHODS, load_quantised

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import ARTEFACTS, RESULTS  # noqa: E402

MODELING_DIR = Path(__file__).resolve().parent.parent / "nexus" / "modeling_nexus"
DEFAULT_STUDENTS = (Path("runs/demo/export"), ARTEFACTS / "runs" / "gemma_own_vocab" / "export")


def with_current_code(student, scratch):
    """A copy of ``student`` at ``scratch`` whose modeling files are this project's current ones (the weights are a
    symlink): ``trust_remote_code`` runs the code stored in the checkpoint, which predates the quantisation fixes in an
    export written before them."""
    scratch.mkdir(parents=True, exist_ok=True)
    for f in student.iterdir():
        target = scratch / f.name
        if target.is_symlink() or target.exists():
            target.unlink()
        if f.suffix == ".safetensors":
            target.symlink_to(f.resolve())
        elif f.is_file():
            shutil.copy2(f, target)
    for f in MODELING_DIR.glob("*.py"):
        if f.name != "__init__.py":
            shutil.copy2(f, scratch / f.name)
    return scratch


def windows_for(capability, n, tokens, tokenizer):
    """``n`` windows of exactly ``tokens`` token ids (B, T) for ``capability``, each starting with BOS when the
    tokenizer has one (Gemma's logits after a missing BOS are garbage)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = tokens - len(bos)
    if capability == "arithmetic":  # one item per row; only the answer's tokens are scored (the rest is -100)
        rows, targets = [], []
        for item in arithmetic_items(n * 8, seed=7):
            prompt = bos + tokenizer(item["prompt"], add_special_tokens=False).input_ids
            answer = tokenizer(item["prompt"] + item["answer"], add_special_tokens=False).input_ids[len(prompt)
                                                                                                  - len(bos):]
            rows.append(prompt + answer)
            targets.append([-100] * len(prompt) + answer)
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return ids, torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    text = corpus_text(capability, "heldout")
    step = max(1, len(text) // n)
    rows = []
    for i in range(n):
        ids = tokenizer(text[i * step:i * step + 8 * tokens], add_special_tokens=False).input_ids[:body]
        if len(ids) < body:
            raise SystemExit(f"error: held-out {capability} text too short for {n} windows of {tokens} tokens")
        rows.append(bos + ids)
    ids = torch.tensor(rows)
    return ids, ids.clone()


def score(model, batches):
    """Per capability: logits (float32, on CPU), next-token NLL sum and count, routes."""
    out = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LLM.int8's "inputs will be cast from float32 to float16"
        for cap, (ids, targets) in batches.items():
            res = model(ids)
            logits = res.logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    targets[:, 1:].reshape(-1), reduction="sum")  # next-token NLL
            out[cap] = {"logits": logits, "nll": nll.item(), "count": int((targets[:, 1:] != -100).sum()),
                        "routes": res.tower_index.tolist()}
    return out


def perplexities(scored):
    per_cap = {cap: math.exp(s["nll"] / s["count"]) for cap, s in scored.items()}
    total = sum(s["nll"] for s in scored.values()) / sum(s["count"] for s in scored.values())
    return per_cap, math.exp(total)


def logit_error(scored, reference):
    diffs = [(scored[c]["logits"] - reference[c]["logits"]).abs() for c in reference]  # every position
    return {"max_abs": max(d.max().item() for d in diffs),
            "mean_abs": sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs)}


def load(path, student):
    if path == "fp32":
        return AutoModelForCausalLM.from_pretrained(student, trust_remote_code=True, dtype=torch.float32).eval()
    if path == "bf16":
        return AutoModelForCausalLM.from_pretrained(student, trust_remote_code=True, dtype=torch.bfloat16).eval()
    return load_quantised(student, path)


def weight_bytes(model):
    """Bytes of the parameters as stored (a quantised tensor subclass counts its packed data)."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        inner = [getattr(p, a) for a in ("qdata", "scale", "zero_point") if isinstance(getattr(p, a, None),
                                                                                    torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else p.numel() * p.element_size()
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, default=None, help="an exported student (default: the first of "
                        + ", ".join(str(p) for p in DEFAULT_STUDENTS) + " that exists)")
    parser.add_argument("--windows", type=int, default=4, help="windows per capability")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per window")
    parser.add_argument("--paths", default="fp32,bf16," + ",".join(METHODS))
    parser.add_argument("--stored-code", action="store_true", help="run the modeling code stored in the export "
                        "instead of a copy with this project's current code")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantise.json")
    args = parser.parse_args()
    student = args.student or next((p for p in DEFAULT_STUDENTS if (p / "config.json").is_file()), None)
    if student is None or not (student / "config.json").is_file():
        raise SystemExit("error: no exported student found (run `nexus demo` first, or pass --student)")

    torch.manual_seed(0)
    if not args.stored_code:
        student = with_current_code(student, ARTEFACTS / "quantise" / "student")
    tokenizer = AutoTokenizer.from_pretrained(student, trust_remote_code=True)
    config = transformers.AutoConfig.from_pretrained(student, trust_remote_code=True)
    capabilities = sorted(config.capability_to_tower)
    batches = {cap: windows_for(cap, args.windows, args.tokens, tokenizer) for cap in capabilities}

    results, scored = {}, {}
    for path in args.paths.split(","):
        start = time.perf_counter()
        try:
            model = load(path, student)
            scored[path] = score(model, batches)
        except Exception as exc:  # noqa: BLE001  (a path that does not work here is a result, not a crash)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            results[path] = {"error": f"{type(exc).__name__}: {first}"}
            print(f"{path}: {results[path]['error']}")
            continue
        per_cap, overall = perplexities(scored[path])
        results[path] = {"ppl": overall, "ppl_per_capability": per_cap, "weight_bytes": weight_bytes(model),
                         "routes": {c: s["routes"] for c, s in scored[path].items()},
                         "seconds_load_and_score": round(time.perf_counter() - start, 1)}
        del model
        print(f"{path}: ppl {overall:.4f} ({time.perf_counter() - start:.0f} s)")
        for ref in ("fp32", "bf16"):
            if ref in scored and path != ref:
                results[path][f"logit_error_vs_{ref}"] = logit_error(scored[path], scored[ref])
        if path not in ("fp32", "bf16"):
            for c in capabilities:  # free the quantised logits once compared
                scored[path][c]["logits"] = None

    bf16_ppl = results.get("bf16", {}).get("ppl")
    fp32_routes = results.get("fp32", {}).get("routes")
    for path, r in results.items():
        if "ppl" not in r:
            continue
        if bf16_ppl:
            r["ppl_change_vs_bf16"] = r["ppl"] / bf16_ppl - 1.0
            r["ppl_change_vs_bf16_per_capability"] = {
                c: r["ppl_per_capability"][c] / results["bf16"]["ppl_per_capability"][c] - 1.0 for c in capabilities}
        if fp32_routes:
            same = sum(a == b for c in capabilities for a, b in zip(r["routes"][c], fp32_routes[c]))
            r["windows_routed_as_fp32"] = f"{same}/{sum(len(v) for v in fp32_routes.values())}"

    table = Table(title=f"quantised {student} ({len(capabilities)} capabilities x {args.windows} windows x "
                        f"{args.tokens} tokens)")
    for col in ("path", "weights MB", "max|Δ| vs fp32", "mean|Δ| vs fp32", "max|Δ| vs bf16", "mean|Δ| vs bf16",
                "ppl", "ppl vs bf16", "per capability: ppl (vs bf16)", "routed as fp32"):
        table.add_column(col, justify="right")
    for path, r in results.items():
        if "error" in r:
            table.add_row(path, "-", "-", "-", "-", "-", r["error"][:60], "-", "-", "-")
            continue
        e32, e16 = r.get("logit_error_vs_fp32", {}), r.get("logit_error_vs_bf16", {})
        table.add_row(path, f"{r['weight_bytes'] / 2**20:.1f}",
                      *(f"{e[k]:.4f}" if e else "-" for e in (e32, e16) for k in ("max_abs", "mean_abs")),
                      f"{r['ppl']:.4f}", f"{r.get('ppl_change_vs_bf16', 0.0):+.2%}",
                      ", ".join(f"{c} {r['ppl_per_capability'][c]:.3f} "
                                f"({r.get('ppl_change_vs_bf16_per_capability', {}).get(c, 0.0):+.1%})"
                                for c in capabilities),
                      r.get("windows_routed_as_fp32", "-"))
    Console(width=220).print(table)

    summary = {
        "student": str(args.student or next(p for p in DEFAULT_STUDENTS if (p / "config.json").is_file())),
        "modeling_code": "stored in the export" if args.stored_code else "this project's current (copied)",
        "capabilities": capabilities, "windows_per_capability": args.windows,
        "tokens_per_window": args.tokens, "paths": results,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
    }
    for name in ("bitsandbytes", "torchao"):
        try:
            summary["environment"][name] = __import__(name).__version__
        except ImportError:
            summary["environment"][name] = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
