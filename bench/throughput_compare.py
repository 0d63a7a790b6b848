"""Distillation throughput and memory (issue 7, part 3): NEXUS vs TRL's `GKDTrainer` vs raw student fwd+bwd in ONE
run, and peak RSS with one teacher resident at a time vs all teachers loaded at once.

    OMP_NUM_THREADS=1 python bench/throughput_compare.py [--rounds 7] [--steps 32] [--batch 8] [--seq-len 128]
                                                         [--top-k 32] [--lr 1e-3] [--mem-windows 32]
                                                         [--mem-cache-batch 8] [--no-gemma] [--skip-memory]

**Pair.** GKD needs one shared tokenizer, so the pair is: teacher = the demo's code specialist
(``/work/cache/specialists/code``: Gemma-3 architecture, 4 layers, hidden 128, BPE-1024, fp32, 1.1M params);
student = a one-tower Nexus model with exactly the shape of the demo student's *code* tower (layer widths
heads 4/0/1/0, FFN 308/129/126/48, hidden 128; sliding window 64 as the teacher), built from the teacher by
`nexus_from_teacher` + `apply_prune_plan` (heads kept by index, FFN units by down-projection column norm), fp32,
same tokenizer. Saved to ``bench/out/throughput_compare/student`` for the memory children.

**Data.** ``--steps`` x ``--batch`` chunks (~``--chunk-chars`` characters, spread evenly over the bundled code *train*
slice, `distill_real.training_chunks`), tokenised by the shared tokenizer and cut to ``--seq-len`` tokens. Every
method trains on exactly the same ``--steps`` batches (batch i = rows i*B..(i+1)*B-1, same order), from the same
student init (a fresh copy per measurement), for the same number of steps; tokens = non-padding tokens, the same
count for every method.

**What each method does per step** (all fp32, 1 thread, no gradient checkpointing, AdamW betas (0.9, 0.98),
clip 1.0, constant-then-cosine LR irrelevant to speed):

- *raw fwd+bwd* (`distill_real.raw_round`): student forward + next-token CE + backward; no optimizer, no teacher.
- *NEXUS engine, excl. cache* (`distill_real.engine_round` -> `training.distill_engine.train_student`, as
  `nexus/conversion/distill.py` uses it): student forward + forward KL(teacher || student) on the *cached* teacher top-k
  (+ one tail bucket, `distill_losses.ForwardKLTopK`, T=1, no CE) + backward + clipping + AdamW + schedule + NaN
  guard + a run-log line. The teacher does NOT run: its top-k comes from the cache, already collated in memory.
- *NEXUS cache + rows*: `teacher_cache.build_teacher_cache` over the same windows (teacher forward, batch
  ``--batch``, top-k, safetensors shards + manifest written to disk) + `token_alignment.identity_rows` +
  `collate_distill_rows`, into a fresh temporary folder each round: the one-off cost the engine excludes.
- *NEXUS incl. cache, amortised*: tokens / (engine time + cache-and-rows time for the same tokens), i.e. every cached
  token trained on once (1 epoch), the least favourable case for a cache; more epochs divide the cache share
  (derived figures for 2, 4, 8 epochs are printed, computed from the measured medians).
- *TRL GKDTrainer* (trl.experimental.gkd, HF Trainer loop): student forward + teacher forward (no_grad, eval, fp32,
  full-vocabulary logits) + `generalized_jsd_loss` with ``beta=0`` (= forward KL(teacher || student) over the full
  vocabulary, T=1) + backward + clipping + AdamW + schedule. ``lmbda=0`` (no on-policy student generation),
  ``seq_kd=False``; ``gradient_checkpointing=False`` and ``bf16=False`` (TRL's SFTConfig defaults both to True).

Timing: the loop only for both trainers (NEXUS: the engine's own loop clock, checkpoint excluded; GKD: a
TrainerCallback from ``on_train_begin`` to ``on_train_end``); setup (accelerator, optimizer, Trainer construction) is
recorded separately as "whole call". One warm-up round (2 steps each, discarded), then ``--rounds`` rounds with the
order of the four measurements rotated each round. Ratios are medians of per-round ratios. An objective check
compares, on batch 0 from the student init, the NEXUS top-k forward KL with TRL's full-vocabulary loss.

**Memory** (each measurement a fresh child process; VmHWM, ``/proc/self/status``): the pipeline's teacher phase
is what the distill stage does: load a teacher (specialists fp32 as in the demo recipe, Gemma-3-270M bf16 via
`load_teacher(..., cache_root="/work/cache/gguf")`), build its top-k cache on ``--mem-windows`` chunks of its
capability's train data (400 characters, batch ``--mem-cache-batch``: the stage's defaults), then a few engine steps
of the student on the code teacher's rows. *One at a time*: each teacher is freed (and the heap trimmed) before the
next loads, as `conversion.distill.run_distill` does. *All resident*: every teacher is loaded first and stays
resident through caching and the student steps (what an online multi-teacher trainer holds). Also: the import
floor, and each teacher alone.

Writes ``bench/results/throughput_compare.json`` ({"tokens_per_s", "ratios", "peak_rss_mib", "config", ...}); prints
rich tables; asserts nothing. Speeds are only compared as ratios measured in this run.
"""

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from distill_real import engine_round, log, raw_round, training_chunks, trim_heap
from paths import ARTEFACTS, RESULTS
from rich.console import Console
from rich.table import Table

WORK = ARTEFACTS / "throughput_compare"
SPECIALISTS = Path("/work/cache/specialists")
GGUF = "/work/cache/gemma-3-270m-q4_k_m.gguf"
GGUF_CACHE = "/work/cache/gguf"
CHILD_TAG = "NEXUS_MEMORY_CHILD "
MIB = 1024 * 1024
console = Console(width=200)

# The demo student's code tower (`nexus demo`, student_build: dynamic allocation at 1/3 of the teachers' params):
# per layer (kept query heads, kept FFN units) out of the code specialist's (4 heads / 2 kv, 512 FFN units).
DEMO_CODE_TOWER = ((4, 308), (0, 129), (1, 126), (0, 48))

# name -> (source, capability whose train data it caches, dtype); the demo recipe loads the specialists in fp32,
# DESIGN's memory rule keeps a large teacher in bf16.
TEACHERS = {
    "arithmetic": (SPECIALISTS / "arithmetic", "arithmetic", torch.float32),
    "code": (SPECIALISTS / "code", "code", torch.float32),
    "prose": (SPECIALISTS / "prose", "prose", torch.float32),
    "gemma-3-270m": (Path(GGUF), "prose", torch.bfloat16),
}
METHODS = ("cache", "raw", "nexus", "gkd")


# ------------------------------------------------------------------------------------------------ the pair


def load_code_teacher():
    from nexus.conversion.teacher_source import load_teacher

    source, _, dtype = TEACHERS["code"]
    return load_teacher(source, dtype=dtype)


def build_student(teacher):
    """The demo's code-tower shape, sliced out of the imported teacher (fp32, one tower, the teacher's vocabulary)."""
    from nexus.conversion.structured_prune import PrunePlan, TowerPlan, apply_prune_plan
    from nexus.conversion.teacher_import import nexus_from_teacher

    full = nexus_from_teacher(teacher, name="code", capabilities=("code",)).float()
    layers = full.model.towers[0].layers
    if len(layers) != len(DEMO_CODE_TOWER):
        raise RuntimeError(f"the code specialist has {len(layers)} layers, the demo's code tower {len(DEMO_CODE_TOWER)}")
    heads, neurons = {}, {}
    for i, (n_heads, n_ffn) in enumerate(DEMO_CODE_TOWER):
        heads[i] = list(range(n_heads))
        norms = layers[i].mlp.down_proj.weight.detach().norm(dim=0)  # (intermediate,)
        neurons[i] = sorted(norms.topk(n_ffn).indices.tolist())
    student, notes = apply_prune_plan(full, PrunePlan(towers={0: TowerPlan(heads=heads, neurons=neurons)}))
    return student.float().train(), notes


def save_student(student, tokenizer):
    from nexus.conversion.atomic_output import atomic_dir

    target = WORK / "student"
    with atomic_dir(target, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def n_params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def kd_loss():
    """NEXUS's loss for the comparison: forward KL on the cached top-k only (T=1), matching GKD with beta=0."""
    from nexus.training.distill_losses import DistillLoss, LossMix

    return DistillLoss(LossMix(kd=1.0, ce=0.0, temperature=1.0))


# ------------------------------------------------------------------------------------------------ data


def cache_settings(args):
    from nexus.training.teacher_cache import CacheSettings

    return CacheSettings(k=args.top_k, max_length=args.seq_len, tokens_per_shard=16384)


def cache_and_rows(path, teacher, tokenizer, chunks, args, fingerprint, progress=False):
    """The NEXUS one-off work: the teacher's top-k cache on ``chunks`` + identity rows + collated batches."""
    from nexus.training.teacher_cache import build_teacher_cache
    from nexus.training.token_alignment import collate_distill_rows, identity_rows

    cache = build_teacher_cache(path, teacher, chunks, tokenizer=tokenizer, settings=cache_settings(args),
                                teacher_fingerprint=fingerprint, batch_size=args.batch, progress=progress,
                                description="teacher cache (code)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = identity_rows(cache, args.seq_len, capability=0, pad_id=pad, teacher_tokenizer=tokenizer,
                         student_tokenizer=tokenizer)
    batches = [collate_distill_rows(rows[i:i + args.batch]) for i in range(0, len(rows), args.batch)]
    return cache, rows, batches


class FixedBatches:
    """``batches(i)``: the i-th pre-collated batch (the same object every method trains on)."""

    def __init__(self, batches):
        self.batches = batches

    def __call__(self, i):
        return self.batches[i]

    def __len__(self):
        return len(self.batches)


def gkd_dataset(batches):
    """The same rows, in the same order, as a `datasets.Dataset` (sequential sampling gives the same batches)."""
    from datasets import Dataset

    cols = {"input_ids": [], "attention_mask": [], "labels": []}
    for b in batches:
        for k in cols:
            cols[k] += b[k].tolist()
    return Dataset.from_dict(cols)


def gkd_collate(features):
    return {k: torch.tensor([f[k] for f in features], dtype=torch.long)
            for k in ("input_ids", "attention_mask", "labels")}


def tokens_of(batches, steps):
    return sum(int(batches(i)["attention_mask"].sum()) for i in range(steps))


# ------------------------------------------------------------------------------------------------ one measurement each


def measure_cache(teacher, tokenizer, chunks, args, fingerprint):
    run_dir = Path(tempfile.mkdtemp(prefix="throughput_compare_cache_"))
    try:
        start = time.perf_counter()
        cache, _, batches = cache_and_rows(run_dir / "cache", teacher, tokenizer, chunks, args, fingerprint)
        seconds = time.perf_counter() - start
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "teacher_tokens": cache.manifest["data"]["n_tokens"]}


def measure_raw(base, batches, steps):
    model = copy.deepcopy(base).train()
    start = time.perf_counter()
    tps = raw_round(model, batches, steps)
    whole = time.perf_counter() - start
    tokens = tokens_of(batches, steps)
    return {"tokens": tokens, "seconds": tokens / tps, "tokens_per_s": tps, "whole_call_seconds": whole}


def measure_nexus(base, batches, steps, lr):
    model = copy.deepcopy(base).train()
    start = time.perf_counter()
    tps = engine_round(model, batches, steps, lr, loss=kd_loss())
    whole = time.perf_counter() - start
    tokens = tokens_of(batches, steps)
    return {"tokens": tokens, "seconds": tokens / tps, "tokens_per_s": tps, "whole_call_seconds": whole}


def gkd_classes():
    """(GKDConfig, GKDTrainer): trl >= 1 keeps them in trl.experimental.gkd, older releases at the top level."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def gkd_config(args, steps, output_dir):
    GKDConfig, _ = gkd_classes()
    return GKDConfig(
        output_dir=str(output_dir), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, max_length=args.seq_len, disable_dropout=True,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=steps, disable_tqdm=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
        dataloader_pin_memory=False, seed=0)


def measure_gkd(base, teacher, tokenizer, dataset, args, steps):
    from transformers import PrinterCallback, TrainerCallback

    _, GKDTrainer = gkd_classes()

    class LoopClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.begin = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.end = time.perf_counter()

    model = copy.deepcopy(base).train()
    clock = LoopClock()
    out_dir = Path(tempfile.mkdtemp(prefix="throughput_compare_gkd_"))
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():  # SFTConfig itself sets the renamed `gradient_checkpointing` field
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
            trainer = GKDTrainer(model=model, teacher_model=teacher, args=gkd_config(args, steps, out_dir),
                                 data_collator=gkd_collate, train_dataset=dataset.select(range(steps * args.batch)),
                                 processing_class=tokenizer, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # it prints the log dicts; the loop clock is ours
        result = trainer.train()
        whole = time.perf_counter() - start
        done = trainer.state.global_step
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if done != steps:
        raise RuntimeError(f"GKDTrainer ran {done} steps, expected {steps}")
    seconds = clock.end - clock.begin
    tokens = int(sum(sum(r) for r in dataset.select(range(steps * args.batch))["attention_mask"]))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "whole_call_seconds": whole,
            "train_loss": result.training_loss}


def objective_check(base, teacher, batch):
    """Both losses on batch 0 from the student init: NEXUS top-k forward KL vs TRL's full-vocabulary beta=0 loss."""
    from nexus.training.distill_losses import topk_forward_kl

    _, GKDTrainer = gkd_classes()

    model = copy.deepcopy(base).eval()
    with torch.no_grad():
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        mask = batch["teacher_topk_mask"].bool() & batch["attention_mask"].bool()
        nexus_topk = float(topk_forward_kl(s, batch["teacher_topk_values"], batch["teacher_topk_indices"], mask))
        gkd_full = float(GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels=batch["labels"][:, 1:],
                                                         beta=0.0))
        log_q, log_p = torch.log_softmax(t.float(), -1), torch.log_softmax(s.float(), -1)
        per = (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, T) full-vocabulary forward KL
        full_same_positions = float(per[mask].mean())
        mass = float(torch.logsumexp(t.float(), -1).neg().add(
            torch.logsumexp(batch["teacher_topk_values"], -1)).exp()[mask].mean())
    return {"nexus_topk_forward_kl": nexus_topk, "gkd_full_vocab_beta0": gkd_full,
            "full_vocab_forward_kl_nexus_positions": full_same_positions, "teacher_topk_mass_mean": mass,
            "positions": {"nexus": int(mask.sum()), "gkd": int((batch["labels"][:, 1:] != -100).sum())}}


# ------------------------------------------------------------------------------------------------ throughput


def throughput(args):
    from nexus.training.teacher_cache import model_fingerprint

    torch.manual_seed(0)
    teacher, tokenizer = load_code_teacher()
    teacher.float().eval()
    base, notes = build_student(teacher)
    student_path = save_student(base, tokenizer)
    fingerprint = model_fingerprint(teacher)
    n_rows = args.steps * args.batch
    chunks = training_chunks("code", n_rows, args.chunk_chars)
    if len(chunks) < n_rows:
        raise RuntimeError(f"the code train slice gives {len(chunks)} chunks of {args.chunk_chars} characters; "
                           f"{n_rows} are needed (lower --steps or --chunk-chars)")
    log(f"teacher {n_params(teacher):,} params, student {n_params(base):,} params "
        f"({'; '.join(notes) or 'no notes'}); {n_rows} rows of <= {args.seq_len} tokens")
    cache_dir = WORK / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    _, rows, collated = cache_and_rows(cache_dir, teacher, tokenizer, chunks, args, fingerprint, progress=True)
    batches = FixedBatches(collated)
    dataset = gkd_dataset(collated)
    full_rows = sum(int(r["attention_mask"].sum()) == args.seq_len for r in rows)
    check = objective_check(base, teacher, batches(0))
    log(f"objective on batch 0: NEXUS top-{args.top_k} forward KL {check['nexus_topk_forward_kl']:.4f}, GKD "
        f"full-vocab (beta=0) {check['gkd_full_vocab_beta0']:.4f}")

    def run(method, steps, chunk_list):
        if method == "cache":
            return measure_cache(teacher, tokenizer, chunk_list, args, fingerprint)
        if method == "raw":
            return measure_raw(base, batches, steps)
        if method == "nexus":
            return measure_nexus(base, batches, steps, args.lr)
        return measure_gkd(base, teacher, tokenizer, dataset, args, steps)

    log("warm-up round (2 steps each, discarded)")
    for m in METHODS:
        run(m, 2, chunks[:2 * args.batch])
    trim_heap()
    rounds = []
    for r in range(args.rounds):
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
        got = {m: run(m, args.steps, chunks) for m in order}
        trim_heap()
        tokens = got["nexus"]["tokens"]
        if {got[m]["tokens"] for m in METHODS} != {tokens}:
            raise RuntimeError(f"token counts differ between methods: { {m: got[m]['tokens'] for m in METHODS} }")
        incl = tokens / (got["nexus"]["seconds"] + got["cache"]["seconds"])
        rounds.append({"order": list(order), **got, "nexus_incl_cache": {"tokens": tokens, "tokens_per_s": incl},
                       "threads_after": torch.get_num_threads()})
        log(f"round {r + 1} ({' > '.join(order)}): raw {got['raw']['tokens_per_s']:,.0f}, NEXUS excl. cache "
            f"{got['nexus']['tokens_per_s']:,.0f}, incl. {incl:,.0f}, GKD {got['gkd']['tokens_per_s']:,.0f}, "
            f"cache+rows {got['cache']['tokens_per_s']:,.0f} tok/s")
    return rounds, {"teacher_params": n_params(teacher), "student_params": n_params(base),
                    "student_path": str(student_path), "prune_notes": notes, "rows": len(rows),
                    "rows_full_length": full_rows, "objective_check": check,
                    "student_layers": [{"heads": h, "ffn": f} for h, f in DEMO_CODE_TOWER]}


def summarise(rounds):
    med = statistics.median
    keys = {"raw_fwd_bwd": "raw", "nexus_excl_cache": "nexus", "nexus_incl_cache_1_epoch": "nexus_incl_cache",
            "gkd_trainer": "gkd", "nexus_cache_and_rows": "cache"}
    tps = {k: med(r[m]["tokens_per_s"] for r in rounds) for k, m in keys.items()}
    per_round = {k: [r[m]["tokens_per_s"] for r in rounds] for k, m in keys.items()}
    pairs = {"nexus_excl_cache / gkd": ("nexus", "gkd"), "nexus_incl_cache / gkd": ("nexus_incl_cache", "gkd"),
             "nexus_excl_cache / raw_fwd_bwd": ("nexus", "raw"), "nexus_incl_cache / raw_fwd_bwd":
             ("nexus_incl_cache", "raw"), "gkd / raw_fwd_bwd": ("gkd", "raw")}
    ratios, ranges = {}, {}
    for name, (a, b) in pairs.items():
        values = [r[a]["tokens_per_s"] / r[b]["tokens_per_s"] for r in rounds]
        ratios[name] = med(values)
        ranges[name] = [min(values), max(values)]
    # derived (from the measured medians): the cache is built once and read for E epochs
    t_train, t_cache = 1 / tps["nexus_excl_cache"], 1 / tps["nexus_cache_and_rows"]
    epochs = {str(e): {"tokens_per_s": 1 / (t_train + t_cache / e),
                       "ratio_to_gkd": (1 / (t_train + t_cache / e)) / tps["gkd_trainer"]} for e in (1, 2, 4, 8)}
    whole = {k: med(r[m]["whole_call_seconds"] for r in rounds) for k, m in
             (("raw_fwd_bwd", "raw"), ("nexus_engine", "nexus"), ("gkd_trainer", "gkd"))}
    loop = {k: med(r[m]["seconds"] for r in rounds) for k, m in
            (("raw_fwd_bwd", "raw"), ("nexus_engine", "nexus"), ("gkd_trainer", "gkd"),
             ("nexus_cache_and_rows", "cache"))}
    return tps, per_round, ratios, ranges, epochs, {"loop_seconds_median": loop, "whole_call_seconds_median": whole}


# ------------------------------------------------------------------------------------------------ memory (children)


def teacher_chunks(name, n, chunk_chars):
    from nexus.conversion.training_text import training_text

    cap = TEACHERS[name][1]
    if cap == "arithmetic":
        return training_text("arithmetic", "bundled:arithmetic", items=n).chunks[:n]
    return training_chunks(cap, n, chunk_chars)


def load_named_teacher(name):
    from nexus.conversion.teacher_source import load_teacher

    source, _, dtype = TEACHERS[name]
    kwargs = {"cache_root": GGUF_CACHE} if str(source).endswith(".gguf") else {}
    return load_teacher(source, dtype=dtype, **kwargs)


def child_cache(name, model, tokenizer, root, args):
    from nexus.training.teacher_cache import (
        CacheSettings,
        build_teacher_cache,
        model_fingerprint,
    )

    max_len = min(int(getattr(model.config, "max_position_embeddings", 256) or 256), 256)
    settings = CacheSettings(k=args.top_k, max_length=max_len, tokens_per_shard=16384)
    return build_teacher_cache(root / name, model, teacher_chunks(name, args.mem_windows, 400), tokenizer=tokenizer,
                               settings=settings, teacher_fingerprint=model_fingerprint(model),
                               batch_size=args.mem_cache_batch, progress=False)


def memory_child(args):
    """A fresh process: the teacher phase (one at a time, or all resident) + a few student steps; prints VmHWM."""
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401 -- every child pays the same imports before the first reading
    from nexus.conversion.peak_rss import current_rss, peak_rss, release_freed_memory
    from nexus.modeling_nexus import NexusForCausalLM
    from nexus.training.distill_engine import train_student
    from nexus.training.distill_options import EngineOptions
    from nexus.training.token_alignment import collate_distill_rows, identity_rows

    mode, names = args.memory_child, [n for n in args.teachers.split(",") if n]
    record = {"mode": mode, "teachers": names, "phases": [], "weights": {}}

    def mark(label):
        record["phases"].append({"label": label, "rss": current_rss(), "vmhwm": peak_rss()})

    mark("imports")
    root = Path(tempfile.mkdtemp(prefix="throughput_compare_mem_"))
    try:
        code_cache, code_tok = None, None
        resident = {}
        if mode == "all_resident":
            for n in names:
                resident[n] = load_named_teacher(n)
                mark(f"loaded {n}")
        for n in names:
            model, tok = resident[n] if mode == "all_resident" else load_named_teacher(n)
            if mode != "all_resident":
                mark(f"loaded {n}")
            record["weights"][n] = {"params": n_params(model), "bytes": sum(p.numel() * p.element_size() for p in
                                                                            {id(p): p for p in model.parameters()}.values()),
                                    "dtype": str(model.dtype)}
            cache = child_cache(n, model, tok, root, args)
            mark(f"cached {n}")
            if n == "code":
                code_cache, code_tok = cache, tok
            if mode != "all_resident":
                del model, tok
                release_freed_memory()
                mark(f"freed {n}")
        if mode in ("one_at_a_time", "all_resident") and code_cache is not None:
            student = NexusForCausalLM.from_pretrained(WORK / "student", dtype=torch.float32)
            rows = identity_rows(code_cache, args.seq_len, capability=0, pad_id=code_tok.pad_token_id or 0,
                                 teacher_tokenizer=code_tok, student_tokenizer=code_tok)
            batches = FixedBatches([collate_distill_rows(rows[i:i + args.batch])
                                    for i in range(0, len(rows) - args.batch + 1, args.batch)])
            steps = min(4, len(batches))
            train_student(student, kd_loss(), batches, EngineOptions(steps=steps, checkpoint_every=steps,
                                                                     autocast="off"), root / "engine", progress=False)
            mark(f"student {steps} engine steps")
        record["vmhwm"] = peak_rss()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(CHILD_TAG + json.dumps(record), flush=True)


def run_memory_child(mode, names, args):
    cmd = [sys.executable, __file__, "--memory-child", mode, "--teachers", ",".join(names), "--threads",
           str(args.threads), "--top-k", str(args.top_k), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           "--mem-windows", str(args.mem_windows), "--mem-cache-batch", str(args.mem_cache_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            record = json.loads(line[len(CHILD_TAG):])
            record["seconds"] = time.time() - start
            log(f"memory child {mode} [{', '.join(names) or '-'}]: VmHWM {record['vmhwm'] / MIB:,.0f} MiB "
                f"({record['seconds']:.0f}s)")
            return record
    raise RuntimeError(f"memory child {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def memory(args):
    names = [n for n in TEACHERS if n != "gemma-3-270m" or not args.no_gemma]
    if "gemma-3-270m" in names and not Path(GGUF).is_file():
        log(f"[yellow]{GGUF} is missing: Gemma-3-270M left out of the memory comparison")
        names.remove("gemma-3-270m")
    children = {"floor": run_memory_child("floor", [], args)}
    for n in names:
        children[f"alone: {n}"] = run_memory_child("alone", [n], args)
    children["one_at_a_time"] = run_memory_child("one_at_a_time", names, args)
    children["all_resident"] = run_memory_child("all_resident", names, args)
    peak = {k: v["vmhwm"] / MIB for k, v in children.items()}
    weights = children["all_resident"]["weights"]
    summary = {
        "teachers": names,
        "peak_rss_mib": peak,
        "ratio_all_resident_to_one_at_a_time": peak["all_resident"] / peak["one_at_a_time"],
        "above_floor_mib": {k: v - peak["floor"] for k, v in peak.items() if k != "floor"},
        "ratio_above_floor": (peak["all_resident"] - peak["floor"]) / (peak["one_at_a_time"] - peak["floor"]),
        "one_at_a_time_minus_largest_alone_mib": peak["one_at_a_time"] - max(peak[f"alone: {n}"] for n in names),
        "teacher_weights_mib": {n: w["bytes"] / MIB for n, w in weights.items()},
        "teacher_weights_sum_mib": sum(w["bytes"] for w in weights.values()) / MIB,
        "children": children,
    }
    return summary


# ------------------------------------------------------------------------------------------------ tables


def print_tables(r):
    c = r["config"]
    t = Table(title=f"Distillation throughput, tokens/s (teacher: code specialist {c['teacher_params']:,} params; "
                    f"student: demo code-tower shape {c['student_params']:,} params; {c['steps']} steps x "
                    f"{c['batch']} x {c['seq_len']} tokens per measurement; {c['threads']} thread, fp32)")
    for col in ("round", "order", "raw fwd+bwd", "NEXUS excl. cache", "NEXUS cache+rows", "NEXUS incl. cache (1 ep)",
                "TRL GKDTrainer", "NEXUS excl / GKD", "NEXUS incl / GKD"):
        t.add_column(col, justify="right")
    for i, x in enumerate(r["rounds"]):
        t.add_row(str(i + 1), ">".join(x["order"]), f"{x['raw']['tokens_per_s']:,.0f}",
                  f"{x['nexus']['tokens_per_s']:,.0f}", f"{x['cache']['tokens_per_s']:,.0f}",
                  f"{x['nexus_incl_cache']['tokens_per_s']:,.0f}", f"{x['gkd']['tokens_per_s']:,.0f}",
                  f"{x['nexus']['tokens_per_s'] / x['gkd']['tokens_per_s']:.3f}",
                  f"{x['nexus_incl_cache']['tokens_per_s'] / x['gkd']['tokens_per_s']:.3f}")
    s = r["tokens_per_s"]
    t.add_row("[bold]median", "", f"{s['raw_fwd_bwd']:,.0f}", f"{s['nexus_excl_cache']:,.0f}",
              f"{s['nexus_cache_and_rows']:,.0f}", f"{s['nexus_incl_cache_1_epoch']:,.0f}", f"{s['gkd_trainer']:,.0f}",
              f"[bold]{r['ratios']['nexus_excl_cache / gkd']:.3f}", f"[bold]{r['ratios']['nexus_incl_cache / gkd']:.3f}")
    console.print(t)

    t = Table(title="Ratios (median of per-round ratios, \\[min, max] over rounds)")
    t.add_column("ratio")
    t.add_column("value", justify="right")
    for k, v in r["ratios"].items():
        lo, hi = r["ratio_ranges"][k]
        t.add_row(k, f"{v:.3f} [{lo:.3f}, {hi:.3f}]")
    for e, v in r["amortised_by_epochs"].items():
        t.add_row(f"nexus incl. cache / gkd, cache read for {e} epoch(s) (derived from medians)",
                  f"{v['ratio_to_gkd']:.3f} ({v['tokens_per_s']:,.0f} tok/s)")
    console.print(t)

    o = r["objective_check"]
    console.print(f"objective on batch 0 from the student init: NEXUS top-{c['top_k']} forward KL "
                  f"{o['nexus_topk_forward_kl']:.4f} ({o['positions']['nexus']} positions); full-vocabulary forward "
                  f"KL at the same positions {o['full_vocab_forward_kl_nexus_positions']:.4f}; TRL GKD beta=0 "
                  f"{o['gkd_full_vocab_beta0']:.4f} ({o['positions']['gkd']} positions, shifted); teacher top-k mass "
                  f"{o['teacher_topk_mass_mean']:.4f}")
    w = r["seconds_per_measurement"]
    console.print("median seconds per measurement, loop (whole call incl. setup): " + ", ".join(
        f"{k} {w['loop_seconds_median'][k]:.2f}" + (f" ({w['whole_call_seconds_median'][k]:.2f})"
                                                    if k in w["whole_call_seconds_median"] else "")
        for k in w["loop_seconds_median"]))

    m = r.get("memory")
    if m:
        t = Table(title="Peak RSS (VmHWM, each a fresh child process): teacher phase = load + top-k cache on "
                        f"{c['mem_windows']} chunks per teacher, then 4 engine steps of the student")
        for col in ("measurement", "peak RSS MiB", "above the import floor MiB", "note"):
            t.add_column(col, justify="right" if col != "note" else "left")
        for k, v in m["peak_rss_mib"].items():
            note = ""
            if k.startswith("alone: "):
                n = k[len("alone: "):]
                note = f"weights {m['teacher_weights_mib'][n]:,.1f} MiB"
            elif k == "one_at_a_time":
                note = (f"{m['one_at_a_time_minus_largest_alone_mib']:+,.0f} MiB vs the largest teacher alone")
            elif k == "all_resident":
                note = (f"[bold]{m['ratio_all_resident_to_one_at_a_time']:.3f} x one at a time[/] "
                        f"({m['ratio_above_floor']:.3f} x above the floor); teachers' weights sum "
                        f"{m['teacher_weights_sum_mib']:,.1f} MiB")
            t.add_row(k, f"{v:,.0f}", "" if k == "floor" else f"{m['above_floor_mib'][k]:,.0f}", note)
        console.print(t)


def save(results):
    from nexus.conversion.atomic_output import atomic_file

    with atomic_file(RESULTS / "throughput_compare.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=str))


# ------------------------------------------------------------------------------------------------ main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per measurement (= distinct batches)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (the demo's distill batch_size)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row (the teacher's context is 128)")
    parser.add_argument("--chunk-chars", type=int, default=800, help="characters per training chunk")
    parser.add_argument("--top-k", type=int, default=32, help="teacher logits kept per token in the NEXUS cache")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mem-windows", type=int, default=32, help="memory: chunks cached per teacher")
    parser.add_argument("--mem-cache-batch", type=int, default=8, help="memory: windows per teacher forward")
    parser.add_argument("--no-gemma", action="store_true", help="memory: leave Gemma-3-270M out")
    parser.add_argument("--skip-memory", action="store_true", help="throughput only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", choices=("floor", "alone", "one_at_a_time", "all_resident"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--teachers", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental (trl 1.x)
    import trl

    start = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    log(f"throughput: {args.rounds} interleaved rounds of raw / NEXUS engine / NEXUS cache / TRL GKDTrainer "
        f"(trl {trl.__version__})")
    rounds, facts = throughput(args)
    tps, per_round, ratios, ranges, epochs, seconds = summarise(rounds)
    results = {
        "tokens_per_s": tps,
        "ratios": ratios,
        "ratio_ranges": ranges,
        "amortised_by_epochs": epochs,
        "tokens_per_s_per_round": per_round,
        "seconds_per_measurement": seconds,
        "objective_check": facts.pop("objective_check"),
        "rounds": rounds,
        "config": {
            **facts, "rounds": args.rounds, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
            "chunk_chars": args.chunk_chars, "top_k": args.top_k, "lr": args.lr, "threads": torch.get_num_threads(),
            "mem_windows": args.mem_windows, "mem_cache_batch": args.mem_cache_batch,
            "teacher": str(TEACHERS["code"][0]), "torch": torch.__version__, "trl": trl.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "dtype": "fp32",
            "per_step": {
                "raw_fwd_bwd": "student forward + next-token CE + backward; no optimizer, no teacher",
                "nexus_excl_cache": "student forward + forward KL on the cached teacher top-k (+ tail bucket, T=1) + "
                                    "backward + clip + AdamW + schedule + NaN guard + run-log line; no teacher "
                                    "forward (train_student, bench/distill_real.engine_round)",
                "nexus_cache_and_rows": "teacher forward (batch = --batch) + top-k + safetensors shards/manifest on "
                                        "disk + identity rows + collation, for the same tokens, once",
                "nexus_incl_cache_1_epoch": "tokens / (engine time + cache-and-rows time), each cached token "
                                            "trained on once",
                "gkd_trainer": "student forward + teacher forward (no_grad, full logits) + full-vocabulary "
                               "generalized JSD with beta=0 (forward KL, T=1) + backward + clip + AdamW + schedule "
                               "(HF Trainer); lmbda=0 (no on-policy generation), seq_kd off, no gradient "
                               "checkpointing, fp32",
            },
        },
    }
    if not args.skip_memory:
        log("memory: fresh child processes")
        results["memory"] = memory(args)
        results["peak_rss_mib"] = results["memory"]["peak_rss_mib"]
    else:
        results["peak_rss_mib"] = {}
    results["seconds_total"] = time.time() - start
    print_tables(results)
    save(results)
    console.print(f"total {results['seconds_total']:.0f}s; wrote {RESULTS / 'throughput_compare.json'}")


if __name__ == "__main__":
    main()
