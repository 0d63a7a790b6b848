"""The student speaks its base teacher's tokenizer (``stages.student_build.tokenizer: base``; ``auto``, the default,
picks it when one teacher serves every capability).

    tokenizer, base = base_vocabulary(recipe, profile, texts, folders)

**Which teacher** (`rank_base_teachers`): ``stages.student_build.base_teacher`` when the recipe names one; otherwise
the teacher that is best (the profile's ``best``) on the most capabilities. Ties go to the larger summed weight of
those capabilities, then to the larger teacher (total parameters, from its config: its embedding is usually the most
expensive thing a fresh vocabulary would throw away, and its vocabulary the richest), then to recipe order. A default
candidate whose tokenizer does not round-trip every capability's training text (`tokenizer_roundtrip`, with each
probe's unk tolerance) is passed over for the next one, and the record says why; a named ``base_teacher`` that does
not round-trip is an error.

**Vocabulary** (`vocab_trim`): the base teacher's tokenizer trimmed to the tokens every capability's training text
encodes to, plus its special tokens, its byte-fallback tokens (or byte-level alphabet) and every BPE merge
intermediate, so the capabilities' text encodes to exactly the teacher's tokens (checked on every chunk: nothing is
written otherwise) and any other text still encodes (in more, shorter pieces; a tokenizer with neither byte fallback
nor a byte alphabet maps unknown characters to its unk token, as the teacher does). ``trim_vocabulary: false`` keeps
the whole vocabulary. ``keep_top_tokens: N`` keeps N more ordinary tokens (and their merge paths), so text the
training text never used is split less: by default those the base teacher gives the most next-token probability on
the capabilities' training text (`token_mass`, ``keep_top_by: teacher_mass``), or the first by id (``id``). New ids
follow the teacher's order: ``kept_ids[new_id] == teacher_id``.

**What is copied exactly** (`copy_base_head`, from the teacher's safetensors; nothing else of it is loaded): the
embedding rows ``E[kept_ids]``, the LM head rows ``W[kept_ids]`` (tied to the embedding iff the teacher ties), the
embedding scale (Gemma's ``sqrt(hidden)``), the final norm (type, eps and weights: ``w`` of an RMSNorm, ``w`` of
Gemma's ``(1 + w)`` norm) and the final logit softcap (`head_config`). The shared hidden size is the teacher's. So a
tower made of the base teacher's layers, unpruned, reproduces the teacher's logits on the kept ids (fp32, to float
rounding; ``tests/test_base_vocabulary.py``). Towers of other teachers read the same shared embedding (through edge
projections when their width differs) and are distilled through token alignment (`training.token_alignment`).
``edge_init: fit`` (`fit_edge_projections`, off by default) fits those edge projections by least squares over the
tokens both vocabularies spell the same, so such a tower reads (an estimate of) its own teacher's embedding rows and
writes into the base head; on the full demo it lifted arithmetic retention from 0.0 to 0.415 (a tower of the shared
width has no edge projections to fit).

Nothing here is a new model feature: `NexusConfig` already has embedding_scale, final_norm, final_norm_eps,
final_logit_softcapping and tie_word_embeddings; only the student build now sets them from the base teacher.
The `BaseVocabulary` travels with the student tokenizer (``tokenizer.nexus_base``) from `shared_tokenizer` to
`student_config` and `_init_embedding` in `student_build`.
"""

import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

ATTRIBUTE = "nexus_base"  # the student tokenizer's attribute holding its BaseVocabulary
DEFAULT_HEAD = {"embedding_scale": None, "final_norm": "rms", "final_norm_eps": 1e-6,
                "final_logit_softcapping": None, "tie_word_embeddings": True}


class BaseVocabularyError(ValueError):
    pass


@dataclass
class BaseVocabulary:
    """The base teacher's trimmed vocabulary and the head parts the student copies from it."""

    teacher: str
    folder: str
    kept_ids: list  # teacher ids, in student-id order
    original_size: int
    reasons: dict
    hidden_size: int
    embedding: torch.Tensor  # (V_kept, H) fp32: teacher embedding[kept_ids]
    lm_head: torch.Tensor | None  # (V_kept, H) fp32, None when the teacher ties its head to the embedding
    norm_weight: torch.Tensor  # (H,) fp32, the raw parameter (w, not 1 + w, for gemma_rms)
    head: dict  # NexusConfig kwargs: embedding_scale, final_norm, final_norm_eps, final_logit_softcapping, tie
    choice: dict = field(default_factory=dict)  # how the teacher was chosen (rule, ranking, passed over)
    edge_fit: dict | None = None  # edge_init fit: per tower, shared tokens and fit errors (`fit_edge_projections`)

    @property
    def tied(self):
        return self.lm_head is None

    def record(self):
        return {"base_teacher": self.teacher, "choice": self.choice, "teacher_vocab_size": self.original_size,
                "kept": len(self.kept_ids), "kept_reasons": dict(self.reasons), "hidden_size": self.hidden_size,
                "copied": {"embedding_rows": len(self.kept_ids),
                           "lm_head": "tied to the embedding" if self.tied else "own rows",
                           **{k: v for k, v in self.head.items()}},
                **({"edge_fit": self.edge_fit} if self.edge_fit is not None else {})}


def of(tokenizer):
    """The `BaseVocabulary` a student tokenizer carries, or None (train_bpe / teacher-name tokenizers)."""
    return getattr(tokenizer, ATTRIBUTE, None)


def head_config(tokenizer):
    """NexusConfig kwargs of the student's embedding scale, final norm, logit softcap and tying: the base teacher's,
    or the defaults (tied, unscaled, RMS final norm, no softcap) for any other shared tokenizer."""
    base = of(tokenizer)
    return dict(DEFAULT_HEAD) if base is None else dict(base.head)


def embedding_matrices(tokenizer):
    """How many vocabulary x hidden matrices the student holds: 1 (tied head) or 2 (the base teacher's own head)."""
    base = of(tokenizer)
    return 1 if base is None or base.tied else 2


def shared_hidden_size(tokenizer, requested=None):
    """The base teacher's hidden size (``requested`` must be None or equal to it), or None without a base teacher."""
    base = of(tokenizer)
    if base is None:
        return None
    if requested is not None and requested != base.hidden_size:
        raise BaseVocabularyError(
            f"stages.student_build.hidden_size: {requested} differs from the base teacher {base.teacher!r}'s hidden "
            f"size {base.hidden_size}; with tokenizer: base the shared embedding and head are the teacher's rows, so "
            "leave hidden_size unset (or use tokenizer: train_bpe)")
    return base.hidden_size


# ------------------------------------------------------------------------------------------------ choosing


def _teacher_params(folder):
    from .student_build import teacher_counts

    try:
        return teacher_counts(folder)["total"]
    except (OSError, ValueError):
        return 0


def rank_base_teachers(recipe, profile, folders, params=None, capabilities=None):
    """(teacher names, best candidate first; rows explaining the order). See the module docstring for the rule.
    ``capabilities``: the names that count (default: every recipe capability; the build passes the served ones)."""
    best = (profile or {}).get("best") or {}
    weights = {c.name: c.weight for c in recipe.capabilities if capabilities is None or c.name in capabilities}
    wins, weight = Counter(), defaultdict(float)
    for cap, w in weights.items():
        if cap in best:
            wins[best[cap]] += 1
            weight[best[cap]] += w
    names = [t.name for t in recipe.teachers]
    params = params if params is not None else {n: _teacher_params(folders[n]) for n in names}
    order = sorted(range(len(names)), key=lambda i: (-wins[names[i]], -weight[names[i]], -params.get(names[i], 0), i))
    ranked = [names[i] for i in order]
    rows = [{"teacher": n, "best_on": wins[n], "capability_weight": weight[n], "params": params.get(n, 0)}
            for n in ranked]
    return ranked, rows


def choose_base_teacher(recipe, profile, texts, folders, requested=None, params=None):
    """(teacher, its tokenizer, choice record). ``requested``: the recipe's ``base_teacher`` (must round-trip)."""
    from .teacher_source import load_tokenizer
    from .tokenizer_roundtrip import TokenizerRoundTripError, check_training_texts

    names = [t.name for t in recipe.teachers]
    if requested is not None:
        if requested not in names:
            raise BaseVocabularyError(f"stages.student_build.base_teacher: {requested!r} is not a teacher; teachers: "
                                      f"{', '.join(names)}")
        tokenizer = load_tokenizer(folders[requested])
        check_training_texts(tokenizer, requested, texts, recipe)
        return requested, tokenizer, {"rule": "recipe (stages.student_build.base_teacher)"}
    ranked, rows = rank_base_teachers(recipe, profile, folders, params, capabilities=list(texts))
    passed_over = {}
    for name in ranked:
        tokenizer = load_tokenizer(folders[name])
        try:
            check_training_texts(tokenizer, name, texts, recipe)
        except TokenizerRoundTripError as exc:
            passed_over[name] = str(exc)
            del tokenizer
            continue
        return name, tokenizer, {"rule": "best on the most capabilities (ties: summed capability weight, then "
                                         "teacher parameters, then recipe order); a tokenizer must round-trip every "
                                         "capability's training text", "ranking": rows, "passed_over": passed_over}
    raise BaseVocabularyError(
        "tokenizer: base: no teacher's tokenizer round-trips every capability's training text, so none can be the "
        "student's; " + "; ".join(passed_over.values()) + ". Use stages.student_build.tokenizer: train_bpe")


# ------------------------------------------------------------------------------------------------ teacher head


def _canonical(key):
    """A teacher weight name as `teacher_families.nexus_state_dict` reads it (multimodal Gemma prefixes dropped)."""
    key = key.removeprefix("language_model.")
    if key.startswith("model.language_model."):
        key = "model." + key.removeprefix("model.language_model.")
    return key


HEAD_KEYS = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")


def teacher_head(folder):
    """The base teacher's head as the Nexus import holds it: {"embedding", "lm_head" (None if tied), "norm",
    "head" (config kwargs), "hidden_size"}, fp32. Only those tensors are read from its safetensors (a teacher with
    pickle weights only is loaded whole)."""
    from transformers import AutoConfig

    from .teacher_families import nexus_config_kwargs

    folder = Path(folder)
    kwargs = nexus_config_kwargs(AutoConfig.from_pretrained(folder))
    tensors = {}
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    name = _canonical(key)
                    if name in HEAD_KEYS and name not in tensors:
                        tensors[name] = fh.get_tensor(key).float()
    else:
        from .teacher_import import nexus_from_teacher
        from .teacher_source import load_teacher

        teacher, _ = load_teacher(folder, dtype=torch.float32, allow_pickle=True, with_tokenizer=False)
        nexus = nexus_from_teacher(teacher)
        del teacher
        tensors = {k: v.detach().float().clone() for k, v in nexus.state_dict().items() if k in HEAD_KEYS}
        del nexus
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in tensors]
    tied = kwargs["tie_word_embeddings"]
    if not tied and "lm_head.weight" not in tensors:
        missing.append("lm_head.weight")
    if missing:
        raise BaseVocabularyError(f"base teacher {folder}: no {', '.join(missing)} in its weights")
    head = {k: kwargs[k] for k in DEFAULT_HEAD}
    return {"embedding": tensors["model.embed_tokens.weight"], "lm_head": None if tied else tensors["lm_head.weight"],
            "norm": tensors["model.norm.weight"], "head": head, "hidden_size": kwargs["hidden_size"]}


# ------------------------------------------------------------------------------------------------ the vocabulary


def top_tokens(tokenizer, n, mass=None):
    """``n`` ordinary (non-special, non-byte-fallback) token strings of ``tokenizer``: the first by id, or with
    ``mass`` ((V,) tensor, `token_mass.teacher_token_mass`) those the teacher gives the most next-token mass."""
    from .token_mass import ordinary_tokens, top_tokens_by_mass

    if n <= 0:
        return []
    if mass is not None:
        return top_tokens_by_mass(tokenizer, mass, n)
    return [token for token, _ in ordinary_tokens(tokenizer)[:n]]


def trimmed_base_tokenizer(tokenizer, texts, trim=True, keep_top=0, mass=None):
    """(student tokenizer, `vocab_trim.VocabTrim`): ``tokenizer`` trimmed to what ``texts`` ({cap: TrainingText})
    use (checked to encode every chunk exactly as ``tokenizer`` does) plus ``keep_top`` more tokens (`top_tokens`:
    by id, or by the teacher's next-token ``mass``), or kept whole with ``trim=False``."""
    from .vocab_trim import VocabTrim, kept_vocabulary, trim_tokenizer

    chunks = [c for t in texts.values() for c in t.chunks]
    if not trim:
        return tokenizer, VocabTrim(list(range(len(tokenizer))), len(tokenizer), {"not trimmed": len(tokenizer)})
    plan = kept_vocabulary(tokenizer, chunks, extra_tokens=top_tokens(tokenizer, keep_top, mass))
    with tempfile.TemporaryDirectory(prefix="nexus-base-vocab-") as tmp:
        trimmed = trim_tokenizer(tokenizer, plan, Path(tmp) / "tokenizer", check_texts=chunks)
    return trimmed, plan


def extra_token_mass(folder, tokenizer, texts, positions):
    """(mass, record): the base teacher's next-token mass over ``texts`` (`token_mass`), its model loaded from
    ``folder`` (fp32 weights, bf16 autocast) and freed before returning."""
    import gc
    import time

    from .peak_rss import release_freed_memory
    from .teacher_source import load_teacher
    from .token_mass import teacher_token_mass

    start = time.perf_counter()
    model, _ = load_teacher(folder, dtype=torch.float32, with_tokenizer=False)
    mass = teacher_token_mass(model, tokenizer, texts, positions_per_capability=positions)
    del model
    gc.collect()
    release_freed_memory()  # the teacher and its full-vocabulary logits: later phases must not stack on that heap
    return mass, {"by": "teacher_mass", "positions_per_capability": positions,
                  "seconds": round(time.perf_counter() - start, 1)}


def base_vocabulary(recipe, profile, texts, folders, base_teacher=None, trim=True, params=None, keep_top=0,
                    keep_top_by="teacher_mass", mass_positions=4096):
    """The student tokenizer (carrying its `BaseVocabulary` as ``.nexus_base``) and that `BaseVocabulary`.
    ``keep_top`` more tokens are kept by ``keep_top_by``: ``teacher_mass`` (the base teacher's next-token mass over
    ``mass_positions`` positions of each capability's text, `token_mass`) or ``id``."""
    from .vocab_trim import VocabTrimError

    name, teacher_tok, choice = choose_base_teacher(recipe, profile, texts, folders, base_teacher, params)
    mass = None
    if trim and keep_top > 0:
        if keep_top_by == "teacher_mass":
            mass, choice["extra_tokens"] = extra_token_mass(folders[name], teacher_tok, texts, mass_positions)
        else:
            choice["extra_tokens"] = {"by": "id"}
        choice["extra_tokens"]["requested"] = keep_top
    try:
        tokenizer, plan = trimmed_base_tokenizer(teacher_tok, texts, trim, keep_top, mass)
    except VocabTrimError as exc:
        raise BaseVocabularyError(f"base teacher {name!r}: its vocabulary cannot be trimmed ({exc}); set "
                                  "stages.student_build.trim_vocabulary: false to keep all of it") from None
    del teacher_tok
    head = teacher_head(folders[name])
    rows = head["embedding"].shape[0]
    if max(plan.kept_ids) >= rows:
        raise BaseVocabularyError(f"base teacher {name!r}: its tokenizer has ids up to {max(plan.kept_ids)} but its "
                                  f"embedding only {rows} rows")
    index = torch.tensor(plan.kept_ids, dtype=torch.long)
    base = BaseVocabulary(
        teacher=name, folder=str(folders[name]), kept_ids=list(plan.kept_ids), original_size=plan.original_size,
        reasons=dict(plan.reasons), hidden_size=head["hidden_size"], embedding=head["embedding"][index].clone(),
        lm_head=None if head["lm_head"] is None else head["lm_head"][index].clone(), norm_weight=head["norm"].clone(),
        head=head["head"], choice=choice)
    del head
    setattr(tokenizer, ATTRIBUTE, base)
    return tokenizer, base


# ------------------------------------------------------------------------------------------------ the student


def copy_base_head(student, base: BaseVocabulary, embedding=True):
    """Copy the base teacher's final norm and (``embedding``) embedding / LM-head rows into ``student`` exactly;
    returns {what: rows}. The student's config must come from `head_config` (same tying, norm type, hidden size)."""
    model = student.model
    weight = model.embed_tokens.weight
    if tuple(weight.shape) != tuple(base.embedding.shape):
        raise BaseVocabularyError(f"the student's embedding is {tuple(weight.shape)}, the base teacher "
                                  f"{base.teacher!r}'s kept rows {tuple(base.embedding.shape)}")
    if model.norm.kind != base.head["final_norm"] or bool(student.config.tie_word_embeddings) != base.tied:
        raise BaseVocabularyError("the student's config does not carry the base teacher's head (build it with "
                                  "base_vocabulary.head_config)")
    with torch.no_grad():
        model.norm.weight.copy_(base.norm_weight)
        model.norm.eps = base.head["final_norm_eps"]
        if not embedding:
            return {}
        weight.copy_(base.embedding)
        if not base.tied:
            student.lm_head.weight.copy_(base.lm_head)
    return {f"from base teacher {base.teacher} (exact)": len(base.kept_ids)}


def logit_check(student, teacher, kept_ids, input_ids, tower=0):
    """max |student logits - teacher logits[..., kept_ids]| on ``input_ids`` (teacher ids; mapped to student ids)."""
    remap = {old: new for new, old in enumerate(kept_ids)}
    student_ids = torch.tensor([[remap[int(i)] for i in row] for row in input_ids])
    with torch.no_grad():
        want = teacher(input_ids).logits.float()[..., kept_ids]
        got = student(student_ids, tower=tower).logits.float()
    return (got - want).abs().max().item()



# ------------------------------------------------------------------------------------------------ other towers


def _surface_pairs(student_tok, teacher_tok):
    """(student ids, teacher ids) of the tokens both spell the same (surface string), plus pad/bos/eos/unk by role."""
    from ..training.token_alignment import token_surface_strings

    index = {}
    for i, s in enumerate(token_surface_strings(teacher_tok)):
        if s is not None and s not in index:
            index[s] = i
    pairs = {}
    for sid, s in enumerate(token_surface_strings(student_tok)):
        if s is not None and s in index:
            pairs[sid] = index[s]
    for role in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        a, b = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
        if a is not None and b is not None:
            pairs.setdefault(a, b)
    return list(pairs), list(pairs.values())


def _relative_error(x, w, y):
    return ((x @ w - y).norm() / y.norm().clamp(min=1e-12)).item()


def fit_edge_projections(student, student_tok, base: BaseVocabulary, towers):
    """``edge_init: fit``: for every tower whose teacher is not the base teacher and that has edge projections (its
    width differs from the shared one), fit them by least squares over the tokens both vocabularies spell the same:
    ``in_proj`` maps the base teacher's (scaled) embedding rows onto the tower teacher's own (scaled) rows, and
    ``out_proj`` maps the tower's output so that the base head (final-norm weights folded in) gives, on those tokens,
    the tower teacher's head logits up to the norm's scale. ``towers`` {capability: the build's tower info (its
    ``source`` folder and ``tokenizer``)}; returns {tower name: {matched tokens, relative fit errors}}."""
    config = student.config
    s_b = base.head["embedding_scale"] or 1.0
    g_b = base.norm_weight + 1.0 if base.head["final_norm"] == "gemma_rms" else base.norm_weight
    head_b = base.embedding if base.tied else base.lm_head
    out, done = {}, set()
    for cap, info in towers.items():
        t = config.capability_to_tower[cap]
        tower = student.model.towers[t]
        if t in done or str(info["source"]) == base.folder or tower.in_proj is None:
            continue
        done.add(t)
        teacher = teacher_head(info["source"])
        student_ids, teacher_ids = _surface_pairs(student_tok, info["tokenizer"])
        if not student_ids:
            out[tower.name] = {"matched": 0, "note": "no shared token strings: edge projections left as [I | 0]"}
            continue
        sid, tid = torch.tensor(student_ids), torch.tensor(teacher_ids)
        s_t = teacher["head"]["embedding_scale"] or 1.0
        g_t = teacher["norm"] + 1.0 if teacher["head"]["final_norm"] == "gemma_rms" else teacher["norm"]
        head_t = teacher["embedding"] if teacher["lm_head"] is None else teacher["lm_head"]
        x, y = s_b * base.embedding[sid], s_t * teacher["embedding"][tid]  # (n, H), (n, h)
        w_in = torch.linalg.lstsq(x.double(), y.double(), driver="gelsd").solution.float()  # (H, h)
        a, b = head_b[sid] * g_b, head_t[tid] * g_t  # (n, H), (n, h)
        w_out = torch.linalg.lstsq(a.double(), b.double(), driver="gelsd").solution.float()  # (H, h)
        with torch.no_grad():
            tower.in_proj.weight.copy_(w_in.T)
            tower.out_proj.weight.copy_(w_out)
        out[tower.name] = {"matched": len(student_ids), "in_fit_error": round(_relative_error(x, w_in, y), 4),
                           "out_fit_error": round(_relative_error(a, w_out, b), 4)}
        del teacher
    return out
