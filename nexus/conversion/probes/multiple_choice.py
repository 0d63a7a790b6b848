"""`multiple_choice` probe: JSONL ``{"prompt": ..., "choices": [...], "answer": index}`` -> log-likelihood.

Each choice is scored by the summed log-probability of its tokens after the prompt; the prediction is the choice with
the highest sum. ``accuracy_norm`` (reported beside) divides each sum by the choice's UTF-8 bytes, which removes the
bias towards short choices. The continuation's tokens are those of ``prompt + choice`` after the prompt's own tokens
when the tokenizer keeps that boundary, else the choice is tokenised alone and appended (as lm-eval does).
The baseline is chance: the mean of 1 / number of choices.
"""

import numpy as np
import torch

from .base import Probe, ProbeResult, inference_context, mean_summary, model_max_positions, select_items, summary
from .data_source import ProbeDataError, read_jsonl, require_string
from .registry import register_probe
from .token_scores import next_token_scores


def _choices(record, label, number):
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ProbeDataError(f"{label} line {number}: 'choices' must be a list of at least two strings")
    for k, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise ProbeDataError(f"{label} line {number}: choice {k} must be a non-empty string, got {choice!r}")
    if "answer" not in record:
        raise ProbeDataError(f"{label} line {number}: missing 'answer' (the index of the right choice)")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ProbeDataError(
            f"{label} line {number}: 'answer' must be a choice index in 0..{len(choices) - 1}, got {answer!r}")
    return choices, answer


class MultipleChoiceProbe(Probe):
    data_kind = "jsonl"
    metric = "accuracy"

    def _load(self):
        records, self.label = read_jsonl(self.data)
        items = [(require_string(r, "prompt", self.label, n), *_choices(r, self.label, n)) for n, r in records]
        keep = select_items(len(items), self.settings.max_items, self.settings.seed)
        self.items = [items[i] for i in keep]

    def __len__(self):
        self._require_loaded()
        return len(self.items)

    def _sequences(self, tokenizer):
        """``(item, choice, token ids, number of continuation tokens)`` for every choice of every item."""
        out = []
        for i, (prompt, choices, _) in enumerate(self.items):
            context = tokenizer(prompt)["input_ids"]
            for k, choice in enumerate(choices):
                whole = tokenizer(prompt + choice)["input_ids"]
                if whole[:len(context)] == context and len(whole) > len(context):
                    ids, n_cont = whole, len(whole) - len(context)
                else:
                    cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
                    ids, n_cont = context + cont, len(cont)
                if n_cont == 0:
                    raise ProbeDataError(f"{self.label}: item {i} choice {k} ({choice!r}) encodes to no tokens")
                if len(ids) < 2:
                    raise ProbeDataError(f"{self.label}: item {i} choice {k} has no prompt token to condition on")
                out.append((i, k, ids, n_cont))
        return out

    def roundtrip_texts(self):
        self._require_loaded()
        return [prompt + choice for prompt, choices, _ in self.items for choice in choices]

    def cannot_score(self, tokenizer, config):
        self._require_loaded()
        limit = model_max_positions(config)
        try:
            sequences = self._sequences(tokenizer)
        except ProbeDataError as exc:
            return f"its tokenizer cannot encode the data: {exc}"
        longest = max(len(s[2]) for s in sequences)
        if limit and longest > limit:
            return f"the longest prompt + choice is {longest} tokens; the model has {limit} positions"
        return None

    def choice_log_likelihoods(self, model, tokenizer, advance=None):
        """Per item, the summed log-likelihood of each choice (a list of arrays)."""
        sequences = self._sequences(tokenizer)
        scores = [np.zeros(len(choices)) for _, choices, _ in self.items]
        remaining = np.bincount([s[0] for s in sequences], minlength=len(self.items))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(sequences)), key=lambda j: len(sequences[j][2]))
        with inference_context(model, self.settings):
            for b in range(0, len(order), self.settings.batch_size):
                batch = [sequences[j] for j in order[b:b + self.settings.batch_size]]
                width = max(len(s[2]) for s in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (_, _, ids, _) in enumerate(batch):  # right padding
                    input_ids[r, :len(ids)] = torch.tensor(ids)
                    mask[r, :len(ids)] = 1
                logp, _ = next_token_scores(model, input_ids, mask)  # (B, width-1)
                finished = 0
                for r, (i, k, ids, n_cont) in enumerate(batch):
                    scores[i][k] = float(logp[r, len(ids) - 1 - n_cont:len(ids) - 1].sum())
                    remaining[i] -= 1
                    finished += int(remaining[i] == 0)
                if advance and finished:
                    advance(finished)
        return scores

    def score(self, model, tokenizer, advance=None):
        self._require_loaded()
        scores = self.choice_log_likelihoods(model, tokenizer, advance)
        hits, hits_norm = [], []
        for (_, choices, answer), ll in zip(self.items, scores):
            size = np.array([len(c.encode("utf-8")) for c in choices], dtype=np.float64)
            hits.append(float(int(np.argmax(ll)) == answer))
            hits_norm.append(float(int(np.argmax(ll / size)) == answer))
        norm = mean_summary("accuracy_norm", hits_norm, self.settings)
        items = [{"correct": h, "correct_norm": hn, "log_likelihoods": ll.tolist()}
                 for h, hn, ll in zip(hits, hits_norm, scores)]
        return ProbeResult(items, mean_summary(self.metric, hits, self.settings,
                                               accuracy_norm=norm["score"], accuracy_norm_ci=norm["ci"]))

    def baseline(self):
        self._require_loaded()
        chance = float(np.mean([1.0 / len(choices) for _, choices, _ in self.items]))
        return summary(self.metric, chance, (chance, chance), len(self.items), True, kind="chance")


register_probe("multiple_choice", MultipleChoiceProbe)
