"""Which of the base teacher's tokens a trimmed vocabulary keeps beyond those the training text uses: ranked by the
teacher's own next-token probability mass on that text (``keep_top_tokens`` with ``keep_top_by: teacher_mass``).

    mass = teacher_token_mass(model, tokenizer, texts, positions_per_capability=4096)
    extra = top_tokens_by_mass(tokenizer, mass, 40000)

The mass of token ``t`` is the mean over scored positions of the teacher's softmax probability of ``t``, averaged
over capabilities (each capability weighs the same, whatever its text length). It ranks the tokens the teacher
*expects* to write in the capabilities' domain, including ones the text never happens to use, and ignores the
scripts and languages the capabilities never touch. Ranking by id instead (``keep_top_by: id``, a BPE tokenizer's
earliest merges) spends most of a multilingual vocabulary's slots on other scripts.

Measured on Gemma-3-270M (262,144 tokens) with the size-sweep recipe, keeping 40,000 extra tokens
(`python bench/vocab_split.py --recipe bench/recipes/size_sweep.yaml`, bench/results/vocab_split.json): held-out
tokens per token of the teacher's own tokenizer were, by id, prose 1.0185, code 1.0295, Debian license text 1.0655;
by teacher mass (4,096 positions per capability, 175 s on one thread) 1.0050, 1.0056 and 1.0347. Every extra piece
a word is split into costs the student bits the teacher does not pay: the 0.5 size-sweep student, whose Gemma tower
is whole, went from min retention 0.941 to 0.984 and general text 0.853 to 0.919 with this ranking alone.
"""

import torch


def ordinary_tokens(tokenizer):
    """[(token string, id)] of ``tokenizer``'s ordinary tokens (not special, byte fallback or ``<unused..>``), by id."""
    special = set(tokenizer.all_special_ids)
    out = []
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if i in special or (token.startswith("<0x") and token.endswith(">")) or token.startswith("<unused"):
            continue
        out.append((token, i))
    return out


def _windows(tokenizer, chunks, positions, window):
    """Token windows (each starting at the tokenizer's BOS when it has one) covering up to ``positions`` tokens."""
    start = tokenizer.bos_token_id
    rows, total = [], 0
    for chunk in chunks:
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for begin in range(0, len(ids), window - 1):
            piece = ids[begin:begin + window - 1]
            row = ([start] if start is not None else []) + piece
            if len(row) < 2:
                continue
            rows.append(row[:positions - total] if total + len(row) > positions else row)
            total += len(rows[-1])
            if total >= positions:
                return rows
    return rows


@torch.no_grad()
def teacher_token_mass(model, tokenizer, texts, positions_per_capability=4096, window=128, bf16=True,
                       advance=None):
    """(V,) float64: the mean teacher softmax over positions of each capability's text, averaged over capabilities.

    ``texts`` {capability: TrainingText (``.chunks``)}; ``model`` a causal LM over ``tokenizer``'s ids; windows are
    scored one at a time (a 262k-token vocabulary makes 128 positions of logits 128 MiB in fp32). ``advance(n)``
    is called after each window with the positions it scored; ``bf16``: autocast (2-4x faster on CPU, and
    only the ranking is used)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    total = torch.zeros(vocab, dtype=torch.float64)
    used = 0
    for text in texts.values():
        rows = _windows(tokenizer, text.chunks, positions_per_capability, window)
        if not rows:
            continue
        mass, count = torch.zeros(vocab, dtype=torch.float64), 0
        for row in rows:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(torch.tensor([row])).logits[0]
            mass += torch.softmax(logits.float(), dim=-1).sum(0, dtype=torch.float64)
            count += logits.shape[0]
            del logits
            if advance:
                advance(len(row))
        total += mass / count
        used += 1
    if not used:
        raise ValueError("teacher_token_mass: the capabilities' training text encodes to no tokens")
    return total / used


def top_tokens_by_mass(tokenizer, mass, n):
    """The ``n`` ordinary token strings of ``tokenizer`` with the largest ``mass`` (ties: lower id first)."""
    if n <= 0:
        return []
    tokens = [(token, i) for token, i in ordinary_tokens(tokenizer) if i < mass.shape[0]]
    tokens.sort(key=lambda ti: (-float(mass[ti[1]]), ti[1]))
    return [token for token, _ in tokens[:n]]
