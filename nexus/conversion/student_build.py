"""Student construction: a multi-tower Nexus model with ONE tower per teacher, serving every capability that
teacher is best at.

    path, record = build_student(recipe, profile, "runs/demo/student_build")

Every capability (recipe order) is served by its best teacher in the profile; capabilities with the same best
teacher share that teacher's tower (named after the teacher; ``config.capability_to_tower`` maps every served
capability to its tower index, and the router's classes are the towers). Towers are in the order of their first
capability. Each tower teacher is loaded (ONE resident at a time, freed before the next), imported losslessly
(`nexus_from_teacher`), compressed with the capability scorer on the union of its capabilities' training text, each
weighted by its capability weight (`compress_model`, vocabulary trimming off: the student has its own shared
vocabulary), and its decoder layers are copied into its tower. Why per teacher and not per capability: two prunings
of one teacher, each with part of the budget, keep two half-copies of the same weights (DESIGN.md, "Decisions from
measurement").

**Competence.** A capability no teacher is competent at (`profile.dropped_capabilities`: no teacher's CI clear of the
trivial baseline, or exact match 0) gets no tower and no budget (unless it sets ``require_competent_teacher:
false``); it is listed under ``no_competent_teacher`` in ``student_build.json``. No capability left is an error.

A tower keeps its teacher's width; when that differs from the shared hidden size,
the tower's edge projections (``in_proj`` / ``out_proj``, made by ``NexusDecoderTower``) are initialised to select /
re-embed the teacher's channels (``[I | 0]`` and its transpose), so the tower sees the first ``h_t`` channels of the
shared residual stream. With ``tokenizer: base`` a tower from another teacher than the base teacher instead gets
its own embedding, final norm and LM head over the shared vocabulary (``tower_vocabulary: own``, the default;
`tower_vocabulary`), filled from its teacher by token string, so a character-level specialist is reproduced exactly
on text the base tokenizer splits into characters; the base teacher's tower, kept whole, is marked ``exact`` (distill
freezes it: ``freeze_exact_towers``).

**Router** (``router_init: fit``, several towers): fitted at build time on the pooled shared embeddings of each
capability's training windows (`router_fit`), so routing is right before distillation.

**Budget.** The whole student (shared embedding, router, final norm, edge projections, towers) must fit the budget:
``stages.student_build.budget_fraction`` x the summed parameters of the teachers it is built from, or else
``student.budget``. What the fixed parts leave is split per tower, i.e. per teacher (``tower_budget``):
``proportional``, in proportion to the teachers' layer parameters (every tower keeps the same fraction ``f``), or
``weighted_share``, in proportion to the summed weights of the capabilities each teacher serves (capped at the
teacher's size); each tower is compressed to that many parameters, so the sum is within budget (checked on the built
model).

**Shared tokenizer** (``tokenizer``): ``auto`` (the default) is ``base`` when one teacher serves every capability and
``train_bpe`` otherwise: measured on the demo specialists, ``base`` kept the base teacher's capability better (code
0.978 vs 0.942) but the other teachers' towers read its embedding rows and lost arithmetic (0.000 vs 0.985); on
Gemma-3-270M + the arithmetic specialist the arithmetic tower answered nothing either (bench/results/
gemma_base_vocab.json). ``base`` (DESIGN.md "Decisions from measurement") takes the base teacher's tokenizer (``base_teacher``, default: the teacher best on the most capabilities), trimmed to what the
capabilities' training text uses (+ specials, byte fallback), and copies its embedding and LM-head rows, embedding
scale, final norm and logit softcap exactly; the shared hidden size is its hidden size (`base_vocabulary`), so its
tower, unpruned, reproduces its logits on the kept tokens. ``train_bpe`` trains a byte-level BPE (``bpe_vocab_size``,
every digit its own token with ``split_digits``) on all capabilities' training text, so a character-level arithmetic
teacher aligns one to one on digits; or a teacher's name takes that teacher's whole tokenizer (rows as below).

**Shared embedding rows** (``embedding_init: teachers``, tokenizer ``train_bpe`` or a teacher's name). A student
token is *owned* by the tower whose capability
text uses it most (relative frequency under the student tokenizer; ties: recipe order). Its row is copied from the
owner's teacher when that teacher has a token with the same surface string (zero-padded to the shared width, which
matches the ``[I | 0]`` edge projections); otherwise from the next tower's teacher that has the string; special tokens
(pad / bos / eos / unk) by role; every other row keeps a random init with the teachers' row scale. Why ownership and
not an average: the teachers' embedding spaces are unrelated bases, so averaging rows of different teachers gives
noise, while a row from the teacher whose tower will read that token is exactly what that tower expects. Known
limits, left to distillation: the embedding is tied and unscaled, so a Gemma tower's inputs lack Gemma's
``sqrt(hidden)`` embedding scale; the shared final norm starts at the mean of the teachers' effective final-norm
weights (``w`` for RMSNorm, ``1 + w`` for Gemma's).

**Baselines on the same interface** (issue 7, ``bench/compare_methods.py``): ``init: random`` keeps the built
student's exact shapes (towers as compressed, edge projections, router) but none of the teachers' weights: the
model's own random init ("traditional distillation" into a student of the same size and shape); ``layout: dense``
builds one randomly initialised tower for every served capability instead (no router, no pruning: the FuseLLM-style
dense student), with the family, depth and attention widths of the first capability's best teacher (fewer layers
only when the budget cannot hold their attention) and the largest uniform FFN width that keeps the whole student
within the same budget. A pruning baseline is only another ``scorer`` (``magnitude``, ``minitron`` with
``allocation: uniform``, ``weight_pca``).

**Per-layer widths** (``allocation``): the capability scorer's default is ``auto``: for each tower, every pair of
(scorer mix: the configured Taylor + activation, activation alone, Taylor alone) x (uniform widths, dynamic widths
within 0.1 / 0.25 / 1.0 of the global keep fraction) is pruned, and the pair with the lowest capability-weighted
loss on held-aside training text is kept (``select_mix: false`` fixes the mix). Why: which one prunes best differs
by teacher and budget (Gemma-3-270M at 0.25: pinned dynamic widths lost 0.101 [0.084, 0.119] of minimum retention to
uniform ones, bench/RESULTS.md §5); the losses of all candidates are in ``student_build.json``.
``selection_heal_steps`` trains each candidate a few steps before comparing (`heal.py`); it is off by default: on
that tower, 10 healing steps kept the same choice as the loss right after the cut (bench/RESULTS.md §8), at the cost
of the healing for each of the 12 candidates.

Writes ``out`` atomically: the student (``NexusForCausalLM.save_pretrained``, safetensors), its tokenizer and
``student_build.json`` (towers, teachers, compress records, budget, parameter counts, embedding-init counts).

Sample recipe section::

    stages:
      student_build: {tokenizer: base, budget_fraction: 0.3333, allocation: dynamic}  # or {tokenizer: train_bpe,
      #   bpe_vocab_size: 1024}; {tokenizer: base, base_teacher: gemma} names the base teacher
      # baselines: {init: random, embedding_init: random}  or  {layout: dense, init: random, embedding_init: random}
"""

import gc
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..modeling_nexus import NexusConfig, NexusForCausalLM
from . import base_vocabulary
from .atomic_output import atomic_dir, atomic_file, check_output_vs_sources
from .budget import Budget, config_parameter_count, resolve_budget
from .compress import LowRankOptions
from .load_check import checked_load_state_dict
from .recipe import Recipe, register_stage_options

STAGE = "student_build"
SCHEMA = "nexus.student_build/2"  # 2: one tower per teacher (1: one per capability)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class StudentBuildOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokenizer: str = Field("auto", description="the shared tokenizer: 'auto' ('base' when one teacher serves every "
                                               "capability, else 'train_bpe': measured on the demo specialists, "
                                               "'base' loses the towers of the other teachers), 'base' (the base "
                                               "teacher's tokenizer trimmed "
                                               "to what the capabilities' training text uses; its embedding, head, "
                                               "final norm, embedding scale and softcap copied exactly: "
                                               "`base_vocabulary`), 'train_bpe' (a byte-level BPE trained on every "
                                               "capability's training text) or a teacher's name (its whole "
                                               "tokenizer, rows copied by token string)")
    base_teacher: str | None = Field(None, description="tokenizer base: the base teacher (default: the teacher best "
                                                       "on the most capabilities; ties: summed capability weight, "
                                                       "then teacher size, then recipe order)")
    trim_vocabulary: bool = Field(True, description="tokenizer base: keep only the tokens the capabilities' training "
                                                    "text uses (+ specials, byte fallback, BPE merge paths)")
    keep_top_tokens: int = Field(0, ge=0, description="tokenizer base, trimmed: also keep N more of the base "
                                                      "tokenizer's ordinary tokens (keep_top_by) and their merge "
                                                      "paths, so text the training text never used is not split into "
                                                      "more, smaller pieces than the teacher's own tokenizer makes")
    keep_top_by: Literal["teacher_mass", "id"] = Field(
        "teacher_mass", description="keep_top_tokens: which tokens. teacher_mass = those the base teacher gives the "
                                    "most next-token probability on the capabilities' training text (`token_mass`; "
                                    "on Gemma-3-270M at 40,000 it split held-out license text into 1.035x the "
                                    "teacher's tokens, vs 1.066x by id); id = the first by id (a BPE's earliest "
                                    "merges, mostly other scripts in a multilingual vocabulary)")
    keep_top_positions: int = Field(4096, ge=16, description="keep_top_by teacher_mass: positions of each "
                                                             "capability's training text the teacher scores")
    edge_init: Literal["identity", "fit"] = Field(
        "identity", description="tokenizer base: edge projections of towers from other teachers (whose width differs): "
                                "identity = [I | 0] (the tower reads the first channels of the base embedding); fit = "
                                "least squares over the tokens both vocabularies share (in_proj onto the tower "
                                "teacher's own embedding rows, out_proj onto its head through the base head)")
    tower_vocabulary: Literal["own", "shared"] = Field(
        "own", description="tokenizer base: towers of teachers other than the base teacher: own = their own "
                           "embedding, final norm and LM head over the shared vocabulary, filled from their teacher "
                           "by token string (`tower_vocabulary`); shared = they read the base embedding and write "
                           "through the base head via edge projections (edge_init)")
    router_init: Literal["fit", "random"] = Field(
        "fit", description="the router (several towers): fit = a linear classifier fitted at build time on the "
                           "pooled shared embeddings of each capability's training windows (`router_fit`); random = "
                           "the model's own init (distillation's router loss trains it)")
    bpe_vocab_size: int = Field(1024, ge=260, description="train_bpe: vocabulary size (specials and bytes included)")
    split_digits: bool = Field(True, description="train_bpe: every digit its own token (aligns 1:1 with a "
                                                 "character-level teacher on numbers)")
    hidden_size: int | None = Field(None, ge=8, description="shared hidden size (default: the widest tower teacher)")
    budget_fraction: float | None = Field(
        None, gt=0, le=1, description="the whole student <= this fraction of the summed parameters of the teachers "
                                      "it is built from (default: student.budget)")
    scorer: str = Field("capability", description="compress importance scorer for every tower")
    allocation: Literal["auto", "dynamic", "uniform"] | None = Field(
        None, description="compress per-layer widths (default: the scorer's own)")
    calibration_tokens: int = Field(2048, ge=16, description="compress calibration tokens per capability of a tower")
    selection_tokens: int = Field(1024, ge=16, description="allocation=auto: held-aside training tokens per "
                                                           "capability of a tower")
    select_mix: bool = Field(True, description="allocation=auto also picks the capability scorer's mix (configured, "
                                               "activation alone, Taylor alone) by the same held-aside loss")
    selection_heal_steps: int = Field(0, ge=0, description="allocation=auto: heal each candidate's layers this many "
                                                          "steps before comparing (compress's option, heal.py)")
    selection_heal_lr: float = Field(1e-4, gt=0, description="learning rate of that healing")
    window_tokens: int = Field(128, ge=8, description="compress calibration window (capped at the teacher's context)")
    embedding_init: Literal["teachers", "random"] = Field(
        "teachers", description="shared embedding rows: tokenizer base: the base teacher's rows, copied exactly; "
                                "otherwise from the owning tower's teacher by token string; or random")
    tower_budget: Literal["proportional", "weighted_share"] = Field(
        "proportional", description="how the budget is split between towers (one per teacher): proportional = one "
                                    "keep fraction for every tower (budgets proportional to the teachers' sizes); "
                                    "weighted_share = shares proportional to the summed weights of the capabilities "
                                    "each teacher serves, each capped at its teacher's size (a small specialist "
                                    "stays whole next to a large teacher)")
    init: Literal["teachers", "random"] = Field(
        "teachers", description="weights: from the teachers (compressed towers, edge projections, final norm), or "
                                "random: the same shapes re-initialised with the model's own init (the 'traditional "
                                "distillation' baseline; embedding_init must then be random too)")
    layout: Literal["towers", "dense"] = Field(
        "towers", description="towers: one tower per best teacher, serving the capabilities it is best at; dense: "
                              "ONE tower serving every capability (no router), the family, depth and heads of the "
                              "first capability's best teacher, FFN width as large as the budget allows (needs "
                              "init: random)")
    localisation: Literal["auto", "off"] = Field(
        "auto", description="auto: when the pipeline ran the localise stage, each tower is compressed with its "
                            "teacher's feature map (its importance terms) and keeps the units the localiser found "
                            "causally necessary for a capability the tower serves (critical_units.py); off: the "
                            "feature map is ignored (the ablation)")
    critical_confidence: float = Field(
        0.95, ge=0.5, le=1.0, description="localisation: a capability's selected units count as critical only when "
                                          "ablating them beat random units of the same size in at least this share "
                                          "of the causal resamples")
    chunk_chars: int = Field(400, ge=16, description="training text is cut into chunks of about this many characters")
    arithmetic_items: int = Field(2000, ge=10, description="bundled:arithmetic / reversal: generated training items")
    low_rank: LowRankOptions | None = Field(
        None, description="the manifold option (compress's low_rank): a pruned tower is pruned only to its budget / "
                          "keep, then every projection is stored as two factors from the activation-aware SVD in "
                          "its capabilities' input subspace, so it meets the same budget. Off by default: measured at "
                          "one point so far (Gemma size sweep 0.25: +0.045 [+0.036, +0.053] on the minimum "
                          "retention, bench/RESULTS.md §5), and a factored projection's LoRA targets are factor_a / "
                          "factor_b, not q_proj etc.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the random parts (rows no teacher provides)")


    @model_validator(mode="after")
    def _check(self):
        if self.layout == "dense" and self.init != "random":
            raise ValueError("layout dense builds a tower no teacher has: set init: random")
        if self.init == "random" and self.embedding_init != "random":
            raise ValueError("init random re-initialises every weight: set embedding_init: random as well")
        if self.base_teacher is not None and self.tokenizer not in ("base", "auto"):
            raise ValueError(f"base_teacher is for tokenizer: base (tokenizer is {self.tokenizer!r})")
        return self


register_stage_options(STAGE, StudentBuildOptions)


class StudentBuildError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------- planning


def teacher_counts(folder):
    """Parameter counts of the teacher at ``folder`` from its config alone (nothing loaded): total, layers, hidden."""
    from transformers import AutoConfig

    from .teacher_families import nexus_config_kwargs

    hf = AutoConfig.from_pretrained(folder)
    config = NexusConfig(**nexus_config_kwargs(hf))
    counts = config_parameter_count(config)
    return {"total": counts["total"], "layers": counts["non_embedding"] - config.hidden_size,
            "hidden_size": config.hidden_size, "max_positions": config.max_position_embeddings,
            "vocab_size": config.vocab_size}


def tower_teachers(recipe: Recipe, profile: dict) -> dict:
    """{capability: its best teacher per the profile}, in recipe order, for every capability the student serves: one
    no teacher is competent at (`profile.dropped_capabilities`) is left out. A served capability without a best
    teacher is an error, and so is a recipe where no capability is left."""
    from .profile import dropped_capabilities

    best = profile.get("best") or {}
    dropped = dropped_capabilities(recipe, profile)
    out = {}
    for i, cap in enumerate(recipe.capabilities):
        if cap.name in dropped:
            continue
        if cap.name not in best:
            raise StudentBuildError(f"capability {cap.name!r} (capabilities[{i}]) has no best teacher in the profile; "
                                    "rerun `nexus profile`")
        out[cap.name] = best[cap.name]
    if not out:
        raise StudentBuildError(
            f"no capability has a competent teacher ({', '.join(dropped)}): in the profile no teacher's score is "
            "clear of the trivial baseline (or exact match is 0), so there is nothing to build a tower from; use "
            "teachers that can do the tasks, check the capabilities' probe data, or set require_competent_teacher: "
            "false on a capability to build it anyway")
    return out


def teacher_towers(chosen: dict) -> dict:
    """{teacher: [capability, ...]} from {capability: teacher}: one tower per teacher, serving every capability it
    is best at, in the order of each tower's first capability."""
    towers = {}
    for cap, teacher in chosen.items():
        towers.setdefault(teacher, []).append(cap)
    return towers


def split_budget(total_budget, fixed, layer_params, weights=None):
    """The overall keep fraction and per-tower layer budgets, with fixed + sum(budgets) <= total_budget.

    ``layer_params`` {tower: its teacher's layer parameters} (a tower is a teacher). ``weights`` None
    (``tower_budget: proportional``): one keep fraction f for every tower, so each tower's budget is proportional to
    its teacher's size. ``weights`` {tower: weight} (``weighted_share``; the build passes the summed weights of the
    capabilities the tower serves): each tower gets a share of the budget proportional to its weight, capped at its
    teacher's size; what a capped tower leaves goes to the others (water-filling), so a small specialist is kept
    whole next to a large teacher.
    """
    available = total_budget - fixed
    need = sum(layer_params.values())
    if available <= 0:
        raise StudentBuildError(f"budget: {total_budget:,} params do not even hold the shared parts ({fixed:,}: "
                                "embedding, router, final norm, edge projections); raise the budget or use a "
                                "smaller shared vocabulary / hidden size")
    if weights is None:
        f = min(1.0, available / need)
        return f, {k: int(f * v) for k, v in layer_params.items()}
    budgets, open_, left = {}, set(layer_params), available
    while open_:
        total_weight = sum(weights[k] for k in open_)
        capped = {k for k in open_ if left * weights[k] / total_weight >= layer_params[k]}
        if not capped:
            budgets.update({k: int(left * weights[k] / total_weight) for k in open_})
            break
        for k in capped:
            budgets[k] = layer_params[k]
            left -= layer_params[k]
        open_ -= capped
    return sum(budgets.values()) / need, {k: budgets[k] for k in layer_params}


# ---------------------------------------------------------------------------------------------------- tokenizer


def shared_tokenizer(options, texts, recipe, folders, profile=None):
    """The student's tokenizer (``options.tokenizer``). ``base``: the base teacher's, trimmed, carrying its
    `base_vocabulary.BaseVocabulary` (``profile`` picks the default base teacher)."""
    if options.tokenizer == "base":
        try:
            tokenizer, _ = base_vocabulary.base_vocabulary(recipe, profile, texts, folders,
                                                           getattr(options, "base_teacher", None),
                                                           getattr(options, "trim_vocabulary", True),
                                                           keep_top=getattr(options, "keep_top_tokens", 0),
                                                           keep_top_by=getattr(options, "keep_top_by", "id"),
                                                           mass_positions=getattr(options, "keep_top_positions",
                                                                                  4096))
        except base_vocabulary.BaseVocabularyError as exc:
            raise StudentBuildError(str(exc)) from None
        return tokenizer
    if options.tokenizer == "train_bpe":
        from ..training.bpe_tokenizer import train_bpe_tokenizer

        corpus = "\n".join("\n".join(t.chunks) for t in texts.values())
        return train_bpe_tokenizer(corpus, options.bpe_vocab_size, split_digits=options.split_digits)
    names = [t.name for t in recipe.teachers]
    if options.tokenizer not in names:
        raise StudentBuildError(f"stages.student_build.tokenizer: {options.tokenizer!r} is neither 'base', "
                                f"'train_bpe' nor a teacher; teachers: {', '.join(names)}")
    from .teacher_source import load_tokenizer
    from .tokenizer_roundtrip import check_training_texts

    tokenizer = load_tokenizer(folders[options.tokenizer])
    check_training_texts(tokenizer, options.tokenizer, texts, recipe)
    return tokenizer


def token_owners(tokenizer, texts, order):
    """{student id: capability that uses it most (relative frequency)}, for ids used by some capability's text."""
    freq = {}
    for cap in order:
        counts = Counter()
        for ids in tokenizer(texts[cap].chunks, add_special_tokens=False)["input_ids"]:
            counts.update(ids)
        total = sum(counts.values()) or 1
        freq[cap] = {i: n / total for i, n in counts.items()}
    owners = {}
    for cap in order:
        for i, f in freq[cap].items():
            if i not in owners or f > freq[owners[i]].get(i, 0.0):
                owners[i] = cap
    return owners


# ---------------------------------------------------------------------------------------------------- building


def _effective_norm(model):
    norm = model.model.norm
    w = norm.weight.detach().float()
    return w + 1.0 if norm.kind == "gemma_rms" else w


def _compress_tower(name, teacher_name, folder, dtype, texts, tower_layer_budget, options, console, show_progress,
                    unk_tolerance=None, weights=None, keep_head=False, feature_map=None):
    """Load one teacher, import, compress its layers to ``tower_layer_budget``; returns what the student needs.

    ``texts`` {capability: TrainingText} of the capabilities the tower serves, ``weights`` {capability: weight}
    (default 1 each): compression calibrates on every one of them, weighted. The teacher's tokenizer must round-trip
    each text (`tokenizer_roundtrip`; ``unk_tolerance`` {capability: the fraction of unk tokens its probe accepts}).
    ``feature_map``: the localiser's map (loaded JSON): its terms join the capability scorer and the units it found
    causally necessary for these capabilities are kept first (`critical_units`)."""
    from .compress import Capability, CompressOptions, compress_model
    from .teacher_import import nexus_from_teacher
    from .teacher_source import load_teacher
    from .tokenizer_roundtrip import check_roundtrip

    teacher, tok = load_teacher(folder, dtype=torch.float32)
    for cap, text in texts.items():
        check_roundtrip(tok, text.chunks, teacher_name, cap, (unk_tolerance or {}).get(cap, 0.0))
    max_pos = int(getattr(teacher.config, "max_position_embeddings", 2048) or 2048)
    nexus = nexus_from_teacher(teacher, name=name, capabilities=list(texts))
    del teacher
    gc.collect()
    info = {"embedding": nexus.model.embed_tokens.weight.detach().float().clone(),
            "final_norm": _effective_norm(nexus), "tokenizer": tok, "max_positions": max_pos}
    if keep_head:  # an own-vocabulary tower: its teacher's head, final norm (as stored), scale and softcap
        info["own_vocabulary"] = {
            "lm_head": None if nexus.config.tie_word_embeddings else nexus.lm_head.weight.detach().float().clone(),
            "norm_weight": nexus.model.norm.weight.detach().float().clone(),
            "embedding_scale": nexus.config.embedding_scale,
            "final_logit_softcapping": nexus.config.final_logit_softcapping}
    hidden = nexus.config.hidden_size
    copts = CompressOptions(scorer=options.scorer, allocation=options.allocation, vocab={"trim": False},
                            calibration_tokens=options.calibration_tokens, selection_tokens=options.selection_tokens,
                            select_mix=options.select_mix, selection_heal_steps=options.selection_heal_steps,
                            selection_heal_lr=options.selection_heal_lr, low_rank=options.low_rank,
                            window_tokens=min(options.window_tokens, max_pos))
    budget = Budget(tower_layer_budget + hidden, "non_embedding", f"tower {name}: {tower_layer_budget} layer params")
    capabilities = [Capability(cap, "\n".join(text.chunks), (weights or {}).get(cap, 1.0), text.source)
                    for cap, text in texts.items()]
    if tower_layer_budget >= config_parameter_count(nexus.config)["non_embedding"] - hidden:
        student, record = nexus, {"note": "budget holds the whole teacher: not pruned",
                                  "params": {"student": config_parameter_count(nexus.config)}}
    else:
        fm_scores, critical, localisation = _localisation_inputs(feature_map, teacher_name, nexus, texts, options)
        student, _, record = compress_model(nexus, tok, capabilities, copts, budget=budget, console=console,
                                            show_progress=show_progress, feature_map=fm_scores, critical=critical)
        record.pop("vocab", None)
        if localisation is not None:
            record["localisation"] = localisation
    info["source"] = str(folder)
    info["tower_spec"] = dict(student.config.towers[0])
    info["tower_state"] = {k: v.detach().clone() for k, v in student.model.towers[0].state_dict().items()}
    info["record"] = {k: v for k, v in record.items() if k in ("allocation", "budget", "params", "keep_fraction",
                                                               "kept", "notes", "note", "seconds", "scorer",
                                                               "capabilities", "critical", "localisation",
                                                               "feature_map", "allocation_candidates",
                                                               "scorer_mix", "low_rank")}
    del student, nexus
    gc.collect()
    return info


def _print_critical(console, name, record):
    crit = record.get("critical")
    if console is None or not record.get("localisation"):
        return
    used = [c for c, r in record["localisation"]["critical"].items() if r["used"]]
    if crit:
        console.print(f"  tower {name}: critical units of {', '.join(used)} kept: {len(crit['head'])} heads, "
                      f"{len(crit['neuron'])} neurons (lost to the budget: {crit['lost']['head']} heads, "
                      f"{crit['lost']['neuron']} neurons)")
    else:
        console.print(f"  tower {name}: no causally confirmed critical units "
                      + "; ".join(f"{c}: {r['reason']}" for c, r in record["localisation"]["critical"].items()))


def _localisation_inputs(feature_map, teacher_name, nexus, texts, options):
    """(feature-map scores, critical units, report) for one tower, or (None, None, None) without a feature map."""
    if feature_map is None or options.localisation == "off":
        return None, None, None
    from .compress import feature_map_scores
    from .critical_units import critical_units
    from .decoder_units import DecoderUnits

    scores = feature_map_scores(feature_map, teacher_name, DecoderUnits(nexus))
    scores = {cap: v for cap, v in scores.items() if cap in texts} or None
    critical, report = critical_units(feature_map, teacher_name, list(texts), options.critical_confidence)
    return scores, critical, {"feature_map_terms": sorted(scores or ()), "critical": report}


def _init_embedding(student, student_tok, towers, texts, order, options):
    """Fill the shared embedding rows (see the module docstring); returns counts of where rows came from.

    With a base teacher (``tokenizer: base``) its final norm and, unless ``embedding_init: random``, its embedding
    and LM-head rows are copied exactly instead (`base_vocabulary.copy_base_head`)."""
    from ..training.token_alignment import token_surface_strings
    from .tower_vocabulary import teacher_token_index

    weight = student.model.embed_tokens.weight
    H = weight.shape[1]
    counts = Counter()
    base = base_vocabulary.of(student_tok)
    if base is not None:
        rows = base_vocabulary.copy_base_head(student, base, embedding=options.embedding_init != "random")
        if rows and getattr(options, "edge_init", "identity") == "fit":  # recorded under tokenizer.edge_fit
            base.edge_fit = base_vocabulary.fit_edge_projections(student, student_tok, base, towers)
        return rows or {"random": weight.shape[0]}
    if options.embedding_init == "random":
        return {"random": weight.shape[0]}
    scale = torch.stack([t["embedding"].std() for t in towers.values()]).mean()
    gen = torch.Generator().manual_seed(options.seed)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=gen) * scale)
        owners = token_owners(student_tok, texts, order)
        strings = token_surface_strings(student_tok)
        indexes = {cap: teacher_token_index(towers[cap]["tokenizer"]) for cap in order}
        for sid, s in enumerate(strings):
            if s is None:
                continue
            first = owners.get(sid, order[0])
            for cap in [first] + [c for c in order if c != first]:
                tid = indexes[cap].get(s)
                if tid is not None:
                    row = towers[cap]["embedding"][tid]
                    weight[sid].zero_()
                    weight[sid, :row.numel()] = row[:H]
                    counts[f"from {cap}" + (" (owner)" if cap == first else " (fallback)")] += 1
                    break
            else:
                counts["random (no teacher has the string)"] += 1
        for role in ("pad_token", "bos_token", "eos_token", "unk_token"):
            sid = getattr(student_tok, f"{role}_id", None)
            if sid is None:
                continue
            for cap in order:
                t_tok = towers[cap]["tokenizer"]
                tid = getattr(t_tok, f"{role}_id", None)
                if tid is not None and tid < towers[cap]["embedding"].shape[0]:
                    row = towers[cap]["embedding"][tid]
                    weight[sid].zero_()
                    weight[sid, :row.numel()] = row[:H]
                    counts["special tokens by role"] += 1
                    break
    return dict(counts)


def student_config(specs, student_tok, hidden_size, max_positions, order):
    """The student's NexusConfig: tied unscaled shared embedding, RMS final norm, pooled-linear router (one class per
    tower) — or, with a base teacher, its tying, embedding scale, final norm and softcap
    (`base_vocabulary.head_config`); ``order``: the capabilities it serves (recipe order; each tower spec lists its own)."""
    return NexusConfig(
        vocab_size=len(student_tok), hidden_size=hidden_size, towers=specs, router={"type": "pooled_linear"},
        max_position_embeddings=max_positions, **base_vocabulary.head_config(student_tok),
        pad_token_id=student_tok.pad_token_id, bos_token_id=student_tok.bos_token_id,
        eos_token_id=student_tok.eos_token_id, capability_names=list(order))


def assemble_student(towers, student_tok, hidden_size, order, texts, options):
    """The multi-tower NexusForCausalLM from compressed towers: tower t is ``towers[order[t]]`` (one per teacher,
    named ``order[t]``), serving ``towers[order[t]]["capabilities"]`` (default: its name); ``texts`` {capability:
    TrainingText} in recipe order (the shared embedding's token owners). With ``init: random`` the same shapes keep
    the model's own random init (nothing is copied from the teachers)."""
    specs, tower_of = [], {}
    for name in order:
        spec = {k: v for k, v in towers[name]["tower_spec"].items()}
        spec.update(name=name, capabilities=list(towers[name].get("capabilities") or [name]))
        own = towers[name].get("own_vocabulary")
        if own is not None:  # its own embedding, final norm and head (`tower_vocabulary`)
            spec.update(vocabulary="own", embedding_scale=own["embedding_scale"],
                        final_logit_softcapping=own["final_logit_softcapping"], vocabulary_ids=list(own["plan"]))
        specs.append(spec)
        tower_of.update({cap: name for cap in spec["capabilities"]})
    served = [c for c in texts if c in tower_of] + [c for c in tower_of if c not in texts]  # recipe order
    config = student_config(specs, student_tok, hidden_size, max(t["max_positions"] for t in towers.values()),
                            served)
    torch.manual_seed(options.seed)
    student = NexusForCausalLM(config).eval()
    if options.init == "random":
        return student, {"random (init: random)": config.vocab_size}
    with torch.no_grad():
        for t, name in enumerate(order):
            tower = student.model.towers[t]
            checked_load_state_dict(tower, towers[name]["tower_state"], towers[name].get("source", "(in memory)"),
                                    what=f"tower {name!r} from teacher",
                                    allow_missing=("in_proj", "out_proj", "embed_tokens", "norm.", "lm_head"))
            own = towers[name].get("own_vocabulary")
            if own is not None:
                from .tower_vocabulary import fill_own_vocabulary

                embedding = towers[name]["embedding"]
                head = own["lm_head"] if own["lm_head"] is not None else embedding
                towers[name]["own_vocabulary_rows"] = fill_own_vocabulary(tower, own["plan"], embedding, head,
                                                                          own["norm_weight"])
            if tower.in_proj is not None:
                h = tower.in_proj.weight.shape[0]
                eye = torch.zeros(h, hidden_size)
                eye[:, :min(h, hidden_size)] = torch.eye(h, min(h, hidden_size))
                tower.in_proj.weight.copy_(eye)
                tower.out_proj.weight.copy_(eye.T)
        norms = [torch.nn.functional.pad(t["final_norm"], (0, hidden_size - t["final_norm"].numel()), value=1.0)
                 for t in towers.values()]
        student.model.norm.weight.copy_(torch.stack(norms).mean(0))
    # the embedding rows are owned per capability: each capability's view is its tower's teacher
    rows = _init_embedding(student, student_tok, {cap: towers[tower_of[cap]] for cap in served}, texts, served,
                           options)
    student.tie_weights()
    return student, rows


def dense_student(family_folder, student_tok, hidden_size, total_budget, order, options):
    """``layout: dense``: one randomly initialised tower serving every capability, with the family (norms,
    activation, q/k-norm, RoPE), depth and attention widths of the teacher at ``family_folder`` (fewer layers only
    when the budget cannot hold all of their attention) and the largest uniform FFN width whose whole student fits
    ``total_budget``; returns ``(student, intermediate_size)``."""
    from transformers import AutoConfig

    from .teacher_families import nexus_config_kwargs

    family = nexus_config_kwargs(AutoConfig.from_pretrained(family_folder), name="dense", capabilities=list(order))
    tower, max_positions = family["towers"][0], family["max_position_embeddings"]
    depth = len(tower["layers"])

    def config(ffn):
        spec = {**tower, "layers": [{**layer, "intermediate_size": ffn} for layer in tower["layers"][:depth]]}
        return student_config([spec], student_tok, hidden_size, max_positions, order)

    def fits(ffn):
        return config_parameter_count(config(ffn))["total"] <= total_budget

    while depth > 1 and not fits(0):  # a budget that cannot hold every attention layer keeps the first ones
        depth -= 1
    if not fits(0):
        raise StudentBuildError(f"layout dense: one attention layer of {family_folder} at hidden size {hidden_size} "
                                f"alone exceeds the budget of {total_budget:,} params")
    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the largest FFN width that fits: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    torch.manual_seed(options.seed)
    return NexusForCausalLM(config(lo)).eval(), lo


def build_student(recipe: Recipe, profile: dict, out, texts=None, console=None, show_progress=True,
                  overwrite=True, inputs_digest=None, feature_map=None, merged=None) -> tuple[Path, dict]:
    """Build the student into ``out`` (atomically); returns (path, record). ``texts``: {cap: TrainingText}
    (default: `training_text` of every capability; only the served capabilities' are used); ``feature_map``: the
    localise stage's feature_map.json (a path), used per ``localisation``; ``merged``: the align stage's merged
    teachers ([{"name", "members", "folder"}, ...]): each builds ONE tower serving every capability its members were
    best at, with their summed budget weight."""
    from .profile import dropped_capabilities
    from .run_paths import recipe_sources
    from .teacher_source import resolve_teacher_folder
    from .tokenizer_roundtrip import probe_unk_tolerance

    start = time.perf_counter()
    options = recipe.stage(STAGE)
    out = Path(out)
    sources = recipe_sources(recipe)
    check_output_vs_sources(out, sources)  # before any work: the write would replace a teacher it holds
    chosen = tower_teachers(recipe, profile)  # {served capability: teacher}; raises when none is served
    dropped = dropped_capabilities(recipe, profile)
    order = list(chosen)
    merged_from = {g["name"]: list(g["members"]) for g in merged or ()}
    tower_of = {m: name for name, members in merged_from.items() for m in members}  # member -> its merged tower
    serves = teacher_towers({cap: tower_of.get(t, t) for cap, t in chosen.items()})  # {teacher: [cap, ...]}
    if options.tokenizer == "auto":  # see StudentBuildOptions.tokenizer for why
        one_teacher = len(serves) == 1 and options.layout == "towers"
        mode = "base" if options.base_teacher is not None or one_teacher else "train_bpe"
        options = options.model_copy(update={"tokenizer": mode})
    if console is not None and dropped:
        console.print(f"  [bold red]no competent teacher for {', '.join(dropped)}[/]: no tower and no budget")
    if texts is None:
        texts = student_training_texts(recipe)
    texts = {cap: texts[cap] for cap in order}  # a dropped capability trains neither the tokenizer nor a tower
    folders = {t.name: resolve_teacher_folder(t.source, t.allow_pickle, recipe.cache_dir) for t in recipe.teachers}
    folders.update({g["name"]: Path(g["folder"]) for g in merged or ()})
    spec_teacher = {**{t.name: recipe.teacher(t.name) for t in recipe.teachers},
                    **{g["name"]: recipe.teacher(g["members"][0]) for g in merged or ()}}  # dtype: the first member's
    fm = None
    if feature_map is not None and options.localisation != "off":
        from .feature_map import load_feature_map

        fm = load_feature_map(feature_map)
    sources.update({f"teacher folder {name}": folder for name, folder in folders.items()})
    counts = {name: teacher_counts(folders[name]) for name in serves}
    student_tok = shared_tokenizer(options, texts, recipe, folders, profile)
    try:  # tokenizer base: the base teacher's hidden size (its embedding and head rows are copied as they are)
        hidden = base_vocabulary.shared_hidden_size(student_tok, options.hidden_size)
    except base_vocabulary.BaseVocabularyError as exc:
        raise StudentBuildError(str(exc)) from None
    hidden = hidden or options.hidden_size or max(counts[t]["hidden_size"] for t in serves)
    matrices = base_vocabulary.embedding_matrices(student_tok)  # 2: the base teacher's untied LM head
    n = len(serves)  # router classes: one per tower
    # a merged tower counts its members: the budget is the same fraction whether or not align merged them
    teachers_total = sum(teacher_counts(folders[t])["total"] for t in dict.fromkeys(chosen.values()))
    if options.budget_fraction is not None:
        total_budget = int(options.budget_fraction * teachers_total)
        budget_source = f"{options.budget_fraction:g} x the {teachers_total:,} params of the tower teachers"
    else:
        b = recipe.student.budget
        resolved = resolve_budget(b.params, None, b.memory_gb, "total")
        total_budget, budget_source = resolved.params, "student.budget: " + resolved.source
    if options.layout == "dense":
        family = chosen[order[0]]
        student, ffn = dense_student(folders[family], student_tok, hidden, total_budget, order, options)
        rows = {"random (init: random)": len(student_tok)}
        fixed, f = matrices * len(student_tok) * hidden + hidden, None
        spec = student.config.towers[0]
        tower_records = [{"index": 0, "capability": "+".join(order), "capabilities": list(order), "teacher": None,
                          "family_from": family, "hidden_size": spec["hidden_size"], "layers": len(spec["layers"]),
                          "intermediate_size": ffn,
                          "params": sum(p.numel() for p in student.model.towers[0].parameters()),
                          "compress": {"note": "layout dense: nothing compressed, random init"}}]
        if console is not None:
            console.print(f"  dense tower for {', '.join(order)}: {family}'s family, {len(spec['layers'])} layers, "
                          f"FFN {ffn} (random init)")
    else:
        fixed = matrices * len(student_tok) * hidden + hidden + (hidden * n + n if n > 1 else 0)
        base = base_vocabulary.of(student_tok)
        own = {}  # teacher -> its tower's own-vocabulary plan (`tower_vocabulary`): rows it needs, before any load
        if base is not None and options.tower_vocabulary == "own":
            from .teacher_source import load_tokenizer
            from .tower_vocabulary import own_vocabulary_plan

            for t, caps in serves.items():
                if t != tower_of.get(base.teacher, base.teacher):  # a merge holding the base teacher shares its rows
                    chunks = [c for cap in caps for c in texts[cap].chunks]
                    own[t] = own_vocabulary_plan(student_tok, load_tokenizer(folders[t]), chunks,
                                                 counts[t]["vocab_size"])
        # own vocabulary: (rows + the shared last row) x 2 (embedding, head) + its final norm; else edge projections
        fixed += sum((2 * (len(own[t]) + 1) + 1) * counts[t]["hidden_size"] if t in own
                     else 2 * hidden * counts[t]["hidden_size"]
                     for t in serves if t in own or counts[t]["hidden_size"] != hidden)
        cap_weight = {c.name: c.weight for c in recipe.capabilities}
        weights = ({t: sum(cap_weight[c] for c in caps) for t, caps in serves.items()}
                   if options.tower_budget == "weighted_share" else None)
        f, tower_budgets = split_budget(total_budget, fixed, {t: counts[t]["layers"] for t in serves}, weights)
        spec_of = {c.name: c for c in recipe.capabilities}
        towers = {}
        for name, caps in serves.items():  # one teacher resident at a time: each is loaded, compressed and freed
            teacher = spec_teacher[name]
            if console is not None:
                keep = tower_budgets[name] / max(1, counts[name]["layers"])
                console.print(f"  tower {name} ({', '.join(caps)}): {counts[name]['layers']:,} layer params -> "
                              f"{tower_budgets[name]:,} (keep {keep:.3f})")
            # a merged teacher's units sit in its first member's order (ot_merge permutes the others onto it), so
            # that member's feature map entry addresses them
            towers[name] = _compress_tower(name, merged_from.get(name, [name])[0], folders[name], DTYPES[teacher.dtype],
                                           {c: texts[c] for c in caps}, tower_budgets[name], options, console,
                                           show_progress, {c: probe_unk_tolerance(spec_of[c]) for c in caps},
                                           weights={c: cap_weight[c] for c in caps}, keep_head=name in own,
                                           feature_map=fm)
            towers[name]["capabilities"] = list(caps)
            _print_critical(console, name, towers[name]["record"])
            if name in own:
                towers[name]["own_vocabulary"]["plan"] = own[name]
        student, rows = assemble_student(towers, student_tok, hidden, list(serves), texts, options)
        tower_records = [{"index": t, "name": name, "capability": "+".join(caps), "capabilities": list(caps),
                          "teacher": name, "merged_from": merged_from.get(name),
                          "hidden_size": towers[name]["tower_spec"]["hidden_size"],
                          "layers": len(towers[name]["tower_spec"]["layers"]),
                          "params": sum(p.numel() for p in student.model.towers[t].parameters()),
                          "layer_budget": tower_budgets[name], "teacher_layer_params": counts[name]["layers"],
                          "budget_weight": weights[name] if weights else None,
                          "vocabulary": student.config.towers[t]["vocabulary"],
                          "own_vocabulary_rows": towers[name].get("own_vocabulary_rows"),
                          # unpruned, from the base teacher whose embedding, head and final norm the student shares:
                          # it reproduces that teacher exactly (distill may freeze it: freeze_exact_towers)
                          "exact": bool(base is not None and name == base.teacher and options.init == "teachers"
                                        and "not pruned" in str(towers[name]["record"].get("note", ""))
                                        and options.embedding_init == "teachers"),
                          "compress": towers[name]["record"]} for t, (name, caps) in enumerate(serves.items())]
    router_fit = None
    if options.router_init == "fit" and options.init == "teachers" and student.model.router is not None:
        from .router_fit import fit_router

        router_fit = fit_router(student, student_tok, texts, window=options.window_tokens, seed=options.seed)
        if console is not None:
            console.print(f"  router fitted on pooled embeddings: held-out accuracy "
                          f"{router_fit['held_out_accuracy']:.3f} ({router_fit['held_out']} windows)")
    params = sum(p.numel() for p in student.parameters())
    if params > total_budget:
        raise StudentBuildError(f"the built student has {params:,} params, over the budget of {total_budget:,} "
                                f"({budget_source})")
    record = {
        "schema": SCHEMA,
        "towers": tower_records,
        "capability_to_tower": dict(student.config.capability_to_tower),
        "no_competent_teacher": {cap: {"best_teacher": (profile.get("best") or {}).get(cap),
                                       "note": "no teacher is competent (profile): no tower, no budget"}
                                 for cap in dropped},
        "layout": options.layout,
        "init": options.init,
        "hidden_size": hidden,
        "tokenizer": {"kind": options.tokenizer, "vocab_size": len(student_tok),
                      **(base.record() if (base := base_vocabulary.of(student_tok)) is not None else {})},
        "budget": {"params": total_budget, "source": budget_source, "keep_fraction": f, "fixed_params": fixed},
        "params": params,
        "teacher_params": {name: c["total"] for name, c in counts.items()},
        "teacher_params_total": teachers_total,
        "params_ratio": params / teachers_total,
        "embedding_rows": rows,
        "router_fit": router_fit,
        "training_text": {cap: {"source": t.source, "chunks": len(t.chunks)} for cap, t in texts.items()},
        "options": options.model_dump(mode="json"),
        "seconds": round(time.perf_counter() - start, 1),
        "inputs_digest": inputs_digest,
    }
    student.config.nexus_source = {"stage": STAGE, "teachers": {cap: chosen[cap] for cap in order},
                                   "no_competent_teacher": list(dropped)}
    with atomic_dir(out, overwrite=overwrite, sources=sources) as tmp:
        student.save_pretrained(tmp)
        student_tok.save_pretrained(tmp)
        if not any(t.trust_remote_code for t in recipe.teachers):  # a base teacher's auto_map must not travel on
            from .tokenizer_remote_code import strip_remote_code

            record["tokenizer_remote_code_removed"] = strip_remote_code(tmp) or None
        with atomic_file(tmp / "student_build.json") as f_tmp:
            f_tmp.write_text(json.dumps(record, indent=1, default=str))
    return out, record


def student_training_texts(recipe: Recipe) -> dict:
    """{capability: TrainingText} the build trains its tokenizer on and calibrates each tower with (recipe order)."""
    from .training_text import training_text

    options = recipe.stage(STAGE)
    train_data = getattr(recipe.stages.get("distill"), "train_data", {}) or {}
    return {c.name: training_text(c.name, c.data, train_data.get(c.name), options.chunk_chars,
                                  items=options.arithmetic_items) for c in recipe.capabilities}


def build_inputs_digest(recipe, profile, texts, feature_map=None, aligned_digest=None):
    """The build's cache key: its options and budget, the capabilities in order with the text it trains on, the
    profile's best teachers, and the profile's own inputs (a changed profile field invalidates every later stage;
    they also fingerprint the teachers' files), the capabilities left without a tower (no competent teacher) and the
    build's schema (a build of another layout is never reused), and the align stage's inputs when it ran."""
    from .profile import dropped_capabilities, profile_inputs
    from .training_text import training_texts_digest

    blob = json.dumps({"schema": SCHEMA, "no_competent_teacher": dropped_capabilities(recipe, profile),
                       "best": profile.get("best"), "options": recipe.stage(STAGE).model_dump(mode="json"),
                       "capabilities": [c.name for c in recipe.capabilities],
                       "training_text": training_texts_digest(texts),
                       "profile_inputs": profile_inputs(recipe),
                       "budget": recipe.student.budget.model_dump(mode="json"),
                       "feature_map": (hashlib.sha256(Path(feature_map).read_bytes()).hexdigest()
                                       if feature_map is not None else None),
                       "aligned": aligned_digest}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_student_build(recipe: Recipe, profile=None, out=None, console=None, show_progress=True, force=False,
                      feature_map=None, aligned=None):
    """The student_build stage: build into ``out`` (default ``runs/<name>/student_build``) unless a build with the same
    inputs (`build_inputs_digest`, the feature map's bytes included) is there; returns (path, record).
    ``feature_map``: the localise stage's feature_map.json when the pipeline ran it (see ``localisation``);
    ``aligned``: the align stage's record when the pipeline ran it (its merged teachers build one tower each)."""
    from .profile import load_profile

    profile = profile if profile is not None else load_profile(recipe.run_path)
    out = Path(out) if out is not None else recipe.run_path / STAGE
    texts = student_training_texts(recipe)
    if recipe.stage(STAGE).localisation == "off":
        feature_map = None
    merged = (aligned or {}).get("merged") or None
    # an align stage that merged nothing leaves the build's inputs (and its reuse key) as they were without it
    digest = build_inputs_digest(recipe, profile, texts, feature_map,
                                 (aligned or {}).get("inputs_digest") if merged else None)
    record_path = out / "student_build.json"
    if not force and record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("inputs_digest") == digest:
            return out, {**record, "reused": True}
    path, record = build_student(recipe, profile, out, texts=texts, console=console, show_progress=show_progress,
                                 inputs_digest=digest, feature_map=feature_map, merged=merged)
    return path, {**record, "reused": False}
