"""The distill stage: every capability's tower learns from its best teacher(s); the router learns the towers.

    summary = run_distill(recipe, "runs/demo/student_build")

1. **Plan** (nothing loaded but tokenizers, nothing written on bad input): the student's towers must serve every
   capability (``config.capability_to_tower``; several capabilities may share a tower) except those no teacher is
   competent at (`profile.dropped_capabilities`: the build gave them no tower, distillation skips them); each
   capability's teachers are its ``teachers_per_capability`` best in the profile; each teacher's alignment mode
   (``alignment.TEACHER``, else ``default_alignment``; ``auto`` = ``identity`` when the teacher shares the
   student's vocabulary, else ``token_aligned``) is checked against the tokenizers, so ``identity`` with a foreign
   vocabulary fails at once naming the modes.
2. **Teacher caches** (`training.teacher_cache`): per (teacher, capability), the teacher's top-k logits on the
   capability's training chunks (`conversion.training_text`), in ``distill/caches/<teacher>--<capability>/``.
   Teachers run ONE at a time: loaded, run over every capability they teach, freed before the next. A cache with the
   same key is reused; a corrupt shard is reported and rebuilt. Bytes per token of every cache are recorded.
3. **Rows** in the student vocabulary (`training.token_alignment`): ``token_aligned`` (teacher top-k mapped by
   character offsets), ``identity``, or ``sequence`` (sequence-level KD: the teacher's greedy answers to the items'
   prompts, or the text itself for plain text, re-tokenised and trained with cross-entropy). Each capability's last
   ``heldout_fraction`` of chunks is held out (router accuracy, the LMC score).
4. **Engine** (`training.distill_engine.train_student`): every optimizer step takes one micro-batch per (capability,
   teacher) group (gradient accumulation), each forced through its capability's tower; the router runs on the same
   rows and is trained on their tower index (``capability_to_tower`` of their capability: the router's classes are
   the towers; the loss mix's ``router`` part; a one-tower student has no router and the part is off). Router
   accuracy is reported overall and per capability. Checkpoints every ``checkpoint_every`` steps and exact resume;
   the NaN/inf guard; in-process preservation (``preservation``: off / lr_scale / anchor, importance = first-order
   Taylor on the first training batches). With ``keep_best`` (the default) the held-out cross-entropy is scored at
   every checkpoint step and the stage goes on with the best-scored weights (``train.evaluations``, ``train.best``).
5. **LMC** (`training.lmc`): the held-out cross-entropy (mean over capabilities) along the path init -> distilled;
   the student is the best alpha; ``lmc/lmc.json`` + ``lmc/lmc.png``.

Writes ``runs/<name>/distill/``: ``student/`` (NexusForCausalLM.save_pretrained + tokenizer, atomic),
``engine/`` (checkpoints, ``run_log.jsonl``, ``train_log.json``), ``caches/``, ``lmc/`` and ``distill.json``
(caches with bytes/token and alignment reports, router accuracy on held-out rows, the train summary, LMC).

Sample recipe section::

    stages:
      distill:
        loss: {kd: 1.0, ce: 0.2, router: 0.1, temperature: 1.0}
        alignment: {arithmetic-specialist: token_aligned}
        top_k: 32
        steps: 300
        lr: 1.0e-3
        preservation: {mode: lr_scale, strength: 0.5}
        lmc: true
        checkpoint_every: 50

Sources: Hinton et al. 2015 (KD), Kim & Rush 2016 (sequence-level KD), Wan et al. 2024 (FuseLLM token alignment),
Kirkpatrick et al. 2017 (EWC anchor), Frankle et al. 2020 (linear mode connectivity).
"""

import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..training.distill_losses import DistillLoss, LossMix, next_token_ce
from ..training.distill_options import PreservationOptions
from .atomic_output import atomic_dir, atomic_file
from .json_finite import json_finite
from .load_check import checked_from_pretrained
from .recipe import Recipe, register_stage_options
from .run_paths import recipe_sources

STAGE = "distill"
SCHEMA = "nexus.distill/1"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
AlignmentMode = Literal["auto", "token_aligned", "sequence", "identity"]


class DistillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: LossMix = Field(default_factory=lambda: LossMix(kd=1.0, ce=0.2, router=0.1),
                          description="the loss mix (kd, ce, router weights, temperature; hidden is not supported "
                                      "across towers yet)")
    alignment: dict[str, AlignmentMode] = Field(
        default_factory=dict, description="per teacher: token_aligned | sequence | identity | auto")
    default_alignment: AlignmentMode = Field(
        "auto", description="teachers not in `alignment`: auto = identity when the vocabulary is the student's, "
                            "else token_aligned")
    teachers_per_capability: int = Field(1, ge=1, description="distil each capability from its n best teachers")
    top_k: int = Field(32, ge=1, description="teacher logits kept per token in the cache (a teacher with fewer "
                                             "tokens keeps its whole distribution)")
    train_data: dict[str, str] = Field(
        default_factory=dict, description="per capability: its training source (default: the bundled train split "
                                          "or generated arithmetic items; required for other data)")
    tokens: int | None = Field(None, ge=1, description="token budget: at most this many student tokens of "
                                                       "training text per capability (default: all of it)")
    chunk_chars: int = Field(400, ge=16, description="training text is cut into chunks of about this many characters")
    arithmetic_items: int = Field(2000, ge=10, description="bundled:arithmetic / reversal: generated training items")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="share of each capability's chunks held out "
                                                                 "(router accuracy, LMC score)")
    seq_len: int = Field(128, ge=4, description="student tokens per row (capped at the longest chunk)")
    batch_size: int = Field(8, ge=1, description="rows per micro-batch (one micro-batch per capability per step)")
    steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW; warm-up then cosine)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps (default: a tenth of steps)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices")
    autocast: Literal["auto", "off", "bf16"] = Field("auto", description="bf16 autocast (auto: only with native bf16)")
    preservation: PreservationOptions = Field(default_factory=PreservationOptions,
                                              description="in-process preservation: off / lr_scale / anchor")
    preservation_batches: int = Field(2, ge=1, description="steps of training batches the Taylor importance uses")
    keep_best: bool = Field(True, description="score the held-out cross-entropy at every checkpoint step and end "
                                              "with the best-scored weights, not the last (the curve is in "
                                              "distill.json: train.evaluations)")
    lmc: bool = Field(True, description="walk the init -> distilled path and keep the best alpha")
    lmc_points: int = Field(6, ge=2, description="alphas on the LMC path")
    checkpoint_every: int = Field(50, ge=1, description="engine checkpoint every N steps (exact resume)")
    gradient_checkpointing: bool = Field(False, description="recompute layer activations in the backward pass (less "
                                                            "memory, same weights; not part of the stage's inputs)")
    cache_batch_size: int = Field(8, ge=1, description="windows per teacher forward pass while caching")
    sequence_max_new_tokens: int = Field(16, ge=1, description="sequence mode: tokens the teacher generates per "
                                                                "item prompt")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds batch sampling and the engine")
    freeze_exact_towers: bool = Field(
        True, description="towers that reproduce their teacher exactly (built whole from the base teacher, whose "
                          "embedding, head and final norm the student shares; student_build.json 'exact') are frozen "
                          "with those shared weights: their capabilities train only the router (no teacher cache). "
                          "Measured on Gemma-3-270M: distilling the exact Gemma tower lowered its prose retention by "
                          "0.040 (bench/results/gemma_base_vocab.json)")

    @model_validator(mode="after")
    def _check(self):
        if self.loss.hidden > 0:
            raise ValueError("loss.hidden: hidden-state alignment is not supported by the multi-tower distill stage "
                             "(each tower has its own widths); set it to 0")
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        return self


register_stage_options(STAGE, DistillOptions)


class DistillError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------- planning


def capability_teachers(recipe, profile, n):
    """{capability: [teacher, ...]} its ``n`` best-scored teachers in the profile (best first), for every capability
    the student serves (one no teacher is competent at is left out: `profile.dropped_capabilities`)."""
    from .profile import dropped_capabilities

    dropped = dropped_capabilities(recipe, profile)
    out = {}
    for i, cap in enumerate(recipe.capabilities):
        if cap.name in dropped:
            continue
        scored = (profile.get("capabilities") or {}).get(cap.name) or {}
        if not scored:
            raise DistillError(f"capability {cap.name!r} (capabilities[{i}]) has no scored teacher in the profile; "
                               "rerun `nexus profile`")
        higher = next(iter(scored.values()))["higher_is_better"]
        ranked = sorted(scored, key=lambda t: scored[t]["score"], reverse=higher)
        best = profile.get("best", {}).get(cap.name, ranked[0])
        out[cap.name] = ([best] + [t for t in ranked if t != best])[:n]
    return out


def plan_alignment(recipe, options, teachers_of, student_tok, tokenizers):
    """{teacher: mode}; ``identity`` with a foreign vocabulary raises, naming the modes to use."""
    from ..training.token_alignment import check_alignment_mode, same_vocabulary

    names = [t.name for t in recipe.teachers]
    for name in options.alignment:
        if name not in names:
            raise DistillError(f"stages.distill.alignment.{name}: unknown teacher; teachers: {', '.join(names)}")
    modes = {}
    for teacher in dict.fromkeys(t for ts in teachers_of.values() for t in ts):
        mode = options.alignment.get(teacher, options.default_alignment)
        if mode == "auto":
            mode = "identity" if same_vocabulary(tokenizers[teacher], student_tok) else "token_aligned"
        try:
            modes[teacher] = check_alignment_mode(mode, tokenizers[teacher], student_tok, teacher_name=teacher)
        except ValueError as exc:
            raise DistillError(f"stages.distill.alignment.{teacher}: {exc}") from None
    return modes


def _files_fingerprint(folder):
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.glob("*")):
        if p.is_file() and (p.suffix in (".safetensors", ".json")):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _split(texts, fraction):
    """(train TrainingText, held-out TrainingText): the last ``fraction`` of the chunks is held out."""
    from dataclasses import replace

    n = len(texts.chunks)
    k = max(1, int(round(n * fraction))) if n > 1 else 0
    cut = n - k
    prompts = texts.prompts
    train = replace(texts, chunks=texts.chunks[:cut], prompts=prompts[:cut] if prompts else None)
    held = replace(texts, chunks=texts.chunks[cut:], prompts=prompts[cut:] if prompts else None)
    if not train.chunks or not held.chunks:
        raise DistillError(f"capability {texts.capability!r}: {n} training chunk(s) cannot be split into train and "
                           "held-out parts; give more training text")
    return train, held


def _limit_tokens(texts, tokenizer, tokens):
    """Keep the first chunks whose student tokens add up to at most ``tokens`` (at least one chunk)."""
    if tokens is None:
        return texts
    lengths = [len(x) for x in tokenizer(texts.chunks, add_special_tokens=True)["input_ids"]]
    total, keep = 0, 0
    for n in lengths:
        if keep and total + n > tokens:
            break
        total += n
        keep += 1
    texts.chunks = texts.chunks[:keep]
    if texts.prompts is not None:
        texts.prompts = texts.prompts[:keep]
    return texts


# ---------------------------------------------------------------------------------------------------- rows


def _seq_len(texts, tokenizer, cap):
    return max(2, min(cap, max(len(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"])))


def rows_for(mode, texts, cache, teacher_tok, student_tok, seq_len, tower, generated=None):
    """(rows, report) of one (teacher, capability) in the student vocabulary."""
    from ..training.token_alignment import identity_rows, sequence_kd_rows, token_aligned_rows

    if mode == "token_aligned":
        rows, report = token_aligned_rows(texts.chunks, cache, teacher_tok, student_tok, seq_len, capability=tower)
        return rows, report.as_dict()
    if mode == "identity":
        pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else 0
        rows = identity_rows(cache, seq_len, capability=tower, pad_id=pad, teacher_tokenizer=teacher_tok,
                             student_tokenizer=student_tok)
        return rows, {"n_rows": len(rows)}
    chunks = generated if generated is not None else texts.chunks
    rows = sequence_kd_rows(chunks, student_tok, seq_len, capability=tower,
                            prompts=texts.prompts if generated is not None else None)
    return rows, {"n_rows": len(rows), "texts": "teacher continuations" if generated is not None else "training text"}


class GroupBatches:
    """``batches(i)``: micro-batch ``i`` is ``batch_size`` rows of group ``i % n_groups``, drawn with a generator
    seeded by (seed, i) — a pure function of ``i``, so a resumed run sees exactly the same batches."""

    def __init__(self, groups, batch_size, seed):
        self.groups, self.batch_size, self.seed = groups, batch_size, seed

    def __call__(self, i):
        from ..training.token_alignment import collate_distill_rows

        group = self.groups[i % len(self.groups)]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        idx = torch.randint(0, len(group["rows"]), (self.batch_size,), generator=gen).tolist()
        batch = collate_distill_rows([group["rows"][j] for j in idx])
        batch["tower"] = torch.full((self.batch_size,), group["tower"], dtype=torch.long)
        if group.get("router_only"):  # a frozen tower's capability: it trains the router only
            batch["router_only"] = True
        return batch


class GroupLoss(torch.nn.Module):
    """The loss mix on token-level rows; on sequence-level rows (no teacher logits) the KD weight moves to CE."""

    def __init__(self, mix: LossMix):
        super().__init__()
        self.token = DistillLoss(mix)
        seq = mix.model_copy(update={"kd": 0.0, "ce": mix.ce + mix.kd})
        self.sequence = DistillLoss(LossMix.model_validate(seq.model_dump()))
        self.router = DistillLoss(LossMix(kd=0.0, ce=0.0, router=mix.router)) if mix.router > 0 else None

    def forward(self, outputs, batch):
        if batch.get("router_only"):
            return self.router(outputs, batch)
        return (self.token if "teacher_topk_values" in batch else self.sequence)(outputs, batch)


def make_forward(router):
    """The engine's forward: the batch's tower, plus the router's logits on the same rows when it is trained."""
    from ..training.forward_batch import forward_batch

    def forward(model, batch):
        if batch.get("router_only"):  # a frozen tower: only the router's logits (see GroupLoss)
            from types import SimpleNamespace

            inner = getattr(model, "module", model)
            embeds = inner.model.embed_tokens(batch["input_ids"])
            return SimpleNamespace(logits=None, router_logits=inner.model.router(embeds, batch.get("attention_mask")))
        out = forward_batch(model, batch)
        if router:
            inner = getattr(model, "module", model)
            if inner.model.router is not None:
                embeds = inner.model.embed_tokens(batch["input_ids"])
                out.router_logits = inner.model.router(embeds, batch.get("attention_mask"))
        return out

    return forward


@torch.no_grad()
def router_accuracy(model, groups):
    """Router accuracy on held-out rows: overall and per capability (the router runs as at inference)."""
    from ..training.token_alignment import collate_distill_rows

    if model.model.router is None:
        return {"overall": 1.0, "per_capability": {}, "n": 0, "note": "one tower: no router"}
    right, total, per = 0, 0, {}
    for g in groups:
        batch = collate_distill_rows(g["rows"])
        logits = model.model.router(model.model.embed_tokens(batch["input_ids"]), batch["attention_mask"])
        hit = int((logits.argmax(-1) == g["tower"]).sum())
        n = len(g["rows"])
        c = per.setdefault(g["capability"], [0, 0])
        c[0] += hit
        c[1] += n
        right, total = right + hit, total + n
    return {"overall": right / max(total, 1), "n": total,
            "per_capability": {c: h / max(n, 1) for c, (h, n) in per.items()}}


HELDOUT_LOGIT_BUDGET = 1 << 22  # logits per held-out batch (16 MiB in fp32; the loss makes a few copies of them)


@torch.no_grad()
def heldout_ce(model, groups, batch_size=16):
    """Mean over capabilities of the next-token cross-entropy (nats/token) on their held-out rows; at most
    ``batch_size`` rows per forward, fewer when their logits would pass `HELDOUT_LOGIT_BUDGET` (a 10k-token
    vocabulary at 128 tokens makes 80 MiB of logits per 16 rows, and the softcap and the loss copy them)."""
    from ..training.token_alignment import collate_distill_rows

    vocab = int(model.config.vocab_size)
    by_cap = {}
    for g in groups:
        longest = max((len(r["input_ids"]) for r in g["rows"]), default=1)
        rows = max(1, min(batch_size, HELDOUT_LOGIT_BUDGET // max(1, longest * vocab)))
        for b in range(0, len(g["rows"]), rows):
            batch = collate_distill_rows(g["rows"][b:b + rows])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], tower=g["tower"],
                           use_cache=False).logits
            n = int((batch["labels"][:, 1:] != -100).sum())
            by_cap.setdefault(g["capability"], [0.0, 0])
            by_cap[g["capability"]][0] += float(next_token_ce(logits, batch["labels"])) * n
            by_cap[g["capability"]][1] += n
    return sum(s / max(n, 1) for s, n in by_cap.values()) / len(by_cap)


# ---------------------------------------------------------------------------------------------------- the stage


def distill_inputs(recipe, options, student_init, teachers_of, modes, folders, texts, held):
    """The stage's cache key: the student init's files, the options, each capability's teachers and alignment modes,
    the distilling teachers' files (a GGUF's converted folder) and the train / held-out text it learns from."""
    from ..training.distill_engine import resolve_autocast
    from .training_text import training_texts_digest

    return {"student_init": _files_fingerprint(student_init),
            "options": options.model_dump(mode="json", exclude={"gradient_checkpointing"}),
            "autocast_resolved": resolve_autocast(options.autocast),  # "auto" means bf16 on a native-bf16 CPU only
            "teachers_of": teachers_of, "modes": modes,
            "capabilities": [c.name for c in recipe.capabilities],
            "teachers": {name: _files_fingerprint(folder) for name, folder in folders.items()},
            "training_text": training_texts_digest(texts), "heldout_text": training_texts_digest(held)}


ENGINE_INPUTS = "inputs_digest.json"  # in engine/: the inputs its checkpoints were trained for


def _discard_stale_engine(engine, digest, redo):
    """Remove ``engine`` (checkpoints, run log) when its checkpoints were trained for other inputs than ``digest``
    (another init, other data, other options: resuming them would continue the wrong run) or when ``redo`` (a
    finished run with these inputs is forced to run again). A crashed run with the same inputs is kept to resume."""
    import shutil

    if not engine.is_dir():
        return
    try:
        recorded = json.loads((engine / ENGINE_INPUTS).read_text()).get("inputs_digest")
    except (OSError, ValueError):
        recorded = None
    if redo or recorded != digest:
        shutil.rmtree(engine)


def exact_towers(student_init):
    """Indexes of the towers ``student_build.json`` (beside the student init) marks exact; empty without it."""
    try:
        record = json.loads((Path(student_init) / "student_build.json").read_text())
    except (OSError, ValueError):
        return set()
    return {t["index"] for t in record.get("towers", []) if t.get("exact")}


def freeze_towers(model, towers):
    """Freeze ``towers`` and the shared embedding, final norm and head (the base teacher's, which exact towers
    read); returns {what: parameters frozen}."""
    frozen = {}
    parts = [(f"tower {model.model.towers[t].name}", model.model.towers[t]) for t in sorted(towers)]
    if towers:
        parts += [("shared embedding", model.model.embed_tokens), ("shared final norm", model.model.norm),
                  ("shared LM head", model.lm_head)]
    for name, module in parts:
        n = 0
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                n += p.numel()
        frozen[name] = n
    return frozen


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _preservation_options(options):
    """Critical units are marked 0/1: normalise them by the maximum (a rank would spread the ties over [0, 1])."""
    return options.model_copy(update={"normalise": "max"}) if options.importance == "critical" else options


def _critical_importance(model, student_init, console):
    """Preservation importance on exactly the critical units the student build kept (`critical_units`)."""
    from .critical_units import critical_importance

    build_json = Path(student_init) / "student_build.json"
    towers = json.loads(build_json.read_text()).get("towers", []) if build_json.is_file() else []
    importance = {}
    for t in towers:
        crit = (t.get("compress") or {}).get("critical")
        if crit and (crit["head"] or crit["neuron"]):
            importance.update(critical_importance(model, t["index"], crit))
            console.print(f"  preservation: tower {t['index']} ({t.get('capability')}): {len(crit['head'])} critical "
                          f"heads, {len(crit['neuron'])} critical neurons protected")
    if not importance:
        raise DistillError(f"stages.distill.preservation.importance is 'critical' but {build_json} records no "
                           "critical units: run the localise stage before student_build (pipeline: [profile, "
                           "localise, student_build, ...]) with localisation: auto, or use importance: taylor")
    return importance


def run_distill(recipe: Recipe, student_init, profile=None, out=None, console=None, show_progress=True,
                resume=True, force=False) -> dict:
    """Distil the teachers into the student at ``student_init``; returns the summary (also ``distill.json``).

    ``profile``: the profile dict (default: ``runs/<name>/profile/profile.json``); ``out``: the stage folder
    (default ``runs/<name>/distill``); ``resume``: continue the engine from its newest checkpoint; a finished run
    with the same inputs is returned as it is unless ``force``.
    """
    from rich.console import Console

    from ..modeling_nexus import NexusForCausalLM
    from ..training.distill_engine import train_student
    from ..training.distill_options import EngineOptions
    from ..training.preservation import Preservation, taylor_importance
    from ..training.teacher_cache import CacheSettings, build_teacher_cache
    from .profile import load_profile
    from .teacher_source import load_teacher, load_tokenizer, resolve_teacher_folder
    from .tokenizer_roundtrip import check_training_texts
    from .training_text import training_text

    start = time.perf_counter()
    console = console or Console(quiet=not show_progress)
    options = recipe.stage(STAGE)
    student_init = Path(student_init)
    if not (student_init / "config.json").is_file():
        raise DistillError(f"student init {student_init} is not a checkpoint folder (no config.json); build it with "
                           "the student_build stage")
    profile = profile if profile is not None else load_profile(recipe.run_path)
    out = Path(out) if out is not None else recipe.run_path / STAGE

    # ---------------------------------------------------------------- plan (tokenizers only)
    student_tok = load_tokenizer(student_init)
    model = checked_from_pretrained(NexusForCausalLM, student_init, what="student init", dtype=torch.float32).eval()
    cap_to_tower = model.config.capability_to_tower
    mix = options.loss
    if mix.router > 0 and len(model.config.towers) == 1:  # e.g. every capability's best teacher is the same one
        try:
            mix = LossMix.model_validate({**mix.model_dump(), "router": 0.0})
        except ValueError:
            raise DistillError("stages.distill.loss: the student has one tower, so the router part has nothing to "
                               "learn and every other loss weight is 0; give kd or ce a positive weight") from None
        console.print("  one tower: no router to train (loss.router ignored)")
    teachers_of = capability_teachers(recipe, profile, options.teachers_per_capability)  # served capabilities only
    frozen = exact_towers(student_init) if options.freeze_exact_towers else set()
    router_trains = mix.router > 0 and len(model.config.towers) > 1
    frozen_params = freeze_towers(model, frozen)
    if frozen:
        console.print("  frozen (exact copies of their teacher): "
                      + ", ".join(f"{k} ({v:,})" for k, v in frozen_params.items())
                      + ("; their capabilities train the router only" if router_trains else ""))
    missing = [c for c in teachers_of if c not in cap_to_tower]
    if missing:
        raise DistillError(f"the student at {student_init} has no tower for capability(ies) {missing}; its towers "
                           f"serve {sorted(cap_to_tower)}")
    no_competent = [c.name for c in recipe.capabilities if c.name not in teachers_of]
    if no_competent:
        console.print(f"  [bold red]no competent teacher for {', '.join(no_competent)}[/]: not distilled")
    folders, tokenizers = {}, {}
    for name in dict.fromkeys(t for ts in teachers_of.values() for t in ts):
        spec = recipe.teacher(name)
        folders[name] = resolve_teacher_folder(spec.source, spec.allow_pickle, recipe.cache_dir)
        tokenizers[name] = load_tokenizer(folders[name], trust_remote_code=spec.trust_remote_code)
    modes = plan_alignment(recipe, options, teachers_of, student_tok, tokenizers)
    texts, held = {}, {}
    for cap in recipe.capabilities:
        if cap.name not in teachers_of:
            continue
        t = training_text(cap.name, cap.data, options.train_data.get(cap.name), options.chunk_chars,
                          items=options.arithmetic_items)
        train, heldout = _split(t, options.heldout_fraction)
        texts[cap.name] = _limit_tokens(train, student_tok, options.tokens)
        held_tokens = None if options.tokens is None else max(1, int(options.tokens * options.heldout_fraction))
        held[cap.name] = _limit_tokens(heldout, student_tok, held_tokens)
    for name, tok in tokenizers.items():  # before any teacher loads: a lossy tokenizer would teach wrong text
        check_training_texts(tok, name, {c: texts[c] for c, ts in teachers_of.items() if name in ts}, recipe)
    inputs = distill_inputs(recipe, options, student_init, teachers_of, modes, folders, texts, held)
    digest = _digest(inputs)
    summary_path = out / "distill.json"
    try:
        previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except (OSError, ValueError):
        previous = {}
    finished = previous.get("inputs_digest") == digest and (out / "student" / "config.json").is_file()
    if finished and not force:
        return {**previous, "reused": True}
    _discard_stale_engine(out / "engine", digest, redo=finished)
    with atomic_file(out / "engine" / ENGINE_INPUTS) as tmp:
        tmp.write_text(json.dumps({"inputs_digest": digest}))

    # ---------------------------------------------------------------- caches, one teacher at a time
    out.mkdir(parents=True, exist_ok=True)
    caches, groups, heldout_groups = {}, [], []
    by_teacher = {}
    for cap, ts in teachers_of.items():
        for t in ts:
            by_teacher.setdefault(t, []).append(cap)
    console.rule("[bold]distill: teacher caches (one teacher resident at a time)")
    for teacher, caps in by_teacher.items():
        spec = recipe.teacher(teacher)
        resident = {}

        def loader(spec=spec, resident=resident):
            if "model" not in resident:
                resident["model"], _ = load_teacher(spec.source, DTYPES[spec.dtype], spec.allow_pickle,
                                                    spec.trust_remote_code, recipe.cache_dir,
                                                    with_tokenizer=False)  # `tokenizers` holds it already
            return resident["model"]

        t_tok, mode = tokenizers[teacher], modes[teacher]
        max_len = None
        try:
            for cap in caps:
                tower = cap_to_tower[cap]
                entry = {"teacher": teacher, "capability": cap, "mode": mode, "tower": tower}
                if tower in frozen:  # nothing to distil: its rows (no teacher) train the router and score held-out CE
                    from ..training.token_alignment import sequence_kd_rows

                    entry["mode"] = "frozen (router only)"
                    for part, source in (("train", texts[cap]), ("heldout", held[cap])):
                        seq_len = _seq_len(source.chunks, student_tok, options.seq_len)
                        rows = sequence_kd_rows(source.chunks, student_tok, seq_len, capability=tower)
                        group = {"capability": cap, "teacher": teacher, "tower": tower, "rows": rows,
                                 "router_only": True}
                        if part == "heldout":
                            heldout_groups.append(group)
                        elif router_trains:
                            groups.append(group)
                    caches[f"{teacher}--{cap}"] = entry
                    console.print(f"  {teacher} -> {cap} (tower {tower}): frozen, "
                                  + ("router rows only" if router_trains else "not trained"))
                    continue
                for part, source in (("train", texts[cap]), ("heldout", held[cap])):
                    seq_len = _seq_len(source.chunks, student_tok, options.seq_len)
                    cache, generated = None, None
                    if mode == "sequence":
                        if source.prompts is not None:
                            from ..training.token_alignment import teacher_continuations

                            generated = teacher_continuations(loader(), t_tok, source.prompts,
                                                              max_new_tokens=options.sequence_max_new_tokens)
                    else:
                        if max_len is None:
                            from transformers import AutoConfig

                            cfg = AutoConfig.from_pretrained(folders[teacher])
                            cfg = getattr(cfg, "text_config", None) or cfg
                            max_len = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
                            top_k = min(options.top_k, int(getattr(cfg, "vocab_size", 0) or options.top_k))
                            if top_k < options.top_k:  # a teacher this small: its top-k is its whole distribution
                                console.print(f"  {teacher}: top_k {options.top_k} is more than its {top_k}-token "
                                              f"vocabulary; its whole distribution ({top_k} logits) is cached")
                        entry["top_k"] = top_k
                        settings = CacheSettings(k=top_k, max_length=max_len, tokens_per_shard=16384)
                        path = out / "caches" / f"{teacher}--{cap}--{part}"
                        cache = build_teacher_cache(path, loader, source.chunks, tokenizer=t_tok, settings=settings,
                                                    teacher_fingerprint=_files_fingerprint(folders[teacher]),
                                                    batch_size=options.cache_batch_size, progress=show_progress,
                                                    description=f"{teacher} x {cap} ({part})")
                        entry[f"{part}_cache"] = {"path": str(path), "bytes_per_token": cache.bytes_per_token,
                                                  "bytes_per_token_parts": cache.manifest.get("bytes_per_token_parts"),
                                                  "tokens": cache.manifest["data"]["n_tokens"],
                                                  "windows": len(cache), "events": cache.report}
                    rows, report = rows_for(mode, source, cache, t_tok, student_tok, seq_len, tower, generated)
                    entry[f"{part}_alignment"] = report
                    group = {"capability": cap, "teacher": teacher, "tower": tower, "rows": rows}
                    (groups if part == "train" else heldout_groups).append(group)
                caches[f"{teacher}--{cap}"] = entry
                cpt = entry.get("train_cache", {}).get("bytes_per_token")
                console.print(f"  {teacher} -> {cap} (tower {tower}, {mode}): {len(groups[-1]['rows'])} train rows, "
                              f"{len(heldout_groups[-1]['rows'])} held-out"
                              + (f"; cache {cpt:.1f} bytes/token" if cpt else "")
                              + (f"; aligned {entry['train_alignment']['aligned_fraction']:.3f} of positions, "
                                 f"top-k mass kept {entry['train_alignment']['mass_kept']:.3f}"
                                 if mode == "token_aligned" else ""))
        finally:
            resident.clear()  # the teacher is freed before the next one loads
            gc.collect()
    # training needs none of the teachers' tokenizers (Gemma-3's holds ~320 MiB): free them, and return the freed
    # heap to the OS, so the training phase starts from the stage's floor (as the memory plan assumes)
    tokenizers.clear()
    t_tok = None
    from .peak_rss import release_freed_memory

    release_freed_memory()

    # ---------------------------------------------------------------- engine
    loss_module = GroupLoss(mix)
    forward = make_forward(router=mix.router > 0 and len(model.config.towers) > 1)
    batches = GroupBatches(groups, options.batch_size, options.seed)
    engine = EngineOptions(steps=options.steps, micro_batches_per_step=len(groups), lr=options.lr,
                           warmup_steps=options.steps // 10 if options.warmup_steps is None else options.warmup_steps,
                           weight_decay=options.weight_decay,
                           autocast=options.autocast, seed=options.seed, checkpoint_every=options.checkpoint_every,
                           keep_last=2, gradient_checkpointing=options.gradient_checkpointing)
    importance = None
    if options.preservation.mode != "off" and options.preservation.importance == "critical":
        importance = _critical_importance(model, student_init, console)
    elif options.preservation.mode != "off":
        calib = [batches(i) for i in range(options.preservation_batches * len(groups))]
        importance = taylor_importance(model, calib, loss_module, forward)
    router_before = router_accuracy(model, heldout_groups)
    ce_before = heldout_ce(model, heldout_groups)
    if groups:
        console.rule(f"[bold]distill: {options.steps} steps x {len(groups)} micro-batches of {options.batch_size} "
                     "rows")
        log = train_student(model, loss_module, batches, engine, out / "engine",
                            preservation=Preservation(_preservation_options(options.preservation), importance),
                            forward=forward, resume=resume, progress=show_progress,
                            evaluate=(lambda m: heldout_ce(m, heldout_groups))
                            if options.keep_best and heldout_groups else None)
    else:  # every tower frozen and no router to train: the student init is the result
        console.print("  nothing to train: every tower is an exact copy of its teacher (freeze_exact_towers)")
        log = {"steps": 0, "tokens": 0, "wall_seconds": 0.0, "tokens_per_second": None, "skipped_steps": 0,
               "first_loss": None, "final_loss": None, "resumed_from": None, "preservation": None,
               "autocast": None, "run_log": None, "note": "nothing to train"}
    ce_after = heldout_ce(model, heldout_groups)

    # ---------------------------------------------------------------- LMC init -> distilled
    lmc = None
    if options.lmc:
        from ..training.lmc import lmc_refine

        distilled = {k: v.detach().clone() for k, v in model.state_dict().items()}
        lmc = lmc_refine(model, student_init, distilled, lambda m: heldout_ce(m, heldout_groups),
                         {"points": options.lmc_points, "higher_is_better": False}, out_dir=out / "lmc",
                         labels=("student init", "distilled"), score_name="held-out CE (nats/token, mean over caps)")
        console.print(f"  LMC init -> distilled: best alpha {lmc['best_alpha']:.2f} (held-out CE "
                      f"{lmc['best_score']:.4f}), barrier {lmc['barrier']:.4f}; {lmc['png']}")
    router_after = router_accuracy(model, heldout_groups)
    console.print(f"  router accuracy on held-out rows: {router_after['overall']:.3f} (n={router_after['n']}; before "
                  f"distillation {router_before['overall']:.3f}); per capability "
                  + ", ".join(f"{c} {a:.3f}" for c, a in router_after["per_capability"].items()))

    # ---------------------------------------------------------------- outputs
    student_path = out / "student"
    model.config.nexus_source = {"stage": STAGE, "init": str(student_init),
                                 "teachers": {c: ts for c, ts in teachers_of.items()}}
    with atomic_dir(student_path, overwrite=True,
                    sources={**recipe_sources(recipe), "student init": student_init}) as tmp:
        model.save_pretrained(tmp)
        student_tok.save_pretrained(tmp)
    summary = {
        "schema": SCHEMA,
        "student": str(student_path),
        "student_init": str(student_init),
        "params": sum(p.numel() for p in model.parameters()),
        "teachers_of": teachers_of,
        "capability_to_tower": dict(cap_to_tower),
        "no_competent_teacher": no_competent,
        "alignment": modes,
        "caches": caches,
        "bytes_per_token": {k: e["train_cache"]["bytes_per_token"] for k, e in caches.items() if "train_cache" in e},
        "router_accuracy": router_after,
        "router_accuracy_before": router_before,
        "heldout_ce": {"init": ce_before, "distilled": ce_after,
                       "final": lmc["best_score"] if lmc else ce_after},
        "lmc": ({k: lmc[k] for k in ("best_alpha", "best_score", "barrier", "barrier_alpha", "alphas", "scores",
                                     "json", "png")} if lmc else None),
        "train": {k: log[k] for k in ("steps", "tokens", "wall_seconds", "tokens_per_second", "skipped_steps",
                                      "first_loss", "final_loss", "resumed_from", "preservation", "autocast",
                                      "run_log")}
                 | {k: log.get(k) for k in ("evaluations", "best", "restored_best")},
        "frozen": frozen_params,
        "train_log": str(out / "engine" / "train_log.json"),
        "rows": {f"{g['teacher']}--{g['capability']}": len(g["rows"]) for g in groups},
        "heldout_rows": {f"{g['teacher']}--{g['capability']}": len(g["rows"]) for g in heldout_groups},
        "options": options.model_dump(mode="json"),
        "inputs_digest": digest,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with atomic_file(summary_path) as tmp:
        tmp.write_text(json.dumps(json_finite(summary), indent=1, default=str))
    return {**summary, "reused": False}

