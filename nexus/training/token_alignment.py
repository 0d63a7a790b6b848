"""Cross-tokenizer distillation: turn a teacher's outputs into student training rows when the vocabularies differ.

Three modes (`ALIGNMENT_MODES`):

- ``"identity"`` (alias ``"none"``): the teacher and the student share one vocabulary; the cached top-k is used as
  it is (`identity_rows`). With different vocabularies this mode is refused (`check_alignment_mode`), because it
  would pair unrelated token ids.
- ``"sequence"``: sequence-level KD (Kim & Rush 2016). The teacher's text — its greedy or sampled continuations of
  prompts (`teacher_continuations`), or simply the text it is good at — is re-tokenised by the student and trained
  with cross-entropy (`sequence_kd_rows`). No logits cross the tokenizer boundary.
- ``"token_aligned"``: token-level logit KD across tokenizers, FuseLLM-style (Wan et al. 2024). Teacher and student
  tokens are aligned by character offsets (`token_char_spans`: offsets from fast tokenizers; without offsets, an
  edit-distance alignment of the decoded token strings to the text). A student position and a teacher position are
  paired when both have read exactly the same text prefix, so both predict what follows the same character.
  The teacher's top-k ids there are mapped into the student vocabulary by their decoded string (`VocabularyMap`):
  an entry whose string is one student token maps to it; any other entry is dropped, the rest is renormalised by the
  loss, and the fraction of teacher probability mass kept is reported (`token_aligned_rows`).

Rows are dicts of per-row tensors of one fixed length; `collate_distill_rows` stacks them into the batch contract of
`nexus.training.distill_losses` (see its module docstring).
"""

import math
from dataclasses import dataclass

import torch
from nexus.training.teacher_cache import prepare_windows

ALIGNMENT_MODES = ("identity", "sequence", "token_aligned")
_MODE_ALIASES = {"none": "identity"}


class VocabularyMismatchError(ValueError):
    """Teacher and student vocabularies differ while the alignment mode assumes they are the same."""


# ------------------------------------------------------------------------------------------------ vocabularies


def normalise_mode(mode):
    m = _MODE_ALIASES.get(mode, mode)
    if m not in ALIGNMENT_MODES:
        raise ValueError(f"alignment mode {mode!r} is unknown; choose one of {list(ALIGNMENT_MODES)} "
                         "('none' is an alias of 'identity')")
    return m


def same_vocabulary(teacher_tokenizer, student_tokenizer):
    """True when both tokenizers map every token string to the same id."""
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def check_alignment_mode(mode, teacher_tokenizer, student_tokenizer, teacher_name="teacher"):
    """Return the normalised mode; refuse ``identity``/``none`` when the vocabularies differ, naming the modes."""
    m = normalise_mode(mode)
    if m == "identity" and not same_vocabulary(teacher_tokenizer, student_tokenizer):
        raise VocabularyMismatchError(
            f"{teacher_name}'s vocabulary ({len(teacher_tokenizer)} tokens) differs from the student's "
            f"({len(student_tokenizer)} tokens), so token alignment mode {mode!r} would pair unrelated token ids. "
            "Set the alignment mode to 'token_aligned' (map the teacher's top-k into the student vocabulary by "
            "character offsets) or 'sequence' (sequence-level KD: train on the teacher's text re-tokenised by "
            "the student)."
        )
    return m


def token_surface_strings(tokenizer):
    """The text each token id stands for, in context (a leading space is kept); None for special tokens.

    Each id is decoded after an anchor token and the anchor's text removed, so decoders that strip a leading
    space at the start of a text (SentencePiece) still report it. A byte-level piece that is not valid UTF-8 on its
    own decodes to U+FFFD and is reported as None.
    """
    special = set(tokenizer.all_special_ids)
    strings = token_surface_strings_for(tokenizer, range(len(tokenizer)))
    return [None if i in special else s for i, s in enumerate(strings)]


def _anchor(tokenizer):
    """A non-special token that decodes to letters/digits (its text, id): decoded before a token to keep its spaces."""
    special = set(tokenizer.all_special_ids)
    for i in range(len(tokenizer)):
        if i not in special:
            text = tokenizer.decode([i], clean_up_tokenization_spaces=False)
            if text.isalnum():
                return text, i
    raise ValueError("tokenizer has no token that decodes to letters or digits: cannot decode tokens in context")


@dataclass
class VocabularyMap:
    """``teacher_to_student[t]`` = the student id whose string equals teacher token t's, or -1."""

    teacher_to_student: torch.Tensor  # (V_t,) long
    n_mapped: int
    n_teacher: int

    @property
    def fraction_mapped(self):
        return self.n_mapped / max(self.n_teacher, 1)


def vocabulary_map(teacher_tokenizer, student_tokenizer):
    """Map every teacher token to the student token with the same surface string; EOS maps to EOS by role.

    Other special tokens (pad, bos, unk, added ones) map to nothing: the teacher predicting them is not text.
    """
    student = {}
    for i, s in enumerate(token_surface_strings(student_tokenizer)):
        if s is not None and s not in student:
            student[s] = i
    teacher = token_surface_strings(teacher_tokenizer)
    table = torch.full((len(teacher),), -1, dtype=torch.long)
    for i, s in enumerate(teacher):
        if s is not None and s in student:
            table[i] = student[s]
    t, s = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id  # end of text: mapped by its role
    if t is not None and s is not None and 0 <= t < len(table):
        table[t] = s
    return VocabularyMap(table, int((table >= 0).sum()), len(table))


# --------------------------------------------------------------------------------------------- character spans


def token_char_spans(tokenizer, ids, text):
    """(n, 2) long tensor: the character span of each token of ``ids`` in ``text``; special tokens get (-1, -1).

    Uses the fast tokenizer's offsets when encoding ``text`` reproduces ``ids`` (``ids`` may be a prefix: a cut
    window). Otherwise each token is decoded to its string and the concatenation is aligned to ``text`` by edit
    distance (`edit_alignment`), so tokenizers without offsets, or with lossy normalisation, still align.
    """
    ids = [int(i) for i in ids]
    special = set(tokenizer.all_special_ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        if enc["input_ids"][:len(ids)] == ids:
            spans = torch.tensor(enc["offset_mapping"][:len(ids)], dtype=torch.long).reshape(-1, 2)
            for j, i in enumerate(ids):
                if i in special or spans[j, 1] <= spans[j, 0]:
                    spans[j] = -1
            return spans
    strings = token_surface_strings_for(tokenizer, ids)
    pieces = ["" if (i in special or s is None) else s for i, s in zip(ids, strings)]
    joined = "".join(pieces)
    to_text = edit_alignment(joined, text)  # boundary j of `joined` -> boundary in `text`
    spans, pos = torch.full((len(ids), 2), -1, dtype=torch.long), 0
    for j, piece in enumerate(pieces):
        if piece:
            a, b = to_text[pos], to_text[pos + len(piece)]
            if b > a:
                spans[j, 0], spans[j, 1] = a, b
        pos += len(piece)
    return spans


def token_surface_strings_for(tokenizer, ids):
    """Surface strings of the given ids (see `token_surface_strings`), decoding only those ids."""
    anchor_text, anchor = _anchor(tokenizer)
    out = []
    for text in tokenizer.batch_decode([[anchor, int(i)] for i in ids], clean_up_tokenization_spaces=False):
        s = text[len(anchor_text):] if text.startswith(anchor_text) else None
        out.append(None if (not s or "\ufffd" in s) else s)
    return out


def edit_alignment(a, b, max_cells=4_000_000):
    """For each boundary 0..len(a) of string ``a``, the matching boundary in ``b``, by minimum edit distance.

    The common prefix and suffix are matched directly; the differing middle is aligned with a Levenshtein table
    (unit costs) and its backtrace. A middle larger than ``max_cells`` falls back to difflib's matching blocks.
    """
    n, m = len(a), len(b)
    p = 0
    while p < min(n, m) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(n, m) - p and a[n - 1 - s] == b[m - 1 - s]:
        s += 1
    mid_a, mid_b = a[p:n - s], b[p:m - s]
    out = list(range(p + 1))  # prefix boundaries 0..p map to themselves
    if (len(mid_a) + 1) * (len(mid_b) + 1) > max_cells:
        mid = _difflib_boundaries(mid_a, mid_b)
    else:
        mid = _levenshtein_boundaries(mid_a, mid_b)
    out.extend(p + x for x in mid[1:])
    out.extend(m - s + t for t in range(1, s + 1))
    assert len(out) == n + 1, "edit alignment lost a boundary"
    return out


def _levenshtein_boundaries(a, b):
    n, m = len(a), len(b)
    if n == 0:
        return [0]
    if m == 0:
        return [0] * (n + 1)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        d[i][0] = i
    for j in range(m + 1):
        d[0][j] = j
    for i in range(1, n + 1):
        row, prev, ai = d[i], d[i - 1], a[i - 1]
        for j in range(1, m + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ai != b[j - 1]))
    out = [0] * (n + 1)
    i, j = n, m
    out[n] = m
    while i > 0:
        if j > 0 and d[i][j] == d[i - 1][j - 1] + (a[i - 1] != b[j - 1]):
            i, j = i - 1, j - 1
        elif d[i][j] == d[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
            continue
        out[i] = j
    return out


def _difflib_boundaries(a, b):
    import difflib

    out = [None] * (len(a) + 1)
    out[0], out[len(a)] = 0, len(b)
    for blk in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        for t in range(blk.size + 1):
            out[blk.a + t] = blk.b + t
    last = 0
    for i, x in enumerate(out):  # unmatched boundaries: carry the last known position forward
        out[i] = last = max(last, x) if x is not None else last
    return out


def context_ends(spans):
    """(n,) long: the character offset up to which position t has read the text, or -1 where it is not defined.

    Defined for real tokens (its span's end), and for special tokens before the first real token (0: a BOS has read
    nothing). When several positions end at the same offset (a character split over byte pieces), only the last
    one has read the whole character and keeps the offset.
    """
    n = spans.shape[0]
    ends = torch.full((n,), -1, dtype=torch.long)
    seen_real = False
    for t in range(n):
        if spans[t, 0] >= 0:
            ends[t] = spans[t, 1]
            seen_real = True
        elif not seen_real:
            ends[t] = 0
    for t in range(n - 1):  # keep the last of equal offsets
        if ends[t] >= 0 and ends[t] == ends[t + 1]:
            ends[t] = -1
    return ends


def align_positions(teacher_spans, student_spans):
    """(n_student,) long: for each student position, the teacher position that has read the same text prefix, or -1."""
    teacher_ends = context_ends(teacher_spans)
    where = {int(e): t for t, e in enumerate(teacher_ends) if e >= 0}
    student_ends = context_ends(student_spans)
    return torch.tensor([where.get(int(e), -1) if e >= 0 else -1 for e in student_ends], dtype=torch.long)


def map_topk_to_student(values, indices, vmap: VocabularyMap):
    """Teacher top-k (T, k) in teacher ids -> (values with -inf on dropped entries, student ids, kept mass (T,)).

    An entry whose teacher token has no single student token (or repeats a student id already taken by a higher
    entry) is dropped: value -inf, index 0. ``kept`` is the fraction of the top-k's probability (softmax of the
    values, temperature 1) that survives; the loss renormalises over what is left.
    """
    values = values.float()
    student = vmap.teacher_to_student[indices.long()]  # (T, k)
    keep = student >= 0
    sorted_ids, order = student.sort(dim=-1, stable=True)  # drop duplicates: keep the first (highest) entry
    dup_sorted = torch.zeros_like(keep)
    dup_sorted[:, 1:] = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
    dup = torch.zeros_like(keep).scatter(-1, order, dup_sorted)
    keep &= ~dup
    probs = torch.softmax(values, dim=-1)
    kept = (probs * keep).sum(-1)
    out_values = torch.where(keep, values, torch.full_like(values, -math.inf))
    out_ids = torch.where(keep, student, torch.zeros_like(student))
    return out_values, out_ids, kept


# ------------------------------------------------------------------------------------------------------- rows


def _padded(ids, seq_len, pad_id):
    n = min(len(ids), seq_len)
    row = torch.full((seq_len,), pad_id, dtype=torch.long)
    row[:n] = torch.as_tensor(ids[:n], dtype=torch.long)
    mask = torch.zeros(seq_len, dtype=torch.long)
    mask[:n] = 1
    return row, mask, n


def _pad_id(tokenizer):
    pad = tokenizer.pad_token_id
    return 0 if pad is None else int(pad)


def identity_rows(cache, seq_len, capability=0, pad_id=0, teacher_tokenizer=None, student_tokenizer=None):
    """Rows from a cache whose teacher shares the student's vocabulary (mode ``identity``).

    When both tokenizers are given, a vocabulary mismatch raises `VocabularyMismatchError` naming the modes to use.
    """
    if teacher_tokenizer is not None and student_tokenizer is not None:
        check_alignment_mode("identity", teacher_tokenizer, student_tokenizer)
    rows = []
    for w in cache:
        row, mask, n = _padded(w["input_ids"].tolist(), seq_len, pad_id)
        k = w["topk_values"].shape[-1]
        values = torch.full((seq_len, k), -math.inf, dtype=w["topk_values"].dtype)
        values[:n] = w["topk_values"][:n]
        indices = torch.zeros((seq_len, k), dtype=torch.int32)
        indices[:n] = w["topk_indices"][:n]
        topk_mask = mask.bool().clone()
        rows.append({"input_ids": row, "attention_mask": mask, "labels": torch.where(mask.bool(), row, -100),
                     "capability": torch.tensor(capability), "teacher_topk_values": values,
                     "teacher_topk_indices": indices, "teacher_topk_mask": topk_mask,
                     "teacher_hidden": {L: _pad_rows(h[:n], seq_len) for L, h in w["hidden"].items()}})
    return rows


def _pad_rows(x, seq_len):
    out = torch.zeros((seq_len,) + tuple(x.shape[1:]), dtype=x.dtype)
    out[:x.shape[0]] = x
    return out


@dataclass
class AlignmentReport:
    """What token-aligned KD kept. Fractions are over student positions that have a next token to predict."""

    n_rows: int
    student_positions: int
    aligned_positions: int  # student positions with a teacher position that read the same prefix
    kd_positions: int  # aligned positions with at least one top-k entry mapped
    mass_kept: float  # mean fraction of the teacher's top-k probability kept after mapping (over aligned positions)
    topk_mass: float  # mean true probability mass of the teacher's top-k (how much the cache itself covers)
    vocab_fraction_mapped: float  # teacher tokens that have a single-token student equivalent

    @property
    def aligned_fraction(self):
        return self.aligned_positions / max(self.student_positions, 1)

    def as_dict(self):
        return {**self.__dict__, "aligned_fraction": self.aligned_fraction}


def token_aligned_rows(texts, cache, teacher_tokenizer, student_tokenizer, seq_len, capability=0, vmap=None):
    """Student rows with the teacher's top-k mapped into the student vocabulary (mode ``token_aligned``).

    ``texts``: the text chunks the ``cache`` was built from (same order; the teacher's tokenization of each must
    reproduce the cached window). Each text is tokenised by the student and cut to ``seq_len``; at every student
    position that read the same prefix as some teacher position, that position's top-k (and cached hidden states)
    are attached. Returns ``(rows, AlignmentReport)``.
    """
    if len(texts) != len(cache):
        raise ValueError(f"texts: {len(texts)} chunks for a cache of {len(cache)} windows; give the same texts "
                         "the cache was built from")
    vmap = vmap or vocabulary_map(teacher_tokenizer, student_tokenizer)
    max_length = cache.manifest["settings"]["max_length"]
    pad_id = _pad_id(student_tokenizer)
    k = cache.k
    rows = []
    n_pos = n_aligned = n_kd = 0
    mass_sum = topk_sum = 0.0
    for i, text in enumerate(texts):
        w = cache[i]
        t_ids = w["input_ids"]
        expect = prepare_windows([text], teacher_tokenizer, max_length)[0]
        if not torch.equal(expect, t_ids):
            raise ValueError(f"texts[{i}] does not tokenise (teacher tokenizer) to cached window {i}: the texts or "
                             "the tokenizer are not the ones the cache was built from")
        s_ids = student_tokenizer(text, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        t_spans = token_char_spans(teacher_tokenizer, t_ids.tolist(), text)
        s_spans = token_char_spans(student_tokenizer, s_ids, text)
        pos = align_positions(t_spans, s_spans)  # (n_s,)
        row, mask, n = _padded(s_ids, seq_len, pad_id)
        values = torch.full((seq_len, k), -math.inf, dtype=w["topk_values"].dtype)  # rows keep the cache's dtypes
        indices = torch.zeros((seq_len, k), dtype=torch.int32)
        topk_mask = torch.zeros(seq_len, dtype=torch.bool)
        hidden = {L: torch.zeros((seq_len, h.shape[-1]), dtype=h.dtype) for L, h in w["hidden"].items()}
        hit = (pos[:n] >= 0).nonzero().flatten()
        if hit.numel():
            tpos = pos[hit]
            v, ids, kept = map_topk_to_student(w["topk_values"][tpos], w["topk_indices"][tpos], vmap)
            values[hit], indices[hit] = v.to(values.dtype), ids.to(torch.int32)
            topk_mask[hit] = torch.isfinite(v).any(-1)
            for L, h in w["hidden"].items():
                hidden[L][hit] = h[tpos]
            mass_sum += float(kept.sum())
            full = torch.exp(torch.logsumexp(w["topk_values"][tpos].float(), -1) - w["logsumexp"][tpos])
            topk_sum += float(full.clamp(max=1.0).sum())
        n_pos += n
        n_aligned += int(hit.numel())
        n_kd += int(topk_mask.sum())
        rows.append({"input_ids": row, "attention_mask": mask, "labels": torch.where(mask.bool(), row, -100),
                     "capability": torch.tensor(capability), "teacher_topk_values": values,
                     "teacher_topk_indices": indices, "teacher_topk_mask": topk_mask, "teacher_hidden": hidden})
    report = AlignmentReport(len(rows), n_pos, n_aligned, n_kd, mass_sum / max(n_aligned, 1),
                             topk_sum / max(n_aligned, 1), vmap.fraction_mapped)
    return rows, report


@torch.no_grad()
def teacher_continuations(teacher, tokenizer, prompts, max_new_tokens=64, do_sample=False, temperature=1.0,
                          top_p=1.0, seed=0, batch_size=4):
    """The teacher's text for each prompt: prompt + greedy (or sampled, seeded) continuation, decoded.

    Run with one teacher resident; the strings are what `sequence_kd_rows` re-tokenises for the student.
    """
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        for b in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[b:b + batch_size]), return_tensors="pt", padding=True)
            kw = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad}
            if do_sample:
                kw.update(temperature=temperature, top_p=top_p)
            gen = teacher.generate(**enc, **kw)
            new = gen[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            out.extend(p + t for p, t in zip(prompts[b:b + batch_size], texts))
    finally:
        tokenizer.padding_side = side
    return out


def sequence_kd_rows(texts, student_tokenizer, seq_len, capability=0, prompts=None):
    """Student rows for sequence-level KD: the teacher's texts re-tokenised by the student, for cross-entropy.

    With ``prompts`` (one per text, each a prefix of its text), the prompt's tokens are not trained (labels -100):
    the student learns the teacher's continuation. The rows carry no teacher logits (train with the ce loss).
    """
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(texts)} texts")
    pad_id = _pad_id(student_tokenizer)
    rows = []
    for i, text in enumerate(texts):
        enc = student_tokenizer(text, add_special_tokens=True, truncation=True, max_length=seq_len,
                                return_offsets_mapping=bool(prompts) and student_tokenizer.is_fast)
        row, mask, n = _padded(enc["input_ids"], seq_len, pad_id)
        labels = torch.where(mask.bool(), row, -100)
        if prompts is not None:
            if not text.startswith(prompts[i]):
                raise ValueError(f"prompts[{i}] is not a prefix of texts[{i}]")
            cut = len(prompts[i])
            spans = (token_char_spans(student_tokenizer, enc["input_ids"], text) if "offset_mapping" not in enc
                     else torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2))
            for t in range(n):
                if spans[t, 1] <= cut:  # the token lies inside the prompt (specials: end 0 or -1)
                    labels[t] = -100
        rows.append({"input_ids": row, "attention_mask": mask, "labels": labels,
                     "capability": torch.tensor(capability)})
    return rows


def collate_distill_rows(rows):
    """Stack rows into the `distill_losses` batch contract: float32 teacher values and hidden states, long indices.

    Rows keep the cache's compact dtypes (float16 / bfloat16 values and hidden states, int32 indices) to save memory.
    """
    if not rows:
        raise ValueError("collate_distill_rows: no rows")
    keys = set(rows[0])
    for r in rows:
        if set(r) != keys:
            raise ValueError(f"rows have different keys ({sorted(keys)} vs {sorted(r)}): do not mix sequence-level "
                             "and token-level rows in one batch")
    batch = {}
    for key in keys:
        if key == "teacher_hidden":
            layers = rows[0][key].keys()
            batch[key] = {L: torch.stack([r[key][L] for r in rows]).float() for L in layers}
        else:
            batch[key] = torch.stack([r[key] for r in rows])
    if "teacher_topk_values" in batch:  # rows keep the cache's compact dtypes; the batch contract's are these
        batch["teacher_topk_values"] = batch["teacher_topk_values"].float()
        batch["teacher_topk_indices"] = batch["teacher_topk_indices"].long()
    return batch
