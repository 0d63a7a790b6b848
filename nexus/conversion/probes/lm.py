"""`lm` probe: held-out text -> bits per byte, next-token top-1 accuracy and perplexity.

The text is cut at line boundaries into chunks of at most ``chunk_chars`` characters; a chunk is one item, so the
items are the *same text* for every teacher whatever its tokenizer, and a student can later be paired with a teacher
item by item. Each chunk is tokenised on its own and starts from the tokenizer's BOS (or EOS, for tokenizers without
a BOS), so every one of its tokens is predicted. A chunk longer than the model's window is scored with a sliding
window (stride half the window; each token is scored once, with at least half a window of context).

- bits per byte = total NLL (nats) / (ln 2 x UTF-8 bytes of the scored text): comparable across tokenizers, the
  primary score by default;
- accuracy = top-1 next-token accuracy; perplexity = exp(NLL per token): both depend on the tokenizer.

The baseline is a unigram model over *bytes*, fitted on the scored chunks themselves (in-sample, so it is the
empirical byte entropy: the best any context-free byte model can do on this text).
"""

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..bootstrap import bootstrap_ci
from .base import Probe, ProbeResult, inference_context, model_max_positions, select_items, summary
from .data_source import ProbeDataError, read_text
from .registry import register_probe
from .token_scores import next_token_scores

LN2 = math.log(2.0)


class LMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    primary: Literal["bpb", "accuracy", "perplexity"] = Field(
        "bpb", description="which figure is the capability's score; bpb is the only one comparable across tokenizers")
    chunk_chars: int = Field(1000, ge=16, description="an item is a chunk of at most this many characters of text")
    max_unk_fraction: float = Field(
        0.01, ge=0.0, le=1.0,
        description="a teacher whose tokenizer maps more than this fraction of the text to <unk> cannot be scored "
                    "(its bits per byte would be meaningless)")


def split_into_chunks(text, chunk_chars):
    """Consecutive pieces of ``text`` of at most ``chunk_chars`` characters, cut after a newline where possible."""
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:  # a very long line is cut hard
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if len(current) + len(line) > chunk_chars:
            chunks.append(current)
            current = ""
        current += line
    if current:
        chunks.append(current)
    return [c for c in chunks if c.strip()]


def _ratio_stat(scale=1.0):
    return lambda rows: scale * rows[:, 0].sum() / rows[:, 1].sum()


class LMProbe(Probe):
    data_kind = "text"
    metric = "bpb"
    Options = LMOptions

    def _load(self):
        text, self.label = read_text(self.data)
        chunks = split_into_chunks(text, self.options.chunk_chars)
        if not chunks:
            raise ProbeDataError(f"data file {self.label} has no text to score")
        keep = select_items(len(chunks), self.settings.max_items, self.settings.seed)
        self.chunks = [chunks[i] for i in keep]
        self.chunk_bytes = [len(c.encode("utf-8")) for c in self.chunks]

    def __len__(self):
        self._require_loaded()
        return len(self.chunks)

    @staticmethod
    def _start_token(tokenizer):
        for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        return None

    def _encode(self, tokenizer):
        return tokenizer(self.chunks, add_special_tokens=False)["input_ids"]

    def cannot_score(self, tokenizer, config):
        self._require_loaded()
        if self._start_token(tokenizer) is None:
            return "its tokenizer has neither a BOS nor an EOS token to start a chunk with"
        ids = self._encode(tokenizer)
        if any(len(x) == 0 for x in ids):
            return "its tokenizer encodes some non-empty text to no tokens at all"
        unk = tokenizer.unk_token_id
        if unk is not None:
            total = sum(len(x) for x in ids)
            frac = sum(x.count(unk) for x in ids) / total
            if frac > self.options.max_unk_fraction:
                return (f"its tokenizer maps {frac:.1%} of the text's tokens to {tokenizer.unk_token!r} (limit "
                        f"max_unk_fraction={self.options.max_unk_fraction}); it cannot represent this text")
        window = self._window(config)
        if window < 2:
            return f"its context ({window} positions) is too short to predict anything"
        return None

    def roundtrip_texts(self):
        self._require_loaded()
        return list(self.chunks)

    def unk_tolerance(self):
        return self.options.max_unk_fraction

    def _window(self, config):
        limit = model_max_positions(config)
        return min(self.settings.window_tokens, limit) if limit else self.settings.window_tokens

    def _rows(self, start, ids, window):
        """Windows ``(item, token ids, first scored target index within the row)`` covering every item once."""
        stride = max(1, window // 2)
        rows = []
        for item, tokens in enumerate(ids):
            seq = [start] + list(tokens)
            done = 1  # targets seq[1:] are scored; seq[0] is the start token
            while done < len(seq):
                end = min(len(seq), window if done == 1 else done + stride)
                begin = max(0, end - window)
                rows.append((item, seq[begin:end], done - begin - 1))
                done = end
        return rows

    def score(self, model, tokenizer, advance=None):
        self._require_loaded()
        start = self._start_token(tokenizer)
        if start is None:
            raise ValueError(f"lm probe on {self.label}: the tokenizer has neither a BOS nor an EOS token")
        ids = self._encode(tokenizer)
        rows = self._rows(start, ids, self._window(model.config))
        n = len(self.chunks)
        nll, correct, tokens, unk = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
        unk_id = tokenizer.unk_token_id
        remaining = np.bincount([r[0] for r in rows], minlength=n)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))  # similar lengths share a batch
        with inference_context(model, self.settings):
            for b in range(0, len(order), self.settings.batch_size):
                batch = [rows[r] for r in order[b:b + self.settings.batch_size]]
                width = max(len(r[1]) for r in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (_, seq, _) in enumerate(batch):  # right padding: real positions keep their ids
                    input_ids[i, :len(seq)] = torch.tensor(seq)
                    mask[i, :len(seq)] = 1
                logp, hit = next_token_scores(model, input_ids, mask)  # (B, width-1)
                finished = 0
                for i, (item, seq, first) in enumerate(batch):
                    last = len(seq) - 1  # targets seq[1:], i.e. positions 0..len-2 of logp
                    nll[item] -= float(logp[i, first:last].sum())
                    correct[item] += float(hit[i, first:last].sum())
                    tokens[item] += last - first
                    if unk_id is not None:
                        unk[item] += sum(1 for t in seq[first + 1:] if t == unk_id)
                    remaining[item] -= 1
                    finished += int(remaining[item] == 0)
                if advance and finished:
                    advance(finished)
        size = np.asarray(self.chunk_bytes, dtype=np.float64)
        items = [{"nll": float(nll[i]), "bytes": int(size[i]), "tokens": int(tokens[i]),
                  "correct": int(correct[i])} for i in range(n)]
        return ProbeResult(items, self._summarise(nll, size, correct, tokens, unk))

    def _summarise(self, nll, size, correct, tokens, unk):
        s = self.settings
        bpb = float(nll.sum() / (LN2 * size.sum()))
        bpb_ci = bootstrap_ci(np.stack([nll, size], 1), s.n_bootstrap, s.seed, _ratio_stat(1.0 / LN2))
        acc = float(correct.sum() / tokens.sum())
        acc_ci = bootstrap_ci(np.stack([correct, tokens], 1), s.n_bootstrap, s.seed, _ratio_stat())
        ppl = float(math.exp(nll.sum() / tokens.sum()))
        log_ppl_ci = bootstrap_ci(np.stack([nll, tokens], 1), s.n_bootstrap, s.seed, _ratio_stat())
        ppl_ci = [math.exp(log_ppl_ci[0]), math.exp(log_ppl_ci[1])]
        figures = {"bpb": (bpb, bpb_ci, False), "accuracy": (acc, acc_ci, True), "perplexity": (ppl, ppl_ci, False)}
        score, ci, higher = figures[self.options.primary]
        return summary(
            self.options.primary, score, ci, len(nll), higher,
            bpb=bpb, bpb_ci=list(bpb_ci), accuracy=acc, accuracy_ci=list(acc_ci), perplexity=ppl,
            perplexity_ci=list(ppl_ci), tokens=int(tokens.sum()), bytes=int(size.sum()),
            unk_fraction=float(unk.sum() / tokens.sum()),
        )

    def baseline(self):
        """Unigram-over-bytes bits per byte, fitted in-sample on the scored chunks."""
        self._require_loaded()
        encoded = [np.frombuffer(c.encode("utf-8"), dtype=np.uint8) for c in self.chunks]
        counts = np.bincount(np.concatenate(encoded), minlength=256).astype(np.float64)
        bits = -np.log2(np.where(counts > 0, counts / counts.sum(), 1.0))  # (256,)
        per_item = np.array([[bits[e].sum(), len(e)] for e in encoded])
        s = self.settings
        ci = bootstrap_ci(per_item, s.n_bootstrap, s.seed, _ratio_stat())
        score = per_item[:, 0].sum() / per_item[:, 1].sum()
        return summary("bpb", score, ci, len(encoded), False, kind="unigram over bytes, fitted in-sample")


register_probe("lm", LMProbe)
