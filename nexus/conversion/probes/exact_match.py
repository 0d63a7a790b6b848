"""`exact_match` probe: JSONL ``{"prompt": ..., "answer": ...}`` -> greedy decoding -> exact match.

The prompt is tokenised as the tokenizer does by default (with its BOS when it adds one), the model decodes greedily
(``generate(do_sample=False)``), leading whitespace is dropped, the continuation is cut at the first stop string (a
newline by default), stripped, and compared with the stripped answer. Prompts of equal token length are batched together, so no padding is needed
and batching cannot change a result. The baseline is the majority answer (the most common answer's share of items).
"""

from collections import Counter

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import Probe, ProbeResult, inference_context, mean_summary, model_max_positions, select_items, summary
from .data_source import ProbeDataError, read_jsonl, require_string
from .registry import register_probe


class ExactMatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(
        None, ge=1, description="tokens to generate; default: the longest answer in this tokenizer's tokens + 4")
    stop: list[str] = Field(["\n"], description="the continuation is cut at the first of these strings")
    ignore_case: bool = Field(False, description="compare case-insensitively")


def _answer(record, label, number):
    if "answer" not in record:
        raise ProbeDataError(f"{label} line {number}: missing 'answer' (an exact-match line needs prompt and answer)")
    value = record["answer"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ProbeDataError(f"{label} line {number}: 'answer' must be a non-empty string, got {value!r}")
    return value


class ExactMatchProbe(Probe):
    data_kind = "jsonl"
    metric = "exact_match"
    Options = ExactMatchOptions

    def _load(self):
        records, self.label = read_jsonl(self.data)
        items = [(require_string(r, "prompt", self.label, n), _answer(r, self.label, n)) for n, r in records]
        keep = select_items(len(items), self.settings.max_items, self.settings.seed)
        self.prompts = [items[i][0] for i in keep]
        self.answers = [items[i][1] for i in keep]

    def __len__(self):
        self._require_loaded()
        return len(self.prompts)

    def _max_new_tokens(self, tokenizer):
        if self.options.max_new_tokens:
            return self.options.max_new_tokens
        lengths = [len(x) for x in tokenizer(self.answers, add_special_tokens=False)["input_ids"]]
        return max(lengths) + 4

    def roundtrip_texts(self):
        self._require_loaded()
        return [p + a for p, a in zip(self.prompts, self.answers)]

    def cannot_score(self, tokenizer, config):
        self._require_loaded()
        limit = model_max_positions(config)
        if limit:
            longest = max(len(x) for x in tokenizer(self.prompts)["input_ids"]) + self._max_new_tokens(tokenizer)
            if longest > limit:
                return f"a prompt plus its answer needs {longest} positions; the model has {limit}"
        return None

    def _clean(self, text):
        text = text.lstrip()  # a base model often opens with blank lines ("\n\n1801"): not a stop
        for stop in self.options.stop:
            if stop and stop in text:
                text = text[:text.index(stop)]
        text = text.strip()
        return text.lower() if self.options.ignore_case else text

    def score(self, model, tokenizer, advance=None):
        self._require_loaded()
        encoded = tokenizer(self.prompts)["input_ids"]
        new_tokens = self._max_new_tokens(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        by_length = {}
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        outputs = [""] * len(encoded)
        with inference_context(model, self.settings):
            for length, members in sorted(by_length.items()):
                for b in range(0, len(members), self.settings.batch_size):
                    group = members[b:b + self.settings.batch_size]
                    input_ids = torch.tensor([encoded[i] for i in group])  # (B, length): equal lengths, no padding
                    out = model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                        max_new_tokens=new_tokens, pad_token_id=pad, num_beams=1,
                    )
                    texts = tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
                    for i, text in zip(group, texts):
                        outputs[i] = text
                    if advance:
                        advance(len(group))
        hits = [float(self._clean(o) == self._clean(a)) for o, a in zip(outputs, self.answers)]
        samples = [{"prompt": p, "answer": a, "output": o}
                   for p, a, o in list(zip(self.prompts, self.answers, outputs))[:3]]
        return ProbeResult(hits, mean_summary(self.metric, hits, self.settings, samples=samples,
                                              max_new_tokens=new_tokens))

    def baseline(self):
        self._require_loaded()
        answer, count = Counter(self._clean(a) for a in self.answers).most_common(1)[0]
        if count == 1:  # every answer is different: a constant answer earns nothing (1/n only by in-sample fitting)
            return summary(self.metric, 0.0, (0.0, 0.0), len(self.answers), True, kind="zero (all answers differ)")
        share = count / len(self.answers)
        return summary(self.metric, share, (share, share), len(self.answers), True,
                       kind=f"majority answer ({answer!r} always)")


register_probe("exact_match", ExactMatchProbe)
