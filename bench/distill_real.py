"""Distillation on a real teacher (issue 5): throughput, peak memory, cache size and retention before/after, with
in-process preservation off and on.

    OMP_NUM_THREADS=1 python bench/distill_real.py [--steps 64] [--batch 4] [--seq-len 256] [--windows 64]
                                                   [--top-k 32] [--lr 1e-4] [--eval-items 16] [--rounds 3]
                                                   [--round-steps 3] [--strength 0.9] [--fresh-cache]

Teacher: Gemma-3-270M (GGUF -> bf16 safetensors cache; weights stay bf16, matmuls in fp32 through
`probes.compute_mode`, because this AVX2 CPU has no bf16 matmul units). Student: the capability-pruned Gemma-3-270M
written by ``bench/compress_real.py`` (``bench/out/compress_gemma``: 57.6M params, trimmed 11,626-token vocabulary),
trained in fp32 on 1 thread. The two vocabularies differ (262,144 vs 11,626 ids), so ``identity`` alignment is refused
by the library (the message is recorded) and ``token_aligned`` is used: on the training text the trimmed tokenizer
splits exactly as the teacher's, so every position aligns and the teacher's top-k is mapped into the student
vocabulary by token string.

Everything is built from the library pieces the ``distill`` stage composes (`teacher_cache.build_teacher_cache`,
`token_alignment.token_aligned_rows`, `distill_losses.DistillLoss`, `distill_engine.train_student`,
`preservation.taylor_importance` / `Preservation`), in this order, in ONE process except step 0:

0. **Teacher alone** (a fresh child process): load the teacher (bf16 weights + tokenizer) and read its VmHWM; then
   score it with the `lm` probe on the held-out slices of prose and code (``--eval-items`` 1000-character chunks
   each: bits per byte and top-1 accuracy with bootstrap CIs, and the unigram-over-bytes baseline).
1. **Teacher cache**: ``--windows`` chunks (~1000 characters, evenly spread) of each capability's *train* slice
   (``corpus_text(cap, "train")``), cut to ``--seq-len`` tokens, run through the teacher once; top-``--top-k``
   logits kept on disk (``bench/out/distill_real/cache/<cap>``; reused on a rerun unless ``--fresh-cache``).
   Bytes/token from the manifest. The teacher is freed before the student loads.
2. **Rows**: token-aligned rows in the student vocabulary (alignment report: aligned positions, top-k mass kept).
3. **Student before**: the `lm` probe with the same items as the teacher.
4. **Throughput** (``--rounds`` interleaved rounds, ``--round-steps`` steps each, same student, same batches, same
   ``--batch`` x ``--seq-len`` shape): a raw loop (forward + next-token CE + backward, no optimizer) vs the engine
   (`train_student`: KD + CE loss on the cached top-k, clipping, AdamW, schedule, NaN guard, run log). Tokens are
   non-padding tokens in both. Ratio = engine tok/s / raw tok/s, the median of the per-round ratios.
5. **Distillation** with preservation ``off``, then from the same init with ``lr_scale`` (strength ``--strength``,
   importance = first-order Taylor on the first 2 training batches, as the ``distill`` stage does): ``--steps``
   optimizer steps of one ``--batch`` x ``--seq-len`` micro-batch, mixed prose/code rows drawn epoch by epoch
   (a pure function of the step). Loss: kd 1.0 (forward KL on top-k, T=1) + ce 0.2. Each is scored after training.
6. **Peak RSS**: VmHWM of this process (cache build + training, preservation off) and of each phase, vs the teacher
   alone (step 0) + the student's training state (params + grads + AdamW m and v, fp32, analytic bytes).
7. **Retention** per capability = teacher bpb / student bpb on the same chunks, paired bootstrap 95% CIs
   (`conversion.retention`), min and mean over capabilities; the paired change in student bpb after - before.

Writes ``bench/results/distill_real.json``; prints rich tables; asserts nothing. Speeds are ratios within one run.
"""

import argparse
import ctypes
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import ARTEFACTS, RESULTS  # noqa: E402

WORK = ARTEFACTS / "distill_real"
STUDENT = ARTEFACTS / "compress_gemma"
GGUF = "/work/cache/gemma-3-270m-q4_k_m.gguf"
GGUF_CACHE = "/work/cache/gguf"
CAPS = ("prose", "code")
LN2 = math.log(2.0)
CHILD_TAG = "NEXUS_CHILD "
console = Console(width=200)


def log(msg):
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)


def trim_heap():
    """Give freed heap pages back to the OS so the next phase's peak starts from what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def make_probes(items, compute):
    from nexus.conversion.probes import ProbeSettings, probe_class

    settings = ProbeSettings(max_items=items, n_bootstrap=1000, seed=0, batch_size=4, window_tokens=256,
                             compute=compute)
    return {c: probe_class("lm")(f"bundled:{c}", {"primary": "bpb"}, settings).load() for c in CAPS}


def evaluate(model, tokenizer, probes):
    out = {}
    for cap, probe in probes.items():
        result = probe.score(model, tokenizer)
        s = result.summary
        out[cap] = {"bpb": s["bpb"], "bpb_ci": s["bpb_ci"], "accuracy": s["accuracy"],
                    "accuracy_ci": s["accuracy_ci"], "perplexity": s["perplexity"], "tokens": s["tokens"],
                    "items": result.items}
    return out


# ------------------------------------------------------------------------------------------ 0: teacher alone


def teacher_child(args):
    """Runs in a fresh process: VmHWM with the teacher loaded, then the teacher's held-out scores."""
    torch.set_num_threads(args.threads)
    from nexus.conversion.peak_rss import current_rss, peak_rss
    from nexus.conversion.teacher_source import load_teacher

    t0 = time.time()
    model, tokenizer = load_teacher(GGUF, dtype=torch.bfloat16, cache_root=GGUF_CACHE)
    model.eval()
    load_seconds = time.time() - t0
    seen, params, weight_bytes = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
            weight_bytes += p.numel() * p.element_size()
    record = {"vmhwm_loaded": peak_rss(), "rss_loaded": current_rss(), "params": params,
              "weight_bytes": weight_bytes, "dtype": str(model.dtype), "load_seconds": load_seconds,
              "vocab": len(tokenizer)}
    probes = make_probes(args.eval_items, "fp32")
    t0 = time.time()
    record["eval"] = evaluate(model, tokenizer, probes)
    record["eval_seconds"] = time.time() - t0
    record["baseline"] = {c: {"bpb": p.baseline()["score"], "bpb_ci": p.baseline()["ci"]} for c, p in probes.items()}
    print(CHILD_TAG + json.dumps(record), flush=True)


def run_teacher_child(args):
    cmd = [sys.executable, __file__, "--teacher-child", "--eval-items", str(args.eval_items),
           "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    raise RuntimeError(f"teacher child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------- 1-2: data


def training_chunks(cap, n, chunk_chars):
    """``n`` chunks of about ``chunk_chars`` characters spread evenly over the capability's train slice."""
    from nexus.conversion.corpora import corpus_text
    from nexus.conversion.training_text import text_chunks

    chunks = text_chunks(corpus_text(cap, "train"), chunk_chars)
    if len(chunks) <= n:
        return chunks
    return [chunks[i * len(chunks) // n] for i in range(n)]


def build_caches(args, chunks):
    """Teacher caches per capability (teacher loaded once, bf16 weights, fp32 matmuls); returns facts + tokenizer."""
    from nexus.conversion.peak_rss import peak_rss
    from nexus.conversion.probes.compute_mode import compute_context
    from nexus.conversion.teacher_source import load_teacher
    from nexus.training.teacher_cache import (
        CacheSettings,
        build_teacher_cache,
        model_fingerprint,
    )

    settings = CacheSettings(k=args.top_k, max_length=args.seq_len, tokens_per_shard=16384)
    paths = {c: WORK / "cache" / c for c in CAPS}
    if args.fresh_cache:
        for p in paths.values():
            shutil.rmtree(p, ignore_errors=True)
    previous = {}
    for c, p in paths.items():
        try:
            previous[c] = json.loads((p / "manifest.json").read_text()).get("key") if (p / "manifest.json").is_file() \
                else None
        except ValueError:
            previous[c] = None
    t0 = time.time()
    model, tokenizer = load_teacher(GGUF, dtype=torch.bfloat16, cache_root=GGUF_CACHE)
    model.eval()
    fingerprint = model_fingerprint(model)
    facts = {"load_seconds": time.time() - t0, "settings": settings.model_dump(mode="json"), "per_capability": {}}
    for cap in CAPS:
        t0 = time.time()
        with compute_context(model, "fp32"):  # bf16 weights, fp32 matmuls (the fast path on AVX2)
            cache = build_teacher_cache(paths[cap], model, chunks[cap], tokenizer=tokenizer, settings=settings,
                                        teacher_fingerprint=fingerprint, batch_size=args.cache_batch,
                                        description=f"teacher cache ({cap})")
        m = cache.manifest
        facts["per_capability"][cap] = {
            "path": str(paths[cap]), "windows": len(cache), "tokens": m["data"]["n_tokens"],
            "total_bytes": m["total_bytes"], "bytes_per_token": m["bytes_per_token"],
            "bytes_per_token_parts": m["bytes_per_token_parts"], "seconds": time.time() - t0,
            "reused": previous[cap] == cache.key and not cache.report,
            "teacher_tokens_per_second": m["data"]["n_tokens"] / max(time.time() - t0, 1e-9)}
        log(f"cache {cap}: {len(cache)} windows, {m['data']['n_tokens']:,} tokens, "
            f"{m['bytes_per_token']:.1f} bytes/token, {time.time() - t0:.0f}s")
    facts["peak_rss"] = peak_rss()
    del model
    trim_heap()
    return facts, tokenizer, paths


def make_rows(args, chunks, paths, teacher_tok, student_tok):
    from nexus.training.teacher_cache import open_teacher_cache
    from nexus.training.token_alignment import (
        VocabularyMismatchError,
        check_alignment_mode,
        token_aligned_rows,
        vocabulary_map,
    )

    try:
        check_alignment_mode("identity", teacher_tok, student_tok, teacher_name="gemma-3-270m")
        identity = "accepted"
    except VocabularyMismatchError as exc:
        identity = f"refused: {exc}"
    t0 = time.time()
    vmap = vocabulary_map(teacher_tok, student_tok)
    rows, reports = {}, {}
    for cap in CAPS:
        cache = open_teacher_cache(paths[cap])  # re-opened outside inference mode: its tensors feed the loss
        topk = []
        for w in cache:
            v = w["topk_values"].float()
            topk.append(torch.exp(torch.logsumexp(v, -1) - w["logsumexp"]).clamp(max=1.0))
        rows[cap], report = token_aligned_rows(chunks[cap], cache, teacher_tok, student_tok, args.seq_len,
                                               capability=0, vmap=vmap)
        reports[cap] = {**report.as_dict(), "teacher_topk_mass_mean": float(torch.cat(topk).mean())}
    return rows, {"identity_mode": identity, "mode": "token_aligned", "vocab_fraction_mapped": vmap.fraction_mapped,
                  "seconds": time.time() - t0, "per_capability": reports}


class MixedBatches:
    """``batches(i)``: rows ``order[i*B:(i+1)*B]`` where ``order`` concatenates seeded per-epoch permutations of all
    rows (prose and code together): a pure function of ``i``, so exact resume holds."""

    def __init__(self, rows, batch, seed=0):
        self.rows, self.batch, self.seed = rows, batch, seed
        self._epochs = {}

    def _epoch(self, e):
        if e not in self._epochs:
            self._epochs[e] = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + e))
        return self._epochs[e]

    def __call__(self, i):
        from nexus.training.token_alignment import collate_distill_rows

        n = len(self.rows)
        picks = [int(self._epoch(p // n)[p % n]) for p in range(i * self.batch, (i + 1) * self.batch)]
        return collate_distill_rows([self.rows[j] for j in picks])


# ---------------------------------------------------------------------------------------------- 4-5: training


def load_student():
    from nexus.modeling_nexus import NexusForCausalLM

    return NexusForCausalLM.from_pretrained(STUDENT, dtype=torch.float32)


def loss_module():
    from nexus.training.distill_losses import DistillLoss, LossMix

    return DistillLoss(LossMix(kd=1.0, ce=0.2, temperature=1.0))


def raw_round(model, batches, steps):
    """Plain forward + next-token CE + backward (no optimizer): tokens/s over non-padding tokens."""
    from nexus.training.distill_losses import next_token_ce

    model.train()
    tokens, start = 0, time.perf_counter()
    for i in range(steps):
        b = batches(i)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        next_token_ce(logits, b["labels"]).backward()
        model.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def engine_round(model, batches, steps, lr, loss=None):
    """`train_student` for ``steps`` steps (AdamW, clipping, no warm-up); its loop tokens/s (checkpoint excluded).

    ``loss``: the loss module (default `loss_module`: KD 1.0 + CE 0.2)."""
    from nexus.training.distill_engine import train_student
    from nexus.training.distill_options import EngineOptions

    run_dir = Path(tempfile.mkdtemp(prefix="distill_real_speed_"))
    try:
        opts = EngineOptions(steps=steps, lr=lr, checkpoint_every=steps, autocast="off",
                             gradient_checkpointing=model.is_activation_checkpointing)
        summary = train_student(model, loss if loss is not None else loss_module(), batches, opts, run_dir,
                                progress=False)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return summary["tokens_per_second"]


def throughput(args, batches):
    model = load_student()
    if args.gradient_checkpointing:  # raw rounds and engine rounds alike (train_student keeps it on)
        model.activation_checkpointing_enable()
    rounds = []
    for r in range(args.rounds):
        raw = raw_round(model, batches, args.round_steps)
        eng = engine_round(model, batches, args.round_steps, args.lr)
        rounds.append({"raw_fwd_bwd": raw, "engine": eng, "ratio": eng / raw})
        log(f"throughput round {r + 1}: raw fwd+bwd {raw:,.1f} tok/s, engine {eng:,.1f} tok/s, ratio {eng / raw:.3f}")
    del model
    trim_heap()
    return {"rounds": rounds, "raw_median": statistics.median(x["raw_fwd_bwd"] for x in rounds),
            "engine_median": statistics.median(x["engine"] for x in rounds),
            "ratio_median": statistics.median(x["ratio"] for x in rounds),
            "ratio_range": [min(x["ratio"] for x in rounds), max(x["ratio"] for x in rounds)],
            "batch": [args.batch, args.seq_len], "steps_per_round": args.round_steps}


def distill_run(args, batches, mode, probes, student_tok):
    from nexus.conversion.peak_rss import peak_rss, reset_peak_rss
    from nexus.training.distill_engine import train_student
    from nexus.training.distill_options import EngineOptions
    from nexus.training.preservation import Preservation, taylor_importance

    trim_heap()
    reset_peak_rss()
    model = load_student()
    model.train()
    loss = loss_module()
    importance, importance_seconds = None, 0.0
    if mode != "off":
        t0 = time.time()
        importance = taylor_importance(model, [batches(i) for i in range(2)], loss)
        importance_seconds = time.time() - t0
    preservation = Preservation({"mode": mode, "strength": args.strength}, importance)
    opts = EngineOptions(steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 10), autocast="off",
                         checkpoint_every=args.steps, keep_last=1, seed=0,
                         gradient_checkpointing=args.gradient_checkpointing)
    run_dir = Path(tempfile.mkdtemp(prefix=f"distill_real_{mode}_"))
    try:
        summary = train_student(model, loss, batches, opts, run_dir, preservation=preservation,
                                description=f"distill ({mode})")
        run_log = [json.loads(x) for x in (run_dir / "run_log.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    peak = peak_rss()
    del importance, preservation
    trim_heap()
    t0 = time.time()
    scores = evaluate(model, student_tok, probes)
    keep = ("steps", "tokens", "wall_seconds", "checkpoint_seconds", "tokens_per_second", "skipped_steps",
            "first_loss", "final_loss", "autocast", "threads")
    train = {k: summary[k] for k in keep}
    train["losses"] = summary["losses"]
    train["parts"] = [x.get("parts") for x in run_log if "loss" in x]
    del model
    trim_heap()
    return {"mode": mode, "strength": args.strength if mode == "lr_scale" else None, "train": train,
            "importance_seconds": importance_seconds, "peak_rss": peak, "eval": scores,
            "eval_seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------- 7: retention


def retention(teacher_eval, students):
    """Per capability and aggregated (min, mean) bpb retention with paired bootstrap CIs; paired Δbpb."""
    from nexus.conversion.retention import (
        aggregate,
        clamp_ci,
        item_rows,
        percentile_ci,
        resample_indices,
        resampled_scores,
        retention_samples,
        retention_value,
    )

    idx = {c: resample_indices(len(teacher_eval[c]["items"]), 1000, seed=i) for i, c in enumerate(CAPS)}
    rows = {name: {c: item_rows("lm", ev[c]["items"], "bpb") for c in CAPS} for name, ev in students.items()}
    t_rows = {c: item_rows("lm", teacher_eval[c]["items"], "bpb") for c in CAPS}
    for name in rows:
        for c in CAPS:
            if not np.array_equal(rows[name][c][:, 1], t_rows[c][:, 1]):
                raise RuntimeError(f"{name} / {c}: the student's items are not the teacher's (bytes differ)")
    out = {}
    for name in rows:
        values, samples, per = {}, {}, {}
        for c in CAPS:
            values[c] = retention_value(rows[name][c], t_rows[c], True)
            samples[c] = retention_samples(rows[name][c], t_rows[c], True, idx[c])
            per[c] = {"value": values[c], "ci": clamp_ci(values[c], percentile_ci(samples[c]))}
        out[name] = {"per_capability": per, **aggregate(samples, values)}
    deltas = {}
    base = "before"
    for name in rows:
        if name == base:
            continue
        pairs = [(name, base)] + ([(name, "after (off)")] if name != "after (off)" and "after (off)" in rows else [])
        for a, b in pairs:
            for c in CAPS:
                d = resampled_scores(rows[a][c], idx[c]) - resampled_scores(rows[b][c], idx[c])
                v = float(rows[a][c][:, 0].sum() / rows[a][c][:, 1].sum() - rows[b][c][:, 0].sum() / rows[b][c][:, 1].sum())
                deltas.setdefault(f"{a} - {b}", {})[c] = {"value": v, "ci": clamp_ci(v, percentile_ci(d))}
    return out, deltas


# ---------------------------------------------------------------------------------------------- tables


def _ci(v, ci, d=3):
    return f"{v:.{d}f} [{ci[0]:.{d}f}, {ci[1]:.{d}f}]" if ci else f"{v:.{d}f}"


def gb(x):
    return f"{x / 1e9:.3f} GB"


def print_tables(r):
    t = r["throughput"]
    tab = Table(title=f"Throughput: {t['batch'][0]} x {t['batch'][1]} tokens per step, {t['steps_per_round']} steps "
                      f"per measurement, {len(t['rounds'])} interleaved rounds, {r['threads']} thread, fp32")
    for col in ("round", "raw fwd+bwd tok/s", "engine (KD+CE, AdamW) tok/s", "engine / raw"):
        tab.add_column(col, justify="right")
    for i, x in enumerate(t["rounds"]):
        tab.add_row(str(i + 1), f"{x['raw_fwd_bwd']:.1f}", f"{x['engine']:.1f}", f"{x['ratio']:.3f}")
    tab.add_row("median", f"{t['raw_median']:.1f}", f"{t['engine_median']:.1f}",
                f"[bold]{t['ratio_median']:.3f}[/] (goal >= 0.8)")
    console.print(tab)

    m = r["memory"]
    tab = Table(title="Peak RSS (VmHWM) vs the largest single teacher + the student's training state")
    tab.add_column("quantity")
    tab.add_column("bytes", justify="right")
    tab.add_column("note")
    tab.add_row("teacher alone (fresh process: bf16 weights + tokenizer)", gb(m["teacher_alone"]),
                f"of which weights {gb(m['teacher_weight_bytes'])} ({m['teacher_params']:,} params, bf16)")
    tab.add_row("student training state (analytic)", gb(m["student_state"]),
                f"{m['student_params']:,} params x 4 B x (params, grads, AdamW m, v)")
    tab.add_row("denominator", gb(m["denominator"]), "")
    for k, v in m["phases"].items():
        tab.add_row(f"phase peak: {k}", gb(v), f"{v / m['denominator']:.3f} x denominator")
    tab.add_row("[bold]distill run peak (process VmHWM after cache + training, preservation off)",
                gb(m["distill_run_peak"]), f"[bold]{m['ratio']:.3f}[/] (goal <= 1.25)")
    console.print(tab)

    c = r["cache"]
    tab = Table(title=f"Teacher cache: top-{c['settings']['k']} logits (float16) + int32 ids + logsumexp + ids")
    for col in ("capability", "windows", "tokens", "bytes/token", "parts (bytes/token)", "teacher tok/s",
                "top-k mass", "aligned positions", "top-k mass kept in student vocab"):
        tab.add_column(col, justify="right")
    for cap, x in c["per_capability"].items():
        a = r["alignment"]["per_capability"][cap]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in x["bytes_per_token_parts"].items())
        tab.add_row(cap, str(x["windows"]), f"{x['tokens']:,}", f"{x['bytes_per_token']:.1f}", parts,
                    f"{x['teacher_tokens_per_second']:.1f}" + (" (reused)" if x["reused"] else ""),
                    f"{a['teacher_topk_mass_mean']:.3f}", f"{a['aligned_fraction']:.3f}", f"{a['mass_kept']:.3f}")
    console.print(tab)

    b = r["budget"]
    tab = Table(title=f"Held-out scores ({r['eval_items']} x 1000-char chunks per capability, bootstrap 95% CIs). "
                      f"Budget per run: {b['steps']} steps x {b['batch']} x {b['seq_len']} = {b['token_positions']:,} "
                      f"token positions ({b['tokens_trained']:,} non-padding) over {b['distinct_tokens']:,} distinct "
                      f"cached tokens")
    for col in ("model", "prose bpb", "code bpb", "prose top-1 acc", "code top-1 acc"):
        tab.add_column(col, justify="right")
    rows = [("teacher Gemma-3-270M", r["teacher"]["eval"]), *[(f"student {k}", v) for k, v in r["students"].items()]]
    for name, ev in rows:
        tab.add_row(name, *[_ci(ev[c]["bpb"], ev[c]["bpb_ci"]) for c in CAPS],
                    *[_ci(ev[c]["accuracy"], ev[c]["accuracy_ci"]) for c in CAPS])
    tab.add_row("unigram-over-bytes baseline", *[_ci(r["teacher"]["baseline"][c]["bpb"],
                                                     r["teacher"]["baseline"][c]["bpb_ci"]) for c in CAPS], "", "")
    console.print(tab)

    tab = Table(title="Retention = teacher bpb / student bpb (same chunks, paired bootstrap 95% CIs)")
    for col in ("student", "prose", "code", "min", "mean"):
        tab.add_column(col, justify="right")
    for name, x in r["retention"].items():
        tab.add_row(name, *[_ci(x["per_capability"][c]["value"], x["per_capability"][c]["ci"]) for c in CAPS],
                    _ci(x["min"]["value"], x["min"]["ci"]) + f" ({x['min']['capability']})",
                    _ci(x["mean"]["value"], x["mean"]["ci"]))
    console.print(tab)

    tab = Table(title="Paired change in student bpb (negative = better)")
    for col in ("comparison", "prose", "code"):
        tab.add_column(col, justify="right")
    for name, x in r["bpb_deltas"].items():
        tab.add_row(name, *[_ci(x[c]["value"], x[c]["ci"]) for c in CAPS])
    console.print(tab)

    tab = Table(title="Training runs")
    for col in ("preservation", "steps", "tokens", "first loss", "final loss", "skipped", "tok/s", "train s",
                "importance s", "peak RSS"):
        tab.add_column(col, justify="right")
    for run in r["runs"]:
        x = run["train"]
        tab.add_row(run["mode"] + (f" (strength {run['strength']})" if run["strength"] is not None else ""),
                    str(x["steps"]), f"{x['tokens']:,}", f"{x['first_loss']:.4f}", f"{x['final_loss']:.4f}",
                    str(x["skipped_steps"]), f"{x['tokens_per_second']:.1f}", f"{x['wall_seconds']:.0f}",
                    f"{run['importance_seconds']:.0f}", gb(run["peak_rss"]))
    console.print(tab)



def save(results):
    from nexus.conversion.atomic_output import atomic_file

    with atomic_file(RESULTS / "distill_real.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=str))


# ---------------------------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps of each distillation run")
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="student (and teacher) tokens per row")
    parser.add_argument("--windows", type=int, default=64, help="training chunks cached per capability")
    parser.add_argument("--chunk-chars", type=int, default=1000, help="characters per training chunk")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--cache-batch", type=int, default=1, help="windows per teacher forward while caching")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="peak AdamW learning rate (warm-up over a tenth of the steps, then cosine)")
    parser.add_argument("--strength", type=float, default=0.9, help="lr_scale preservation strength")
    parser.add_argument("--eval-items", type=int, default=16, help="held-out 1000-character chunks per capability")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--round-steps", type=int, default=3, help="steps per throughput measurement")
    parser.add_argument("--fresh-cache", action="store_true", help="rebuild the teacher cache even if it is valid")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute layer activations in the backward pass, in the throughput rounds (raw and "
                             "engine alike) and the distillation runs")
    parser.add_argument("--teacher-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.teacher_child:
        return teacher_child(args)
    torch.set_num_threads(args.threads)
    from nexus.conversion.peak_rss import peak_rss, reset_peak_rss
    from nexus.conversion.teacher_source import load_tokenizer

    start = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "teacher_source": GGUF,
               "student_source": str(STUDENT), "eval_items": args.eval_items, "seconds": {}}

    log("0. teacher alone (fresh child process): VmHWM after load, then held-out scores")
    t0 = time.time()
    teacher = run_teacher_child(args)
    results["teacher"] = teacher
    results["seconds"]["teacher_child"] = time.time() - t0
    log(f"teacher: VmHWM loaded {gb(teacher['vmhwm_loaded'])}; prose bpb {teacher['eval']['prose']['bpb']:.3f}, "
        f"code bpb {teacher['eval']['code']['bpb']:.3f} ({time.time() - t0:.0f}s)")

    log("1. teacher cache (one teacher resident, bf16 weights, fp32 matmuls)")
    t0 = time.time()
    reset_peak_rss()
    chunks = {c: training_chunks(c, args.windows, args.chunk_chars) for c in CAPS}
    cache, teacher_tok, paths = build_caches(args, chunks)
    results["cache"] = cache
    results["seconds"]["cache"] = time.time() - t0

    log("2. token-aligned rows in the student vocabulary")
    student_tok = load_tokenizer(STUDENT)
    rows, alignment = make_rows(args, chunks, paths, teacher_tok, student_tok)
    results["alignment"] = alignment
    log(f"alignment: identity mode {alignment['identity_mode'][:60]}...; "
        + ", ".join(f"{c}: {len(rows[c])} rows, aligned {a['aligned_fraction']:.3f}, mass kept {a['mass_kept']:.3f}"
                    for c, a in alignment["per_capability"].items()))
    all_rows = [r for pair in zip(rows["prose"], rows["code"]) for r in pair]
    batches = MixedBatches(all_rows, args.batch, seed=0)
    del teacher_tok
    trim_heap()

    log("3. student before distillation")
    t0 = time.time()
    probes = make_probes(args.eval_items, "native")
    model = load_student()
    params = sum(p.numel() for p in model.parameters())
    students = {"before": evaluate(model, student_tok, probes)}
    del model
    trim_heap()
    results["seconds"]["eval_before"] = time.time() - t0

    log("4. throughput: raw fwd+bwd vs the engine, interleaved")
    t0 = time.time()
    reset_peak_rss()
    results["throughput"] = throughput(args, batches)
    phase_peaks = {"teacher cache build (teacher resident)": cache["peak_rss"],
                   "throughput rounds": peak_rss()}
    results["seconds"]["throughput"] = time.time() - t0

    log(f"5. distillation: {args.steps} steps x {args.batch} x {args.seq_len}, preservation off, then lr_scale")
    runs = []
    for mode in ("off", "lr_scale"):
        t0 = time.time()
        run = distill_run(args, batches, mode, probes, student_tok)
        runs.append(run)
        students[f"after ({mode})"] = run["eval"]
        phase_peaks[f"training, preservation {mode}"] = run["peak_rss"]
        results["seconds"][f"run_{mode}"] = time.time() - t0
        log(f"run {mode}: loss {run['train']['first_loss']:.4f} -> {run['train']['final_loss']:.4f}; prose bpb "
            f"{run['eval']['prose']['bpb']:.3f}, code bpb {run['eval']['code']['bpb']:.3f} ({time.time() - t0:.0f}s)")
        if mode == "off":
            distill_peak = max(cache["peak_rss"], phase_peaks["throughput rounds"], run["peak_rss"])

    student_state = params * 4 * 4
    denominator = teacher["vmhwm_loaded"] + student_state
    results["memory"] = {"teacher_alone": teacher["vmhwm_loaded"], "teacher_weight_bytes": teacher["weight_bytes"],
                         "teacher_params": teacher["params"], "student_params": params, "student_state": student_state,
                         "denominator": denominator, "phases": phase_peaks, "distill_run_peak": distill_peak,
                         "ratio": distill_peak / denominator,
                         "note": "phase peaks are VmHWM after a reset at the phase start (clear_refs); the distill "
                                 "run peak is the largest of cache build, throughput rounds and the preservation-off "
                                 "training run"}
    steps_tokens = runs[0]["train"]["tokens"]
    results["budget"] = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                         "token_positions": args.steps * args.batch * args.seq_len, "tokens_trained": steps_tokens,
                         "distinct_tokens": sum(int(r["attention_mask"].sum()) for c in CAPS for r in rows[c]),
                         "windows_per_capability": {c: len(rows[c]) for c in CAPS}}
    results["retention"], results["bpb_deltas"] = retention(teacher["eval"], students)
    results["students"] = students
    results["runs"] = runs
    results["seconds"]["total"] = time.time() - start
    print_tables(results)
    save(results)
    console.print(f"total {results['seconds']['total']:.0f}s; wrote {RESULTS / 'distill_real.json'}")


if __name__ == "__main__":
    main()
