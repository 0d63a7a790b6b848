"""Does a teacher's tokenizer give back the text it encodes? One cheap check per teacher and capability.

A tokenizer that silently drops characters (e.g. a character ``tokenizer.json`` rebuilt by a byte-level BPE class,
which loses every space and every unknown character without an ``<unk>``) makes the teacher look competent on text
it never saw. `check_roundtrip` encodes a sample of a capability's text (a few windows of about `WINDOW_CHARS`
characters, `SAMPLE_CHARS` in all, spread over its items), decodes it and compares, and raises
`TokenizerRoundTripError` (a ValueError: the CLI prints one red line and exits 2) naming the teacher, the capability
and the first differing text.

The comparison is ``decode(encode(text, add_special_tokens=False), skip_special_tokens=False,
clean_up_tokenization_spaces=False)`` against the text, up to these harmless normalisations only:

- Unicode NFC or NFKC (a tokenizer's normalizer may compose or fold compatibility characters);
- one leading space added or removed (a SentencePiece prefix space kept, or stripped, by the decoder).

Characters mapped to the unk token are lost: the check fails when more than ``max_unk_fraction`` of the sample's
tokens are unk (default 0; the lm probe's own ``max_unk_fraction`` sets it for its capabilities, so a teacher it
skips or accepts is treated the same here). Every other difference is an error whatever the fraction.
"""

import unicodedata

WINDOW_CHARS = 2000
SAMPLE_CHARS = 8000
CONTEXT_CHARS = 32  # characters shown on each side of the first difference


class TokenizerRoundTripError(ValueError):
    pass


def _windows(text, window_chars):
    """(offset, piece) of ``text`` cut into pieces of at most ``window_chars``, after a newline where one is near."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + window_chars)
        if end < len(text):
            cut = text.rfind("\n", start + window_chars // 2, end)
            end = cut + 1 if cut >= 0 else end
        out.append((start, text[start:end]))
        start = end
    return out


def sample_windows(texts, window_chars=WINDOW_CHARS, max_chars=SAMPLE_CHARS):
    """``[(item, offset, window)]``: windows of ``texts`` (a string or a list of item texts) spread evenly over them,
    the first always included, about ``max_chars`` characters in all."""
    if isinstance(texts, str):
        texts = [texts]
    windows = [(k, off, w) for k, t in enumerate(texts) if t for off, w in _windows(t, window_chars) if w.strip()]
    total = sum(len(w) for _, _, w in windows)
    if total <= max_chars:
        return windows
    mean = total / len(windows)
    n = max(1, min(len(windows), round(max_chars / mean)))
    step = len(windows) / n
    return [windows[int(i * step)] for i in range(n)]


def _forms(text):
    return list(dict.fromkeys([text, unicodedata.normalize("NFC", text), unicodedata.normalize("NFKC", text)]))


def _same(decoded, expected):
    return any(decoded == f or decoded.removeprefix(" ") == f.removeprefix(" ") for f in _forms(expected))


def _first_difference(a, b):
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _excerpts(expected, decoded):
    """(index of the first difference, the expected excerpt, the decoded excerpt), the latter two around it."""
    best = max(_forms(expected), key=lambda f: _first_difference(f, decoded))
    i = _first_difference(best, decoded)
    start = max(0, i - CONTEXT_CHARS)
    dots = "..." if start else ""
    return i, dots + repr(best[start:i + CONTEXT_CHARS]), dots + repr(decoded[start:i + CONTEXT_CHARS])


def _encode(tokenizer, windows):
    try:
        enc = tokenizer(windows, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # a tokenizer without offsets (not a fast one)
        return tokenizer(windows, add_special_tokens=False)["input_ids"], None


def _with_unk_marks(text, ids, offsets, unk_id, unk_token):
    """``text`` with each span the tokenizer mapped to the unk token replaced by that token (None: no offsets)."""
    if offsets is None:
        return None
    spans = [tuple(offsets[k]) for k, t in enumerate(ids) if t == unk_id]
    out, at = [], 0
    for a, b in sorted(spans):
        if a < at or b <= a:
            return None  # overlapping or empty spans: no alignment to trust
        out += [text[at:a], unk_token]
        at = b
    return "".join(out) + text[at:]


def check_roundtrip(tokenizer, texts, teacher_name, capability=None, max_unk_fraction=0.0,
                    window_chars=WINDOW_CHARS, max_chars=SAMPLE_CHARS):
    """Raise `TokenizerRoundTripError` unless ``tokenizer`` decodes a sample of ``texts`` back to it.

    ``texts``: the capability's text (a string) or its items (a list of strings); ``teacher_name`` and
    ``capability`` name them in the message. Returns ``{"windows", "chars", "tokens", "unk_fraction"}``.
    """
    what = f"the capability {capability!r} text" if capability is not None else "the text"
    where = f"teacher {teacher_name!r}: tokenizer does not round-trip {what}"
    windows = sample_windows(texts, window_chars, max_chars)
    if not windows:
        return {"windows": 0, "chars": 0, "tokens": 0, "unk_fraction": 0.0}
    all_ids, all_offsets = _encode(tokenizer, [w for _, _, w in windows])
    unk_id, unk_token = tokenizer.unk_token_id, tokenizer.unk_token
    tokens = unks = 0
    first_unk = None
    for n, ((_, offset, window), ids) in enumerate(zip(windows, all_ids)):
        ids = list(ids)
        decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        k_unk = ids.count(unk_id) if unk_id is not None else 0
        tokens, unks = tokens + len(ids), unks + k_unk
        expected = window
        if k_unk:
            expected = _with_unk_marks(window, ids, all_offsets[n] if all_offsets is not None else None, unk_id,
                                       unk_token)
            if first_unk is None:
                first_unk = (offset, window, decoded)
            if expected is None:
                continue  # no offsets to align the unk tokens with: the unk fraction below still counts them
        if not _same(decoded, expected):
            raise TokenizerRoundTripError(f"{where}: {_describe(offset, expected, decoded)}")
    fraction = unks / tokens if tokens else 0.0
    if first_unk is not None and fraction > max_unk_fraction:
        offset, window, decoded = first_unk
        limit = f"limit {max_unk_fraction:g}" if max_unk_fraction else "none allowed"
        raise TokenizerRoundTripError(f"{where}: {_describe(offset, window, decoded)}; {fraction:.2%} of its "
                                      f"tokens are {unk_token!r} ({limit}): characters outside its vocabulary are "
                                      "lost")
    return {"windows": len(windows), "chars": sum(len(w) for _, _, w in windows), "tokens": tokens,
            "unk_fraction": fraction}


def _describe(offset, expected, decoded):
    i, a, b = _excerpts(expected, decoded)
    return f"{a} decodes to {b} (first difference at character {offset + i})"


def probe_unk_tolerance(capability) -> float:
    """The unk fraction a recipe capability's probe accepts (the lm probe's ``max_unk_fraction``; others: 0)."""
    from .probes import probe_class

    return probe_class(capability.probe)(capability.data, capability.options).unk_tolerance()


def check_training_texts(tokenizer, teacher_name, texts, recipe):
    """`check_roundtrip` of ``tokenizer`` on each ``{capability: TrainingText}`` (its chunks)."""
    for cap, text in texts.items():
        spec = next(c for c in recipe.capabilities if c.name == cap)
        check_roundtrip(tokenizer, text.chunks, teacher_name, cap, probe_unk_tolerance(spec))
