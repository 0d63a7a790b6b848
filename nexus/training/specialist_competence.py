"""Is a specialist competent? Its own score against a trivial baseline, measured with the profile probes.

- arithmetic / reversal: exact match under greedy decoding on ``recipe.eval_items`` held-out items (seed ``recipe.eval_seed``,
  never trained on), through the `exact_match` probe; competent when exact match >= 0.9.
- code / prose: bits per byte on ``corpus_text(name, "heldout")`` through the `lm` probe, against a unigram model
  over the specialist's own tokens fitted on the train split (add-one smoothed; its bits divided by UTF-8 bytes);
  competent when the upper end of the bpb 95% CI is below the unigram bpb. The probe's own baseline (a unigram over
  bytes, fitted in-sample) is reported beside it.

Scoring runs in fp32: this CPU has no native bf16 matmul (see `SpecialistRecipe.autocast`).
"""

import math
from collections import Counter

import numpy as np

from nexus.conversion.bootstrap import bootstrap_ci
from nexus.conversion.corpora import GENERATED_ITEMS, corpus_path, corpus_text, write_items_jsonl
from nexus.conversion.probes import ProbeSettings, probe_class

EXACT_MATCH_TARGET = 0.9
EVAL_ITEMS_FILE = "heldout_arithmetic.jsonl"
VALIDATION_ITEMS_FILE = "validation_arithmetic.jsonl"


def _settings(recipe, items):
    return ProbeSettings(max_items=items, n_bootstrap=1000, seed=0, batch_size=32, window_tokens=recipe.seq_len,
                         compute="bf16" if recipe.autocast == "bfloat16" else "native")


def measure_competence(model, tokenizer, recipe, work_dir):
    """The specialist's competence dict; ``work_dir`` receives the arithmetic held-out JSONL it was scored on."""
    model.eval()
    if recipe.data in GENERATED_ITEMS:
        data = write_items_jsonl(f"{work_dir}/{EVAL_ITEMS_FILE}", recipe.eval_items, recipe.eval_seed, recipe.data)
        probe = probe_class("exact_match")(data, {}, _settings(recipe, recipe.eval_items)).load()
        reason = probe.cannot_score(tokenizer, model.config)
        if reason:
            raise ValueError(f"specialist {recipe.name}: cannot be scored on its own items: {reason}")
        result = probe.score(model, tokenizer).summary
        return {
            "capability": recipe.name, "metric": "exact_match", "score": result["score"], "ci": result["ci"],
            "n": result["n"], "eval_seed": recipe.eval_seed, "data": EVAL_ITEMS_FILE,
            "baseline": probe.baseline(), "target": EXACT_MATCH_TARGET,
            "competent": result["score"] >= EXACT_MATCH_TARGET, "samples": result.get("samples", []),
        }
    probe = probe_class("lm")(str(corpus_path(recipe.data, "heldout")), {}, _settings(recipe, 10**9)).load()
    result = probe.score(model, tokenizer).summary
    unigram = unigram_token_bpb(tokenizer, corpus_text(recipe.data, "train"), probe.chunks)
    return {
        "capability": recipe.name, "metric": "bpb", "score": result["bpb"], "ci": result["bpb_ci"],
        "n": result["n"], "data": f"corpus_text({recipe.data!r}, 'heldout')",
        "tokens": result["tokens"], "bytes": result["bytes"],
        "accuracy": result["accuracy"], "perplexity": result["perplexity"],
        "baseline": unigram, "byte_unigram_baseline": probe.baseline(),
        "competent": result["bpb_ci"][1] < unigram["score"],
    }


def exact_match_validator(tokenizer, recipe, work_dir):
    """``validate(model) -> exact match`` on the validation items (seed ``recipe.validation_seed``), for early
    stopping; these items are disjoint from the held-out ones competence is reported on."""
    data = write_items_jsonl(f"{work_dir}/{VALIDATION_ITEMS_FILE}", recipe.validation_items,
                             recipe.validation_seed, recipe.data)
    probe = probe_class("exact_match")(data, {}, _settings(recipe, recipe.validation_items)).load()

    def validate(model):
        model.eval()
        return float(probe.score(model, tokenizer).summary["score"])

    return validate


def unigram_token_bpb(tokenizer, train_text, chunks, n_bootstrap=1000, seed=0):
    """Bits per byte of a unigram model over ``tokenizer``'s tokens (fitted on ``train_text``, add-one smoothed),
    scored on ``chunks`` (each chunk one item, like the `lm` probe's)."""
    counts = Counter(tokenizer(train_text, add_special_tokens=False)["input_ids"])
    vocab = len(tokenizer)
    total = sum(counts.values()) + vocab
    rows = []
    for chunk in chunks:
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        bits = -sum(math.log2((counts.get(t, 0) + 1) / total) for t in ids)
        rows.append([bits, len(chunk.encode("utf-8"))])
    rows = np.asarray(rows, dtype=np.float64)
    score = rows[:, 0].sum() / rows[:, 1].sum()
    ci = bootstrap_ci(rows, n_bootstrap, seed, lambda r: r[:, 0].sum() / r[:, 1].sum())
    return {"metric": "bpb", "score": float(score), "ci": [float(ci[0]), float(ci[1])], "n": len(rows),
            "kind": "unigram over the specialist's tokens, fitted on the train split (add-one)"}


def print_competence(name, competence, console):
    c = competence
    verdict = "[green]competent[/]" if c["competent"] else "[red]NOT competent[/]"
    if c["metric"] == "exact_match":
        console.print(f"  competence {name}: exact match {c['score']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] "
                      f"on {c['n']} held-out items (target >= {c['target']}; baseline "
                      f"{c['baseline']['score']:.3f}) -> {verdict}")
    else:
        b = c["baseline"]
        console.print(f"  competence {name}: held-out {c['score']:.3f} bpb [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] vs "
                      f"token-unigram {b['score']:.3f} bpb [{b['ci'][0]:.3f}, {b['ci'][1]:.3f}] (byte-unigram "
                      f"{c['byte_unigram_baseline']['score']:.3f}); top-1 {c['accuracy']:.3f}, "
                      f"ppl {c['perplexity']:.2f} -> {verdict}")
