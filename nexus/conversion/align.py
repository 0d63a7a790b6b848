"""The align stage's work: fold tower teachers that share one architecture and one tokenizer into ONE teacher.

Without it every teacher that is best at some capability gets its own tower (`student_build.teacher_towers`). Two
fine-tunes of one base model (Gemma-3-270M and a Gemma-3-270M specialist) then cost two towers, each pruned to its
share of the budget. With the align stage in the pipeline, such teachers are merged first and the student builds one
tower from the merged teacher, serving every capability its members were best at, with their summed budget:

1. **Groups.** The tower teachers (the profile's best teachers of the served capabilities) are grouped by their
   architecture (model type and every shape in the config) and their tokenizer (the sha256 of its vocabulary). A
   group of one is left alone; nothing is merged across families or tokenizers.
2. **Calibration.** Each member's served capabilities' training text (`student_build.student_training_texts`), the
   first ``calibration_tokens`` tokens of each, in windows of ``window_tokens``.
3. **Merge.** ``method: ot``: the members' FFN units and attention heads are matched by optimal transport on their
   activation correlations over those windows and averaged (`ot_merge.ot_merge`, POT's exact solver; Singh & Jaggi
   2020). ``method: linear``: the plain average (mergekit's ``linear``), a baseline. Members are folded in one at a
   time with equal shares (the k-th with weight 1/k) unless ``alpha`` sets the later members' share.
   ``method: ties``: TIES merging (`ties_merge.ties_merge`, mergekit's ``ties``), a baseline: the members' task
   vectors against ``base`` are trimmed to ``density``, sign-elected and averaged onto the base.
4. **Measured.** On the next ``heldout_tokens`` of each capability's text, the next-token loss of the capability's own
   teacher, of the merged teacher and of the plain average: the merge's cost before any pruning or distillation,
   in ``align.json``.
5. **Guarded.** A merge that raises some served capability's held-out loss by more than ``max_loss_increase`` (a
   fraction of its own teacher's loss, default 0.10) is not used (two independently trained models of one
   architecture do not average well); its members then keep one tower each, and ``align.json`` lists it under
   ``rejected`` with its losses. On Gemma-3-270M and its code fine-tune the merge costs code +0.058 nats (+2.7%) and
   gains prose (``bench/results/align_gemma_pair.json``).

The merged teacher is saved as an ordinary HF folder (safetensors, the members' tokenizer) under
``runs/<name>/align/<merged>/``; `student_build` builds its tower from there. Distillation still uses each
capability's own best teacher, so the merged tower is trained towards every member.
"""

import gc
import hashlib
import json
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .atomic_output import atomic_dir, atomic_file
from .recipe import Recipe

STAGE = "align"
SCHEMA = "nexus.align/1"
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings")


class AlignError(ValueError):
    pass


class AlignOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["ot", "linear", "ties"] = Field(
        "ot", description="ot: match FFN units and heads by optimal transport on activation correlations, then "
                          "average (ot_merge.py); linear: the plain average (mergekit's linear), a baseline; ties: "
                          "TIES merging onto ``base`` (ties_merge.py, mergekit's ties), a baseline")
    base: str | None = Field(
        None, description="ties: the teacher the others were fine-tuned from (a recipe teacher of the same "
                          "architecture and tokenizer; default the group's first tower teacher)")
    density: float = Field(0.2, gt=0, le=1, description="ties: the fraction of each task vector's largest-magnitude "
                                                        "entries kept")
    alpha: float | None = Field(
        None, gt=0, lt=1, description="each later member's share when it is folded in (default: equal shares, the "
                                      "k-th member 1/k)")
    match_heads: bool = Field(True, description="ot: also match attention heads (within and across kv groups)")
    calibration_tokens: int = Field(2048, ge=16, description="tokens of each served capability's training text the "
                                                             "correlations are measured on")
    heldout_tokens: int = Field(1024, ge=0, description="the next tokens of each capability's text: the loss of its "
                                                        "own teacher, the merged teacher and the plain average")
    window_tokens: int = Field(128, ge=4, description="tokens per calibration window")
    autocast: bool = Field(False, description="bf16 autocast for the correlation passes")
    max_loss_increase: float | None = Field(
        0.10, ge=0, description="a merge whose held-out next-token loss on any capability it serves exceeds that "
                                "capability's own teacher's by more than this fraction is not used: its members keep "
                                "their own towers (recorded under ``rejected``). None: every merge is used")


# ------------------------------------------------------------------------------------------------------ groups


def architecture_signature(folder) -> dict:
    """The config fields two teachers must share to be merged tensor by tensor, and their vocabulary's sha256."""
    from transformers import AutoConfig

    from .teacher_source import load_tokenizer

    config = AutoConfig.from_pretrained(folder)
    config = getattr(config, "text_config", None) or config
    vocab = load_tokenizer(folder).get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    return {**{k: getattr(config, k, None) for k in SHAPE_KEYS}, "vocabulary_sha256": digest}


def merge_groups(recipe: Recipe, profile: dict, folders: dict) -> tuple[list, dict]:
    """``(groups, signatures)``: the tower teachers sharing an architecture and a tokenizer, as lists of names in tower
    order (groups of two or more only), and every tower teacher's signature."""
    from .student_build import teacher_towers, tower_teachers

    serves = teacher_towers(tower_teachers(recipe, profile))
    signatures = {name: architecture_signature(folders[name]) for name in serves}
    by_key = {}
    for name, sig in signatures.items():
        by_key.setdefault(json.dumps(sig, sort_keys=True), []).append(name)
    return [names for names in by_key.values() if len(names) > 1], signatures


# ------------------------------------------------------------------------------------------------------ merging


def _windows(tokenizer, text, skip, tokens, window):
    """(rows, window) token windows of ``tokens`` tokens of ``text`` after its first ``skip`` tokens (None if none)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][skip:skip + tokens]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = window - (start is not None)
    rows = [ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]
    if not rows:
        return None
    return torch.tensor([([start] if start is not None else []) + r for r in rows], dtype=torch.long)


@torch.no_grad()
def next_token_loss(model, windows, batch_size=4, autocast=False) -> float:
    """Mean next-token cross-entropy of ``model`` over ``windows`` (every row the same length); ``autocast``: bf16."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        total, count = total + float(loss), count + ids[:, 1:].numel()
    return total / count


def merge_group(members: dict, serves: dict, texts: dict, options: AlignOptions, console=None,
                base: tuple | None = None) -> tuple:
    """``(merged_model, tokenizer, record)``: ``members`` {teacher: folder} folded into one model.

    ``serves`` {teacher: [capability, ...]}, ``texts`` {capability: TrainingText}; ``base`` (name, folder), for
    ``method: ties``: the model the members' task vectors are taken against (default the first member)."""
    from .ot_merge import average_models, ot_merge
    from .teacher_source import load_teacher
    from .ties_merge import ties_merge

    names = list(members)
    models, tokenizer = {}, None
    for name in names:
        models[name], tok = load_teacher(members[name], dtype=torch.float32, with_tokenizer=tokenizer is None)
        tokenizer = tokenizer or tok
    base_name = base[0] if base is not None else names[0]
    calibration, heldout = [], {}
    for name in names:
        for cap in serves[name]:
            text = "\n".join(texts[cap].chunks)
            w = _windows(tokenizer, text, 0, options.calibration_tokens, options.window_tokens)
            if w is None:
                raise AlignError(f"capability {cap!r}: its training text has fewer than {options.window_tokens} "
                                 f"tokens, too little to calibrate the merge of {', '.join(names)}")
            calibration.append(w)
            if options.heldout_tokens:
                h = _windows(tokenizer, text, options.calibration_tokens, options.heldout_tokens, options.window_tokens)
                if h is not None:
                    heldout[cap] = (name, h)
    windows = torch.cat(calibration)
    merged, naive, steps = models[names[0]], models[names[0]], []
    if options.method == "ties":
        base_model = models[base_name] if base_name in models else load_teacher(base[1], dtype=torch.float32)[0]
        others = [models[n] for n in names if n != base_name]
        if console is not None:
            console.print(f"  align: TIES merge of {', '.join(n for n in names if n != base_name)} onto {base_name} "
                          f"(density {options.density})")
        merged = ties_merge(base_model, others, density=options.density)
        steps.append({"base": base_name, "members": [n for n in names if n != base_name], "density": options.density})
        del base_model
    for k, name in enumerate(names[1:], start=2):
        alpha = options.alpha if options.alpha is not None else 1.0 / k
        if console is not None and options.method != "ties":
            console.print(f"  align: folding {name} into {' + '.join(names[:k - 1])} ({options.method}, share "
                          f"{alpha:.3f}, {len(windows)} windows of {windows.shape[1]} tokens)")
        naive = average_models(naive, models[name], alpha)
        if options.method == "ties":
            continue
        if options.method == "ot":
            merged, report = ot_merge(merged, models[name], windows, alpha=alpha, match_heads=options.match_heads,
                                      autocast=options.autocast)
            layers = report["layers"]
            moved = sum(e.get("neurons_moved", 0) for e in layers)
            total = sum(e.get("neurons", 0) for e in layers)
            corr = [e["neuron_corr_matched"] for e in layers if "neuron_corr_matched" in e]
            ident = [e["neuron_corr_identity"] for e in layers if "neuron_corr_identity" in e]
            steps.append({"member": name, "alpha": alpha, "neurons_moved": moved, "neurons": total,
                          "heads_moved": sum(e.get("heads_moved", 0) for e in layers),
                          "neuron_corr_matched": sum(corr) / len(corr) if corr else None,
                          "neuron_corr_identity": sum(ident) / len(ident) if ident else None})
        else:
            merged = naive
            steps.append({"member": name, "alpha": alpha})
    loss = {}
    for cap, (owner, h) in heldout.items():
        loss[cap] = {"teacher": owner, "own_teacher": next_token_loss(models[owner], h),
                     "merged": next_token_loss(merged, h), "plain_average": next_token_loss(naive, h),
                     "tokens": int(h[:, 1:].numel())}
    for name in names:
        if models[name] is not merged:
            del models[name]
    del naive
    gc.collect()
    return merged, tokenizer, {"members": names, "method": options.method, "steps": steps, "heldout_loss": loss,
                               "calibration_windows": int(len(windows))}


def loss_increase(heldout_loss: dict) -> float | None:
    """The largest relative rise of a capability's held-out loss, merged over its own teacher (None: none measured)."""
    rises = [(lo["merged"] - lo["own_teacher"]) / max(lo["own_teacher"], 1e-12) for lo in heldout_loss.values()]
    return max(rises) if rises else None


# ------------------------------------------------------------------------------------------------------ the stage


def _digest(recipe, profile, options, groups, signatures, texts):
    from .profile import profile_inputs
    from .training_text import training_texts_digest

    blob = json.dumps({"schema": SCHEMA, "options": options.model_dump(mode="json"), "groups": groups,
                       "signatures": signatures, "best": profile.get("best"), "profile_inputs": profile_inputs(recipe),
                       "training_text": training_texts_digest(texts)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_align(recipe: Recipe, profile: dict, out=None, console=None, force=False) -> dict:
    """The align stage: merge every group of same-architecture, same-tokenizer tower teachers into ``out`` (default
    ``runs/<name>/align``); returns the record (``merged``: [{"name", "members", "folder", ...}], empty when no two
    tower teachers can be merged). Reuses a previous run with the same inputs unless ``force``."""
    from .run_paths import recipe_sources
    from .student_build import student_training_texts, teacher_towers, tower_teachers
    from .teacher_source import resolve_teacher_folder

    start = time.perf_counter()
    options = recipe.stage(STAGE)
    out = recipe.run_path / STAGE if out is None else out
    folders = {t.name: resolve_teacher_folder(t.source, t.allow_pickle, recipe.cache_dir) for t in recipe.teachers}
    groups, signatures = merge_groups(recipe, profile, folders)
    serves = teacher_towers(tower_teachers(recipe, profile))
    texts = student_training_texts(recipe)
    texts = {cap: texts[cap] for caps in serves.values() for cap in caps}
    digest = _digest(recipe, profile, options, groups, signatures, texts)
    record_path = out / "align.json"
    if not force and record_path.is_file():
        try:
            previous = json.loads(record_path.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("inputs_digest") == digest:
            return {**previous, "reused": True}
    if console is not None and not groups:
        console.print("  align: no two tower teachers share an architecture and a tokenizer; nothing to merge "
                      f"(tower teachers: {', '.join(serves)})")
    bases = {}
    if options.method == "ties":
        for i, names in enumerate(groups):
            name = options.base or names[0]
            if name not in folders:
                raise AlignError(f"stages.align.base: unknown teacher {name!r}; teachers: {', '.join(folders)}")
            if name not in names and architecture_signature(folders[name]) != signatures[names[0]]:
                raise AlignError(f"stages.align.base: teacher {name!r} does not share the architecture and tokenizer "
                                 f"of {', '.join(names)}, so it cannot be their TIES base")
            bases[i] = (name, folders[name])
    record = {"schema": SCHEMA, "inputs_digest": digest, "options": options.model_dump(mode="json"),
              "signatures": signatures, "merged": [], "rejected": []}
    sources = {**recipe_sources(recipe), **{f"teacher folder {n}": f for n, f in folders.items()}}
    with atomic_dir(out, overwrite=True, sources=sources) as tmp:
        for i, names in enumerate(groups):
            merged, tokenizer, entry = merge_group({n: folders[n] for n in names}, serves, texts, options, console,
                                                   base=bases.get(i))
            entry.update(name="+".join(names), capabilities=[c for n in names for c in serves[n]])
            if console is not None:
                for cap, lo in entry["heldout_loss"].items():
                    console.print(f"  align: {cap} held-out loss: own teacher {lo['own_teacher']:.4f}, merged "
                                  f"{lo['merged']:.4f}, plain average {lo['plain_average']:.4f}")
            worst = loss_increase(entry["heldout_loss"])
            entry["max_loss_increase"] = worst
            if options.max_loss_increase is not None and worst is not None and worst > options.max_loss_increase:
                record["rejected"].append(entry)
                if console is not None:
                    console.print(f"  align: {entry['name']} NOT merged: the merge raises a served capability's "
                                  f"held-out loss by {worst:.1%} (> max_loss_increase {options.max_loss_increase:.0%}"
                                  "); its members keep their own towers")
                del merged
                gc.collect()
                continue
            folder = tmp / f"merged-{len(record['merged'])}"
            merged.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            del merged
            gc.collect()
            entry["folder"] = str(out / folder.name)
            record["merged"].append(entry)
        record["seconds"] = round(time.perf_counter() - start, 1)
        with atomic_file(tmp / "align.json") as f:
            f.write_text(json.dumps(record, indent=1, default=str))
    return {**record, "reused": False}
