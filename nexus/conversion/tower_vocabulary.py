"""A tower's own vocabulary: the embedding, final norm and LM head of a tower whose teacher is not the base teacher.

With ``tokenizer: base`` the student speaks the base teacher's tokenizer, and its shared embedding, final norm and
head are that teacher's, copied exactly. A tower compressed from another teacher (another family, width and
tokenizer) cannot read that embedding or write through that head: its hidden space is its own. So such a tower gets
``vocabulary: own`` (see `NexusConfig`): an embedding, a final norm and an LM head of its own, with rows for the
shared tokens it needs (``vocabulary_ids``), filled from its teacher by token string:

- every shared token whose string is ONE teacher token: the teacher's embedding row and head row, exactly;
- every other shared token the served capabilities' training text uses, if the teacher can encode its string: the
  mean of its pieces' embedding rows, and the head row of the first piece (the logit of a multi-piece token starts
  as the logit of its first piece; distillation refines it);
- special tokens (bos, eos, pad, unk) by role.

Every other shared token reads a zero input row and shares one output logit (the head's last row, starting at 0).
A tower costs rows for what its teacher and its text use, not for the whole shared vocabulary, so the shared
vocabulary can stay wide. A character-level teacher on text the base tokenizer splits into single characters
(digits, operators) is reproduced exactly by its tower before any training (tests/test_tower_vocabulary.py).
"""

from collections import Counter

import torch

SPECIAL_ROLES = ("pad_token", "bos_token", "eos_token", "unk_token")


def teacher_token_index(tokenizer):
    """{surface string: first teacher id with it} over the teacher's non-special tokens."""
    from ..training.token_alignment import token_surface_strings

    index = {}
    for i, s in enumerate(token_surface_strings(tokenizer)):
        if s is not None and s not in index:
            index[s] = i
    return index


def own_vocabulary_plan(student_tok, teacher_tok, texts, n_teacher):
    """{shared id: (how, teacher ids)} for an own-vocabulary tower: ``how`` is "exact", "composed" or "special";
    ``texts``: the served capabilities' training chunks; ``n_teacher``: the teacher's embedding rows."""
    from ..training.token_alignment import token_surface_strings

    strings = token_surface_strings(student_tok)
    index = teacher_token_index(teacher_tok)
    plan = {}
    for sid, s in enumerate(strings):
        tid = index.get(s) if s is not None else None
        if tid is not None and tid < n_teacher:
            plan[sid] = ("exact", [tid])
    used = set()
    for chunk in texts:
        used.update(student_tok(chunk, add_special_tokens=False)["input_ids"])
    unk = getattr(teacher_tok, "unk_token_id", None)
    for sid in sorted(used - set(plan)):
        s = strings[sid] if sid < len(strings) else None
        if s is None:
            continue
        pieces = teacher_tok(s, add_special_tokens=False)["input_ids"]
        if pieces and all(p < n_teacher and p != unk for p in pieces):
            plan[sid] = ("composed", pieces)
    for role in SPECIAL_ROLES:
        sid, tid = getattr(student_tok, f"{role}_id", None), getattr(teacher_tok, f"{role}_id", None)
        if sid is not None and tid is not None and tid < n_teacher and sid < len(student_tok):
            plan[sid] = ("special", [tid])
    return dict(sorted(plan.items()))


@torch.no_grad()
def fill_own_vocabulary(tower, plan, embedding, head, norm_weight):
    """Fill ``tower``'s own ``embed_tokens``, ``lm_head`` and ``norm`` (a `NexusDecoderTower` with ``vocabulary:
    own`` and ``vocabulary_ids == list(plan)``) from its teacher: ``embedding`` (V_t, h) and ``head`` (V_t, h) its
    rows (the same tensor when tied), ``norm_weight`` its final norm's weight as stored. Returns {how: rows}."""
    if list(plan) != list(tower.vocabulary_ids or []):
        raise ValueError(f"tower {tower.name!r}: its vocabulary_ids do not match the plan")
    emb, out = tower.embed_tokens.weight, tower.lm_head.weight
    if emb.shape[1] != embedding.shape[1] or out.shape[1] != head.shape[1]:
        raise ValueError(f"tower {tower.name!r}: width {emb.shape[1]} but its teacher's embedding is "
                         f"{tuple(embedding.shape)} and head {tuple(head.shape)}")
    emb.zero_()
    out.zero_()  # the last row: the logit every shared id without a row of its own shares
    tower.norm.weight.copy_(norm_weight)
    counts = Counter()
    for row, (how, pieces) in enumerate(plan.values()):
        emb[row] = embedding[pieces].mean(0)
        out[row] = head[pieces[0]]
        counts[how] += 1
    return dict(counts)
