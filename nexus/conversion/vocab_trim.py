"""Vocabulary trimming: keep the tokens a student's capabilities use, and write a working HF tokenizer for them.

For Gemma-3-270M, 168M of its 268M parameters are the 262,144-row embedding; code, English prose and arithmetic use
about 4% of those rows. What is kept (`kept_vocabulary`):

- every token the capability corpora encode to (their *training* text: see `calibration`);
- every special token (BOS/EOS/PAD/UNK/MASK, the tokenizer's extra special tokens, every added token flagged
  special) except reserved placeholders (``drop_special``, default ``<unusedN>``), and every added token the chat
  template names (Gemma's ``<start_of_turn>`` / ``<end_of_turn>``);
- the byte-fallback tokens ``<0x00>``..``<0xFF>`` (byte_fallback BPE) or the 256-symbol alphabet (byte-level BPE), so
  that *any* text still encodes, outside the kept domain in more, shorter pieces;
- for BPE, every token on the merge path of a kept token (`_merge_ancestors`): BPE builds a token from smaller ones,
  so a kept token whose intermediate pieces were dropped could never be produced.

Why the result encodes kept-domain text exactly as the original does: a kept token's derivation inside a text is the
derivation of its string on its own (merges never cross a final token's boundary), so keeping those intermediates
keeps every merge the original applied; merges are dropped only when a part or the result is dropped, and BPE picks
the best-ranked *available* merge, so removing merges it never applied changes nothing. `trim_tokenizer` checks this
on the corpora anyway and refuses to write a tokenizer that disagrees.

New ids follow the old order (kept old ids sorted), so ``kept_ids[new_id] == old_id`` and the embedding rows are
``embedding[kept_ids]`` (`structured_prune.PrunePlan.vocab`). The trimmed tokenizer is written by re-serialising the
original's ``tokenizer.json`` (model vocab and merges, added tokens, post-processor ids) and loading it back through
``AutoTokenizer``, so its class, normaliser, pre-tokeniser, decoder and chat template are the original's.
"""

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BYTE_LEVEL_ALPHABET = 256


class VocabTrimError(ValueError):
    pass


@dataclass
class VocabTrim:
    kept_ids: list  # old ids, in new-id order
    original_size: int
    reasons: dict = field(default_factory=dict)  # why tokens were kept: counts per reason

    @property
    def remap(self):
        return {old: new for new, old in enumerate(self.kept_ids)}

    def summary(self):
        return {"original_size": self.original_size, "kept": len(self.kept_ids), "reasons": dict(self.reasons)}


def _backend_json(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabTrimError(f"vocabulary trimming needs a fast (tokenizers-backed) tokenizer; "
                             f"{type(tokenizer).__name__} is not one")
    return json.loads(backend.to_str())


def _pairs(merges):
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _merge_result(model, a, b):
    prefix = model.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def _merge_ancestors(model, tokens):
    """Every intermediate token BPE builds on the way to each of ``tokens`` (its string encoded on its own)."""
    ranks = {pair: r for r, pair in enumerate(_pairs(model["merges"]))}
    vocab = model["vocab"]
    prefix = model.get("continuing_subword_prefix") or ""
    out = set()
    for token in tokens:
        body = token[len(prefix):] if prefix and token.startswith(prefix) else token
        symbols = [(prefix if prefix and token.startswith(prefix) and i == 0 else "") + c for i, c in enumerate(body)]
        out.update(s for s in symbols if s in vocab)
        while len(symbols) > 1:
            best = None
            for i in range(len(symbols) - 1):
                r = ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [_merge_result(model, symbols[i], symbols[i + 1])]
            out.add(symbols[i])
    return {t for t in out if t in vocab}


def _is_byte_level(data):
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False
    return walk(data.get("pre_tokenizer")) or walk(data.get("decoder"))


def _model_vocab(model):
    """token -> id of the tokenizer model (BPE / WordPiece / WordLevel dict, Unigram list)."""
    if model["type"] == "Unigram":
        return {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
    if model["type"] in ("BPE", "WordPiece", "WordLevel"):
        return model["vocab"]
    raise VocabTrimError(f"vocabulary trimming supports BPE, WordPiece, WordLevel and Unigram tokenizers, "
                         f"not {model['type']!r}")


def kept_vocabulary(tokenizer, texts, drop_special=r"^<unused\d+>$", extra_tokens=()):
    """A `VocabTrim` for ``tokenizer`` keeping what ``texts`` (a list of strings) use; see the module docstring."""
    data = _backend_json(tokenizer)
    model = data["model"]
    vocab = _model_vocab(model)
    size = len(tokenizer)
    id_to_token = {i: t for t, i in vocab.items()}
    for added in data.get("added_tokens", []):
        id_to_token.setdefault(added["id"], added["content"])
    reasons = {}

    def add(ids, why):
        new = set(ids) - kept
        reasons[why] = reasons.get(why, 0) + len(new)
        kept.update(new)

    kept = set()
    used = set()
    for text in texts:
        used.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not used:
        raise VocabTrimError("vocabulary trimming: the corpora encode to no tokens")
    add(used, "corpus")
    pattern = re.compile(drop_special) if drop_special else None
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    specials = set(tokenizer.all_special_ids)
    for added in data.get("added_tokens", []):
        content = added["content"]
        if added.get("special") and not (pattern and pattern.match(content)):
            specials.add(added["id"])
        elif template and content in template:
            specials.add(added["id"])
    if model.get("unk_token") in vocab:
        specials.add(vocab[model["unk_token"]])
    add(specials, "special")
    if model["type"] == "BPE" and model.get("byte_fallback"):
        add([vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab], "byte_fallback")
    if _is_byte_level(data):
        add([i for t, i in vocab.items() if len(t) == 1], "byte_level_alphabet")
    missing = [t for t in extra_tokens if t not in vocab]
    if missing:
        raise VocabTrimError(f"extra tokens not in the vocabulary: {missing[:10]}")
    add([vocab[t] for t in extra_tokens], "extra")
    if model["type"] == "BPE":
        ancestors = _merge_ancestors(model, [id_to_token[i] for i in kept if id_to_token.get(i) in vocab])
        add([vocab[t] for t in ancestors], "merge_path")
    return VocabTrim(sorted(kept), size, reasons)


# ---------------------------------------------------------------------------------------------- writing


def _remap_post_processor(node, remap):
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "TemplateProcessing":
            for name, spec in node.get("special_tokens", {}).items():
                missing = [i for i in spec["ids"] if i not in remap]
                if missing:
                    raise VocabTrimError(f"the post-processor needs token {name!r}, which the trim dropped")
                spec["ids"] = [remap[i] for i in spec["ids"]]
        elif kind in ("RobertaProcessing", "BertProcessing"):
            for key in ("sep", "cls"):
                token, old = node[key]
                if old not in remap:
                    raise VocabTrimError(f"the post-processor needs token {token!r}, which the trim dropped")
                node[key] = [token, remap[old]]
        for value in node.values():
            _remap_post_processor(value, remap)
    elif isinstance(node, list):
        for value in node:
            _remap_post_processor(value, remap)


def trimmed_tokenizer_json(data, kept_ids):
    """A tokenizer.json dict restricted to ``kept_ids`` (old ids, in new order), with merges and ids rebuilt."""
    data = json.loads(json.dumps(data))
    model = data["model"]
    remap = {old: new for new, old in enumerate(kept_ids)}
    vocab = _model_vocab(model)
    id_to_token = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    if model["type"] == "Unigram":
        model["vocab"] = [model["vocab"][old] for old in kept_ids if old in id_to_token]
        if model.get("unk_id") is not None:
            if model["unk_id"] not in remap:
                raise VocabTrimError("the trim dropped the Unigram model's unk token")
            model["unk_id"] = remap[model["unk_id"]]
    else:
        model["vocab"] = {id_to_token[old]: new for new, old in enumerate(kept_ids) if old in id_to_token}
    if model["type"] == "BPE":
        keep = set(model["vocab"])
        merges = []
        for merge, (a, b) in zip(model["merges"], _pairs(model["merges"])):
            if a in keep and b in keep and _merge_result(model, a, b) in keep:
                merges.append(merge)
        model["merges"] = merges
    unk = model.get("unk_token")
    if unk is not None and model["type"] != "Unigram" and unk not in model["vocab"]:
        raise VocabTrimError(f"the trim dropped the unk token {unk!r} the tokenizer model needs")
    data["added_tokens"] = [dict(a, id=remap[i]) for i, a in sorted(added.items()) if i in remap]
    for old in kept_ids:
        if old not in id_to_token and old not in added:
            raise VocabTrimError(f"token id {old} is in neither the model vocabulary nor the added tokens")
    if model["type"] != "Unigram":
        ids = sorted(model["vocab"].values()) + [a["id"] for a in data["added_tokens"]
                                                 if a["content"] not in model["vocab"]]
        if sorted(ids) != list(range(len(kept_ids))):
            raise VocabTrimError("trimmed ids are not contiguous: the vocabulary and the added tokens overlap oddly")
    _remap_post_processor(data.get("post_processor"), remap)
    return data


def trim_tokenizer(tokenizer, trim, out_dir, check_texts=()):
    """Write the trimmed tokenizer into ``out_dir`` and return it loaded back (``AutoTokenizer``).

    Every text in ``check_texts`` must encode to the original's tokens (mapped through the trim) and decode to the
    same string; otherwise a `VocabTrimError` says where, and nothing is written.
    """
    from transformers import AutoTokenizer

    data = trimmed_tokenizer_json(_backend_json(tokenizer), trim.kept_ids)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix=".vocab-trim-", dir=out_dir.parent if out_dir.parent.exists() else None) \
            as tmp:
        tmp = Path(tmp)
        tokenizer.save_pretrained(tmp)
        for name in ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                     "special_tokens_map.json", "added_tokens.json"):
            (tmp / name).unlink(missing_ok=True)
        (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        config_path = tmp / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if "added_tokens_decoder" in config:
                remap = trim.remap
                config["added_tokens_decoder"] = {str(remap[int(k)]): v for k, v in
                                                  config["added_tokens_decoder"].items() if int(k) in remap}
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        trimmed = AutoTokenizer.from_pretrained(tmp)
        check_same_encoding(tokenizer, trimmed, trim, check_texts)
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            shutil.copy2(item, out_dir / item.name)
    return AutoTokenizer.from_pretrained(out_dir)


def check_same_encoding(original, trimmed, trim, texts):
    """Raise unless every text encodes to the same tokens (modulo the id remap) and decodes identically."""
    if len(trimmed) != len(trim.kept_ids):
        raise VocabTrimError(f"the trimmed tokenizer has {len(trimmed)} tokens, expected {len(trim.kept_ids)}")
    remap = trim.remap
    for k, text in enumerate(texts):
        old = original(text, add_special_tokens=False)["input_ids"]
        new = trimmed(text, add_special_tokens=False)["input_ids"]
        mapped = [remap.get(i, -1) for i in old]
        if mapped != new:
            at = next((j for j, (a, b) in enumerate(zip(mapped, new)) if a != b), min(len(mapped), len(new)))
            raise VocabTrimError(f"text {k}: the trimmed tokenizer encodes differently from token {at} on "
                                 f"({original.convert_ids_to_tokens(old[at:at + 3])} vs "
                                 f"{trimmed.convert_ids_to_tokens(new[at:at + 3])})")
        if trimmed.decode(new) != original.decode(old):
            raise VocabTrimError(f"text {k}: the trimmed tokenizer decodes differently from the original")
