"""Compression on a real teacher (issue 4): Gemma-3-270M pruned to 50% of its non-embedding parameters plus
vocabulary trimming, capability-weighted importance vs every baseline; the trimmed tokenizer; a fresh-process load
of the pruned checkpoint; activation-aware vs plain SVD at equal rank; OT merging of two specialists.

    python bench/compress_real.py [--gguf /work/cache/gemma-3-270m-q4_k_m.gguf] [--eval-items 16]
                                  [--calibration-tokens 4096] [--ot-steps 200] [--different-init]
                                  [--skip-gemma] [--skip-ot] [--skip-low-rank] [--threads 1]

1. **Pruning table** (acceptance 1). Capabilities: prose and code (weights 1 and 1); importance and vocabulary come
   from their *training* slices (``corpus_text(name, "train")``), evaluation is the `lm` probe on the held-out
   slices (next-token accuracy and bits per byte, bootstrap 95% CIs over 1000-character chunks), right after
   pruning, with no training. Every row is the same pruner (`budget.allocate` + `apply_prune_plan`) with another
   scorer and/or per-layer allocation, at the same budget: the headline row is the stage's default (capability
   scores, ``allocation=auto``: uniform or dynamic with bounded per-layer deviation, whichever has the lowest loss
   on 1024 further *training* tokens per capability); the other capability rows fix the allocation, and the
   baselines run with dynamic and uniform widths. "Δbpb" is the paired bootstrap difference to the headline row on
   the same chunks (positive = worse than capability-weighted).
2. **Tokenizer** (acceptance 2): the trimmed tokenizer vs the original on the kept domain (training text: identical
   tokens modulo the id remap, identical decoding) and on held-out text (decoding; share of tokens changed).
3. **Fresh process** (acceptance 3): the capability-pruned checkpoint (written by `compress.write_compressed`) is
   loaded by ``AutoModelForCausalLM`` in a child process that cannot import the project; its parameter count and
   safetensors size are compared with ``compress.json``.
4. **OT merge** (acceptance 4): pairs of byte-level Llama specialists (prose, code) trained here with plain torch:
   from ONE seed initialisation directly, and from one shared base first trained briefly on both corpora (two
   fine-tunes of one base, the case averaging is meant for); with ``--different-init`` also from two inits. Bits per
   byte on both held-out sets for each teacher, naive averaging and the OT merge.
5. **Manifold vs plain SVD** (acceptance 5): every projection of the (vocabulary-trimmed) teacher replaced by its
   rank-r reconstruction, r set so the factors would hold ``keep`` of the parameters, activation-aware (SVD-LLM
   whitening by the capability-weighted input covariance) vs plain weight SVD at the same r.

Writes bench/results/compress_real.json (and the checkpoint in bench/out/compress_gemma/). Prints figures; asserts
nothing. ``--autocast auto`` (the default) times one Gemma-sized linear in fp32 and under bf16 autocast at start-up
and uses bf16 only when it is faster on this CPU (on an AVX2-only CPU without bf16 instructions it is ~7x slower);
the tiny specialists always run in fp32. 1 thread by default (--threads).
"""

import argparse
import copy
import gc
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from nexus.conversion.atomic_output import atomic_file
from nexus.conversion.bootstrap import bootstrap_ci
from nexus.conversion.budget import AllocationOptions, allocate, config_parameter_count, resolve_budget
from nexus.conversion.calibration import token_windows
from nexus.conversion.compress import CompressOptions, _after_tokens, _kept_record, select_allocation, write_compressed
from nexus.conversion.corpora import corpus_text
from nexus.conversion.decoder_units import DecoderUnits
from nexus.conversion.importance import make_scorer
from nexus.conversion.low_rank import input_covariances, low_rank_model, weighted_covariances
from nexus.conversion.ot_merge import average_models, ot_merge
from nexus.conversion.probes import ProbeSettings, probe_class
from nexus.conversion.structure_statistics import collect_structure_statistics
from nexus.conversion.structured_prune import PrunePlan, apply_prune_plan, parameter_count
from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.conversion.teacher_source import load_teacher
from nexus.conversion.vocab_trim import check_same_encoding, kept_vocabulary, trim_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import ARTEFACTS, RESULTS  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CAPS = ("prose", "code")
HEADLINE = "capability (auto allocation)"
NO_FEATURE_MAP = "no localisation feature map: capability importance = gradient-Taylor + activation"
WEIGHTS = {"prose": 1.0, "code": 1.0}
LN2 = math.log(2.0)
console = Console(width=200)


def log(msg):
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)


# ---------------------------------------------------------------------------------------------- evaluation


def bf16_speedup(reps=10):
    """fp32 time / bf16-autocast time of a (256 x 640) @ (640 x 2048) linear, CPU seconds, measured here."""
    x, w = torch.randn(256, 640), torch.randn(2048, 640)
    times = {}
    for enabled in (False, True, False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            t0 = time.process_time()
            for _ in range(reps):
                F.linear(x, w)
            times[enabled] = time.process_time() - t0  # the second round (warm) counts
    return times[False] / times[True]


def make_probes(items, autocast):
    settings = ProbeSettings(max_items=items, n_bootstrap=1000, seed=0, batch_size=4, window_tokens=256,
                             autocast=autocast)
    return {c: probe_class("lm")(f"bundled:{c}", {"primary": "bpb"}, settings).load() for c in CAPS}


def evaluate(model, tokenizer, probes):
    out = {}
    for cap, probe in probes.items():
        result = probe.score(model, tokenizer)
        s = result.summary
        out[cap] = {"bpb": s["bpb"], "bpb_ci": s["bpb_ci"], "accuracy": s["accuracy"],
                    "accuracy_ci": s["accuracy_ci"], "tokens": s["tokens"],
                    "items": [[i["nll"], i["bytes"]] for i in result.items]}
    return out


def paired_bpb_difference(a_items, b_items):
    """bpb(a) - bpb(b) on the same chunks, with a paired bootstrap CI."""
    rows = np.concatenate([np.asarray(a_items), np.asarray(b_items)[:, :1]], 1)  # nll_a, bytes, nll_b

    def stat(r):
        return (r[:, 0].sum() - r[:, 2].sum()) / (LN2 * r[:, 1].sum())

    return float(stat(rows)), list(bootstrap_ci(rows, n=1000, seed=0, stat=stat))


# ---------------------------------------------------------------------------------------------- part 1-3: Gemma


def gemma_pruning(args, results):
    gguf = Path(args.gguf)
    t0 = time.time()
    hf, tokenizer = load_teacher(gguf, dtype=torch.float32, cache_root="/work/cache/gguf")
    log(f"loaded Gemma-3-270M ({time.time() - t0:.0f}s)")
    probes = make_probes(args.eval_items, args.use_autocast)
    t0 = time.time()
    teacher_eval = evaluate(hf, tokenizer, probes)
    log(f"teacher evaluated ({time.time() - t0:.0f}s)")
    teacher = nexus_from_teacher(hf, name="gemma", capabilities=list(CAPS))
    del hf
    gc.collect()
    counts = {"teacher": config_parameter_count(teacher.config)}

    # vocabulary (acceptance 2)
    train = {c: corpus_text(c, "train") for c in CAPS}
    t0 = time.time()
    trim = kept_vocabulary(tokenizer, list(train.values()))
    tmp_tok = ARTEFACTS / "compress_tokenizer"
    student_tok = trim_tokenizer(tokenizer, trim, tmp_tok, check_texts=list(train.values()))
    tok_report = {"summary": trim.summary(), "seconds": round(time.time() - t0, 1),
                  "kept_domain_identical": True}  # trim_tokenizer raises otherwise
    check_same_encoding(tokenizer, student_tok, trim, list(train.values()))
    remap = trim.remap
    for c in CAPS:
        text = corpus_text(c, "heldout")
        old = tokenizer(text, add_special_tokens=False)["input_ids"]
        new = student_tok(text, add_special_tokens=False)["input_ids"]
        tok_report[f"heldout_{c}"] = {
            "decodes_identically": student_tok.decode(new) == tokenizer.decode(old) == text,
            "original_tokens": len(old), "trimmed_tokens": len(new),
            "original_tokens_outside_kept_vocab": sum(i not in remap for i in old) / len(old)}
    results["tokenizer"] = tok_report
    trimmed, _ = apply_prune_plan(teacher, PrunePlan(vocab=trim.kept_ids))
    del teacher
    gc.collect()
    counts["after_vocab_trim"] = config_parameter_count(trimmed.config)
    results["params"] = counts
    log(f"vocabulary {trim.original_size:,} -> {len(trim.kept_ids):,}; params {counts['teacher']['total']:,} -> "
        f"{counts['after_vocab_trim']['total']:,}")

    rows = {"teacher (full vocabulary)": {"params": counts["teacher"], "eval": teacher_eval}}
    t0 = time.time()
    rows["teacher + vocabulary trim"] = {"params": counts["after_vocab_trim"],
                                         "eval": evaluate(trimmed, student_tok, probes)}
    log(f"trimmed teacher evaluated ({time.time() - t0:.0f}s)")

    # importance statistics: one forward/backward pass per calibration window, shared by the scorers that use it
    windows = {c: token_windows(student_tok, train[c], args.calibration_tokens, 256) for c in CAPS}
    t0 = time.time()
    stats = {c: collect_structure_statistics(trimmed, windows[c], gradients=True, batch_size=2,
                                             autocast=args.use_autocast) for c in CAPS}
    stats_seconds = time.time() - t0
    log(f"importance statistics on {sum(s.tokens for s in stats.values()):,} tokens ({stats_seconds:.0f}s)")
    feature_map = None
    if args.feature_map:
        from nexus.conversion.compress import feature_map_scores
        from nexus.conversion.feature_map import load_feature_map

        feature_map = feature_map_scores(load_feature_map(args.feature_map), args.feature_map_teacher,
                                         DecoderUnits(trimmed)) or None
    results["feature_map"] = args.feature_map if feature_map else None

    budget = resolve_budget(fraction=0.5, counts="non_embedding", teacher_counts=counts["teacher"])
    units = DecoderUnits(trimmed)
    # every scorer through the same pruner; allocation variants separate "what to keep" from "where"
    selection = {c: token_windows(student_tok, _after_tokens(student_tok, train[c], args.calibration_tokens),
                                  args.selection_tokens, 256) for c in CAPS}
    variants = [("capability", HEADLINE, {}, "auto"), ("capability", "capability (dynamic, unbounded)", {}, "dynamic"),
                ("capability", "capability (uniform)", {}, "uniform"), ("minitron", "minitron (uniform)", {}, "uniform"),
                ("magnitude", "magnitude (dynamic)", {}, "dynamic"), ("magnitude", "magnitude (uniform)", {}, "uniform"),
                ("weight_pca", "weight_pca (dynamic)", {}, "dynamic"),
                ("weight_pca", "weight_pca (uniform)", {}, "uniform")]
    variants += [("random", f"random (seed {s})", {"seed": s}, "dynamic") for s in range(args.random_seeds)]
    kept, score_cache = {}, {}
    for scorer_name, label, opts, allocation in variants:
        t0 = time.time()
        key = (scorer_name, tuple(sorted(opts.items())))
        if key not in score_cache:
            scorer = make_scorer(scorer_name, **opts)
            score_cache[key] = scorer.score(units, stats, WEIGHTS, feature_map if scorer_name == "capability" else None)
        scores = score_cache[key].check(units)
        extra = {}
        if allocation == "auto":
            alloc, extra["allocation_candidates"] = select_allocation(
                trimmed, scores, budget, AllocationOptions(), selection, WEIGHTS, args.use_autocast)
            log(f"auto allocation: {extra['allocation_candidates']}")
        else:
            alloc = allocate(trimmed.config, scores, budget, AllocationOptions(allocation=allocation))
        pruned, notes = apply_prune_plan(trimmed, alloc.plan)
        assert parameter_count(pruned) == alloc.params["total"]
        score_seconds = time.time() - t0
        rows[label] = {"params": alloc.params, "allocation": allocation, **extra,
                       "ffn_widths": [w["ffn"] for w in alloc.widths],
                       "heads": [len(w["heads"]) for w in alloc.widths], "notes": notes,
                       "eval": evaluate(pruned, student_tok, probes)}
        kept[label] = alloc
        log(f"{label}: {alloc.params['non_embedding']:,} non-embedding params, scored+pruned in "
            f"{score_seconds:.1f}s, evaluated in {time.time() - t0 - score_seconds:.0f}s")
        del pruned
        gc.collect()
    base = rows[HEADLINE]["eval"]
    for label, row in rows.items():
        for c in CAPS:
            d, ci = paired_bpb_difference(row["eval"][c]["items"], base[c]["items"])
            row["eval"][c]["bpb_minus_capability"] = d
            row["eval"][c]["bpb_minus_capability_ci"] = ci
    results["budget"] = {"params": budget.params, "counts": budget.counts, "source": budget.source}
    results["importance_seconds"] = round(stats_seconds, 1)
    results["pruning"] = {k: {kk: vv for kk, vv in v.items()} for k, v in rows.items()}
    for row in results["pruning"].values():
        for c in CAPS:
            row["eval"][c].pop("items")

    # acceptance 3: write the capability-pruned tower, load it in a fresh process
    alloc = kept[HEADLINE]
    student, _ = apply_prune_plan(trimmed, alloc.plan)
    record = {"schema": "nexus.compress/1", "scorer": "capability",
              "allocation": f"auto -> {rows[HEADLINE]['allocation_candidates']['chosen']}",
              "budget": results["budget"], "params": {**counts, "student": alloc.params},
              "vocab": {**trim.summary(), "kept_ids": trim.kept_ids}, "kept": _kept_record(alloc, units),
              "notes": rows[HEADLINE]["notes"] + (
                  [] if feature_map else [NO_FEATURE_MAP]),
              "capabilities": {c: {"weight": WEIGHTS[c], "calibration": f"bundled:{c}:train",
                                   "calibration_tokens": stats[c].tokens} for c in CAPS},
              "options": CompressOptions(budget={"fraction": 0.5}).model_dump(mode="json")}
    ckpt = ARTEFACTS / "compress_gemma"
    record = write_compressed(student, student_tok, record, ckpt)
    results["fresh_process"] = fresh_process_check(ckpt)
    results["checkpoint"] = {"path": str(ckpt), **record["checkpoint"]}
    del student
    gc.collect()
    return trimmed, student_tok, windows, probes


CHILD = textwrap.dedent("""
    import json, sys, pathlib
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith({repo!r})]
    sys.modules["nexus"] = None
    for name in ("nexus", "modeling_nexus", "conversion"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"project module {{name}} is importable in the child")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ckpt = pathlib.Path({ckpt!r})
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
    seen, params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p)); params += p.numel()
    record = json.loads((ckpt / "compress.json").read_text())
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    ids = tok("def add(a, b):\\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    print("NEXUS_CHILD " + json.dumps({{
        "module": type(model).__module__, "params": params, "json_params": record["params"]["student"]["total"],
        "safetensors_bytes": size, "json_safetensors_bytes": record["checkpoint"]["safetensors_bytes"],
        "bytes_per_param": size / params, "vocab": len(tok), "json_vocab": record["vocab"]["kept"],
        "sample": tok.decode(out[0][ids.shape[1]:])}}))
""")


def fresh_process_check(ckpt):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(ARTEFACTS / "hf_modules_fresh")
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), ckpt=str(ckpt))], cwd=ARTEFACTS, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    lines = [l for l in done.stdout.splitlines() if "NEXUS_CHILD " in l]
    if done.returncode != 0 or not lines:
        return {"ok": False, "returncode": done.returncode, "stdout": done.stdout[-2000:],
                "stderr": done.stderr[-2000:]}
    data = json.loads(lines[-1].split("NEXUS_CHILD ", 1)[1])
    data["ok"] = data["params"] == data["json_params"] and data["safetensors_bytes"] == data["json_safetensors_bytes"]
    return data


# ---------------------------------------------------------------------------------------------- part 5: low rank


def low_rank_comparison(args, trimmed, tokenizer, windows, probes, results):
    t0 = time.time()
    covs = weighted_covariances({c: input_covariances(trimmed, windows[c], autocast=args.use_autocast)
                                 for c in CAPS}, WEIGHTS)
    log(f"input covariances ({time.time() - t0:.0f}s)")
    rows = []
    for keep in args.low_rank_keep:
        for method in ("weight", "activation"):
            t0 = time.time()
            model, report = low_rank_model(trimmed, keep, method, covs)
            ev = evaluate(model, tokenizer, probes)
            for c in CAPS:
                ev[c].pop("items")
            rows.append({**report, "eval": ev})
            log(f"low rank {method} keep={keep}: output error {report['mean_relative_output_error']:.3f} "
                f"({time.time() - t0:.0f}s)")
            del model
            gc.collect()
    results["low_rank"] = rows


# ---------------------------------------------------------------------------------------------- part 4: OT merge


BOS = 256
DATA_SEEDS = {"prose": 11, "code": 23}  # the order each specialist sees its data in


def byte_windows(text, n, length, seed):
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length, (n,), generator=g)
    return torch.stack([torch.cat([torch.tensor([BOS]), data[s:s + length - 1]]) for s in starts.tolist()])


def heldout_windows(text, length):
    data = list(text.encode("utf-8"))
    body = length - 1
    return torch.tensor([[BOS] + data[i:i + body] for i in range(0, len(data) - body, body)])


def tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=257, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=BOS)
    return LlamaForCausalLM(config)


def train_specialist(model, text, steps, seed, lr=3e-3, batch=8, length=96):
    """Plain AdamW on random windows of ``text``; fp32 (bf16 autocast is slower than fp32 at this size on CPU)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 15)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses = []
    for step in range(steps):
        ids = byte_windows(text, batch, length, seed * 100_003 + step)
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses[-20:]))


def bits_per_byte(model, windows):
    per_window = []
    with torch.inference_mode():
        for start in range(0, len(windows), 16):
            ids = windows[start:start + 16]
            logits = model(ids).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none").reshape(ids.shape[0], -1).sum(1)
            per_window += nll.tolist()
    values = np.asarray(per_window) / ((windows.shape[1] - 1) * LN2)
    return float(values.mean()), list(bootstrap_ci(values, n=1000, seed=0))


def ot_merge_experiment(args, results):
    """Three pairs of (prose, code) specialists: from one seed init directly (as issue 4 suggests), from one shared
    base briefly trained on both corpora (the usual case: two fine-tunes of one base model), and from two inits."""
    texts = {c: corpus_text(c, "train") for c in CAPS}
    texts["mixed"] = texts["prose"] + "\n" + texts["code"]
    held = {c: heldout_windows(corpus_text(c, "heldout")[:8000], 96) for c in CAPS}
    merge_windows = torch.cat([byte_windows(texts[c], 24, 96, 7 + i) for i, c in enumerate(CAPS)])
    out = {"steps": args.ot_steps, "base_steps": args.ot_base_steps, "pairs": {}}
    pairs = {"one seed init": (0, 0, False), f"one shared base ({args.ot_base_steps} steps on both corpora)":
             (0, 0, True), "different inits": (0, 1, False)}
    trained, bases = {}, {}

    def base_model(seed, shared):
        if not shared:
            return tiny_llama(seed)
        if seed not in bases:
            t0 = time.time()
            bases[seed] = tiny_llama(seed)
            final = train_specialist(bases[seed], texts["mixed"], args.ot_base_steps, seed=5 + seed)
            log(f"shared base (init seed {seed}): final train loss {final:.3f} nats/byte ({time.time() - t0:.0f}s)")
        return copy.deepcopy(bases[seed])

    for name, (seed_a, seed_b, shared) in pairs.items():
        if name == "different inits" and not args.different_init:
            continue
        models = {}
        for cap, seed in (("prose", seed_a), ("code", seed_b)):
            key = (cap, seed, shared)
            if key not in trained:
                t0 = time.time()
                model = base_model(seed, shared)
                final = train_specialist(model, texts[cap], args.ot_steps, seed=DATA_SEEDS[cap] + seed)
                trained[key] = nexus_from_teacher(model, name=f"{cap}-{seed}")
                log(f"specialist {cap} (init seed {seed}{', shared base' if shared else ''}): final train loss "
                    f"{final:.3f} nats/byte ({time.time() - t0:.0f}s)")
            models[cap] = trained[key]
        a, b = models["prose"], models["code"]
        t0 = time.time()
        merged, report = ot_merge(a, b, merge_windows, autocast=False)  # small models: fp32 is faster
        ot_seconds = time.time() - t0
        naive = average_models(a, b)
        rows = {}
        for label, model in (("teacher A (prose)", a), ("teacher B (code)", b), ("naive average", naive),
                             ("OT merge", merged)):
            rows[label] = {c: bits_per_byte(model, held[c]) for c in CAPS}
        moved = [l.get("neurons_moved", 0) / max(1, l.get("neurons", 1)) for l in report["layers"]]
        out["pairs"][name] = {"rows": rows, "ot_seconds": round(ot_seconds, 1), "neurons_moved_fraction": moved,
                              "heads_moved": [l.get("heads_moved", 0) for l in report["layers"]],
                              "matched_corr": [l.get("neuron_corr_matched") for l in report["layers"]],
                              "identity_corr": [l.get("neuron_corr_identity") for l in report["layers"]]}
        log(f"OT merge ({name}): {ot_seconds:.1f}s; neurons moved per layer {[f'{m:.0%}' for m in moved]}; mean "
            f"corr matched {np.mean(out['pairs'][name]['matched_corr']):.2f} vs identity "
            f"{np.mean(out['pairs'][name]['identity_corr']):.2f}")
    out["params_per_specialist"] = parameter_count(next(iter(trained.values())))
    results["ot_merge"] = out


# ---------------------------------------------------------------------------------------------- tables


def _ci(v, ci, digits=3):
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def print_tables(results):
    if "pruning" in results:
        p = results["params"]
        console.print(f"Gemma-3-270M params: total {p['teacher']['total']:,} (embedding {p['teacher']['embedding']:,},"
                      f" non-embedding {p['teacher']['non_embedding']:,}); after vocabulary trimming total "
                      f"{p['after_vocab_trim']['total']:,} (embedding {p['after_vocab_trim']['embedding']:,}). "
                      f"Budget: {results['budget']['params']:,} non-embedding params (50%).")
        t = Table(title="Acceptance 1: held-out prose / code right after pruning (no training), 95% CIs")
        for col in ("model", "non-emb params", "total params", "prose acc", "prose bpb", "Δbpb vs cap",
                    "code acc", "code bpb", "Δbpb vs cap"):
            t.add_column(col, justify="right" if col != "model" else "left")
        for label, row in results["pruning"].items():
            e = row["eval"]
            cells = [label, f"{row['params']['non_embedding']:,}", f"{row['params']['total']:,}"]
            for c in CAPS:
                cells += [_ci(e[c]["accuracy"], e[c]["accuracy_ci"]), _ci(e[c]["bpb"], e[c]["bpb_ci"]),
                          _ci(e[c]["bpb_minus_capability"], e[c]["bpb_minus_capability_ci"])]
            t.add_row(*cells)
        console.print(t)
        widths = Table(title="FFN width per layer (of 2048) / heads per layer (of 4)")
        widths.add_column("model")
        widths.add_column("FFN widths")
        widths.add_column("heads")
        for label, row in results["pruning"].items():
            if "ffn_widths" in row:
                widths.add_row(label, " ".join(map(str, row["ffn_widths"])), "".join(map(str, row["heads"])))
        console.print(widths)
        auto = results["pruning"].get(HEADLINE, {}).get("allocation_candidates")
        if auto:
            console.print("allocation=auto candidates (weighted loss, nats/token, on held-aside training text): " +
                          ", ".join(f"{c['allocation']}: {c['loss']:.3f}" for c in auto["candidates"]) +
                          f" -> {auto['chosen']}")
    if "tokenizer" in results:
        tok = results["tokenizer"]
        t = Table(title="Acceptance 2: trimmed tokenizer")
        for col in ("text", "decodes identically", "original tokens", "trimmed tokens", "orig. tokens outside kept"):
            t.add_column(col)
        t.add_row("kept domain (train prose + code)", "yes (checked)", "", "", "0 (same tokens, ids remapped)")
        for c in CAPS:
            h = tok[f"heldout_{c}"]
            t.add_row(f"held-out {c}", str(h["decodes_identically"]), f"{h['original_tokens']:,}",
                      f"{h['trimmed_tokens']:,}", f"{h['original_tokens_outside_kept_vocab']:.1%}")
        console.print(t)
        console.print(f"vocabulary kept: {tok['summary']}")
    if "fresh_process" in results:
        console.print(f"Acceptance 3 (fresh process, project not importable): {results['fresh_process']}")
    if "ot_merge" in results:
        for name, pair in results["ot_merge"]["pairs"].items():
            corr = f"mean corr of matched units {np.mean(pair['matched_corr']):.2f} vs same index " \
                   f"{np.mean(pair['identity_corr']):.2f}"
            t = Table(title=f"Acceptance 4: OT merge, specialists from {name} "
                            f"({results['ot_merge']['steps']} steps each), held-out bits per byte, 95% CIs; {corr}")
            t.add_column("model")
            for c in CAPS:
                t.add_column(f"{c} bpb", justify="right")
            for label, row in pair["rows"].items():
                t.add_row(label, *[_ci(*row[c]) for c in CAPS])
            console.print(t)
    if "low_rank" in results:
        t = Table(title="Acceptance 5: activation-aware ('manifold') vs plain weight SVD at equal rank "
                        "(dense reconstruction: quality, not size)")
        for col in ("keep", "method", "factored params", "rel. output error", "prose acc", "prose bpb",
                    "code acc", "code bpb"):
            t.add_column(col)
        for row in results["low_rank"]:
            e = row["eval"]
            t.add_row(f"{row['keep']}", row["method"], f"{row['factored_params']:,} / {row['dense_params']:,}",
                      f"{row['mean_relative_output_error']:.3f}",
                      *[x for c in CAPS for x in (_ci(e[c]["accuracy"], e[c]["accuracy_ci"]),
                                                  _ci(e[c]["bpb"], e[c]["bpb_ci"]))])
        console.print(t)


def save(results):
    """Write what is measured so far (each part saves, so a late failure loses nothing); parts skipped in this run
    keep their figures from an earlier run."""
    path = RESULTS / "compress_real.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(results)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(merged, indent=1, default=str))
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default="/work/cache/gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--eval-items", type=int, default=16, help="1000-character held-out chunks per capability")
    parser.add_argument("--calibration-tokens", type=int, default=4096, help="importance tokens per capability")
    parser.add_argument("--selection-tokens", type=int, default=1024,
                        help="further training tokens per capability on which allocation=auto compares candidates")
    parser.add_argument("--random-seeds", type=int, default=2)
    parser.add_argument("--feature-map", default=None, help="a localisation feature_map.json for the capability row")
    parser.add_argument("--feature-map-teacher", default="gemma")
    parser.add_argument("--low-rank-keep", type=float, nargs="+", default=[0.5])
    parser.add_argument("--ot-steps", type=int, default=200, help="training steps per specialist")
    parser.add_argument("--ot-base-steps", type=int, default=200, help="steps of the shared base on both corpora")
    parser.add_argument("--skip-gemma", action="store_true")
    parser.add_argument("--skip-low-rank", action="store_true")
    parser.add_argument("--skip-ot", action="store_true")
    parser.add_argument("--different-init", action="store_true", help="also merge a pair from two inits")
    parser.add_argument("--autocast", choices=("auto", "on", "off"), default="auto",
                        help="bf16 autocast for Gemma: auto = only when measured faster than fp32 here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a shared, oversubscribed 2-core machine a second "
                             "OpenMP thread mostly waits at barriers, measured 4x more CPU per step)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speedup = bf16_speedup()
    args.use_autocast = args.autocast == "on" or (args.autocast == "auto" and speedup > 1.0)
    log(f"bf16 autocast speed-up on this CPU (fp32 time / bf16 time, one linear): {speedup:.2f}x -> "
        f"{'bf16 autocast' if args.use_autocast else 'fp32'}")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "torch": torch.__version__, "bf16_speedup": speedup,
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    t0 = time.time()
    if not args.skip_gemma:
        trimmed, tok, windows, probes = gemma_pruning(args, results)
        save(results)
        if not args.skip_low_rank:
            low_rank_comparison(args, trimmed, tok, windows, probes, results)
            save(results)
        del trimmed
        gc.collect()
    if not args.skip_ot:
        ot_merge_experiment(args, results)
    results["seconds"] = round(time.time() - t0, 1)
    print_tables(save(results))
    console.print(f"total {results['seconds']:.0f}s; wrote {RESULTS / 'compress_real.json'}")


if __name__ == "__main__":
    main()
