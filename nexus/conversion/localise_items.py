"""Capability items as teacher-forced token rows: what every localisation forward pass runs, and how an item is
scored from one.

Localisation ablates hundreds of units and needs a score per item for each ablation, so the score is *continuous and
teacher-forced* (one forward, no decoding): far cheaper than the probes' greedy exact match, and sensitive to small
changes that a 0/1 score would hide. Per probe, an item and its score (``score: loglik``, the default) are:

- ``lm``: the first ``max_item_tokens`` tokens of a held-out chunk (the lm probe's chunks, started from BOS/EOS);
  score = mean log-probability of its last ``lm_scored_tokens`` tokens (the rest is context);
- ``exact_match``: prompt + reference answer; score = mean log-probability of the answer's tokens;
- ``multiple_choice``: prompt + each choice; score = log p(right choice), the log-softmax over the choices' summed
  log-likelihoods.

``score: accuracy`` uses top-1 next-token accuracy on the same tokens instead (multiple choice: argmax = right).

Every item also gets a **chance score** on the same tokens: a unigram model over the capability's target tokens,
fitted in-sample (the best context-free guess, so a model must beat it to "have" the capability); for multiple choice,
log(1 / number of choices). A drop is reported as a fraction of the item set's margin over chance.

Rows are right-padded into micro-batches of at most ``tokens_per_batch`` tokens; under causal attention a pad at the
end cannot change a real position, so no attention mask is needed. The LM head runs only on the span of scored
positions: with a 262k vocabulary (Gemma 3) it costs more than the whole decoder per position. lm-eval tasks are not supported here (lm-eval
owns their tokenisation); localise those capabilities through a JSONL copy of their data.
"""

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .probes import ProbeSettings, probe_class
from .probes.token_scores import FULL_LOGIT_BUDGET, _head_fn

LOCALISABLE_PROBES = ("lm", "exact_match", "multiple_choice")
SCORES = ("loglik", "accuracy")


@dataclass
class Row:
    item: int  # global item index
    ids: list
    first: int  # targets are logp positions first..last-1 (logp[t] scores ids[t + 1])
    last: int
    choice: int = 0


@dataclass
class CapabilityItems:
    """One capability's items inside an `ItemSet` (global item indices) and its per-item chance scores."""

    name: str
    probe: str
    items: np.ndarray  # global item indices
    chance_loglik: np.ndarray  # per item
    chance_accuracy: np.ndarray
    answers: list = field(default_factory=list)  # multiple choice: (right choice, number of choices) per item
    rows: tuple = (0, 0)  # this capability's rows are items.rows[rows[0]:rows[1]]


def _tokens_of(tokenizer, prompt, continuation):
    """(ids, number of continuation tokens): joint tokenisation when it keeps the prompt's tokens as a prefix."""
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + continuation)["input_ids"]
    if whole[:len(context)] == context and len(whole) > len(context):
        return whole, len(whole) - len(context)
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return context + cont, len(cont)


def _unigram_chance(target_lists):
    """Per item (mean log p, accuracy) of a unigram model fitted on all the items' target tokens."""
    flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in target_lists])
    values, counts = np.unique(flat, return_counts=True)
    logp = dict(zip(values.tolist(), np.log(counts / counts.sum()).tolist()))
    top = int(values[np.argmax(counts)])
    ll = np.array([np.mean([logp[t] for t in tl]) for tl in target_lists])
    acc = np.array([np.mean([t == top for t in tl]) for tl in target_lists])
    return ll, acc


class ItemSet:
    """Every capability's items for one teacher/tokenizer, as rows; global item indices run over all capabilities."""

    def __init__(self, tokenizer, tokens_per_batch=1024):
        self.tokenizer = tokenizer
        self.tokens_per_batch = tokens_per_batch
        self.rows: list[Row] = []
        self.capabilities: dict[str, CapabilityItems] = {}
        self.n_items = 0
        pad = tokenizer.pad_token_id
        self.pad = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    # ------------------------------------------------------------------------------------------- building
    def add(self, name, probe_name, data, options=None, max_items=32, max_item_tokens=128, seed=0,
            lm_scored_tokens=None):
        """Add capability ``name`` (``probe_name`` on ``data``) with at most ``max_items`` items."""
        if probe_name not in LOCALISABLE_PROBES:
            raise ValueError(
                f"capability {name!r}: localisation scores items teacher-forced and supports the probes "
                f"{', '.join(LOCALISABLE_PROBES)}, not {probe_name!r} (give it a JSONL copy of the task's data)")
        settings = ProbeSettings(max_items=max_items, seed=seed)
        probe = probe_class(probe_name)(data, options, settings).load()
        tok = self.tokenizer
        base = self.n_items
        rows, targets, answers = [], [], []
        if probe_name == "lm":
            start = probe._start_token(tok)
            if start is None:
                raise ValueError(f"capability {name!r}: the tokenizer has neither BOS nor EOS to start a chunk")
            for i, ids in enumerate(probe._encode(tok)):
                seq = [start] + list(ids)[:max_item_tokens - 1]
                first = max(0, len(seq) - 1 - lm_scored_tokens) if lm_scored_tokens else 0
                rows.append(Row(base + i, seq, first, len(seq) - 1))
                targets.append(seq[first + 1:])
        elif probe_name == "exact_match":
            for i, (prompt, answer) in enumerate(zip(probe.prompts, probe.answers)):
                ids, n = _tokens_of(tok, prompt, answer)
                if n == 0 or len(ids) < 2:
                    raise ValueError(f"capability {name!r}: item {i} ({prompt!r} -> {answer!r}) has no answer "
                                     "token to score")
                rows.append(Row(base + i, ids, len(ids) - 1 - n, len(ids) - 1))
                targets.append(ids[len(ids) - n:])
        else:  # multiple_choice
            for i, (prompt, choices, answer) in enumerate(probe.items):
                for k, choice in enumerate(choices):
                    ids, n = _tokens_of(tok, prompt, choice)
                    rows.append(Row(base + i, ids, len(ids) - 1 - n, len(ids) - 1, k))
                answers.append((answer, len(choices)))
        count = len(probe)
        if probe_name == "multiple_choice":
            chance_ll = np.array([-np.log(k) for _, k in answers])
            chance_acc = np.array([1.0 / k for _, k in answers])
        else:
            chance_ll, chance_acc = _unigram_chance(targets)
        first_row = len(self.rows)
        self.rows += rows
        self.capabilities[name] = CapabilityItems(name, probe_name, np.arange(base, base + count), chance_ll,
                                                  chance_acc, answers, (first_row, len(self.rows)))
        self.n_items += count
        return self.capabilities[name]

    def item_capability(self):
        """(n_items,) array of capability names."""
        out = np.empty(self.n_items, dtype=object)
        for name, cap in self.capabilities.items():
            out[cap.items] = name
        return out

    def chance(self, score="loglik"):
        out = np.zeros(self.n_items)
        for cap in self.capabilities.values():
            out[cap.items] = cap.chance_loglik if score == "loglik" else cap.chance_accuracy
        return out

    def batches(self):
        """Micro-batches: lists of row indices of similar length, at most ``tokens_per_batch`` tokens each."""
        order = sorted(range(len(self.rows)), key=lambda r: len(self.rows[r].ids))
        out, current, width = [], [], 0
        for r in order:
            w = max(width, len(self.rows[r].ids))
            if current and w * (len(current) + 1) > self.tokens_per_batch:
                out.append(current)
                current, w = [], len(self.rows[r].ids)
            current.append(r)
            width = w
        if current:
            out.append(current)
        return out

    def tensors(self, batch):
        """(input_ids, real-token mask) for a micro-batch; right padding."""
        width = max(len(self.rows[r].ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, r in enumerate(batch):
            ids = self.rows[r].ids
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = True
        return input_ids, mask

    # ------------------------------------------------------------------------------------------- scoring
    def item_scores(self, row_sum, row_count, row_correct, score="loglik"):
        """Per-item scores (n_items,) from per-row sums (see the module docstring)."""
        if score not in SCORES:
            raise ValueError(f"score {score!r} is not one of {', '.join(SCORES)}")
        out = np.zeros(self.n_items)
        for cap in self.capabilities.values():
            rows = range(*cap.rows)
            if cap.probe != "multiple_choice":
                for r in rows:
                    num = row_sum[r] if score == "loglik" else row_correct[r]
                    out[self.rows[r].item] = num / row_count[r]
                continue
            for g, rs in self._choice_rows(cap).items():
                answer = cap.answers[g - cap.items[0]][0]
                sums = np.array([row_sum[r] for r in rs])
                if score == "loglik":
                    out[g] = sums[answer] - np.logaddexp.reduce(sums)
                else:
                    out[g] = float(int(np.argmax(sums)) == answer)
        return out

    def _choice_rows(self, cap):
        """Multiple choice: item -> its rows ordered by choice."""
        by_item = {}
        for r in range(*cap.rows):
            by_item.setdefault(self.rows[r].item, []).append(r)
        return {g: sorted(rs, key=lambda r: self.rows[r].choice) for g, rs in by_item.items()}

    def choice_weights(self, row_sum):
        """Per row, its weight in the attribution objective (see `run_rows`): 1 / targets for a single-row item;
        for multiple choice, 1 for the right choice and -q_k for a wrong one, q = softmax of the wrong choices'
        log-likelihoods: the objective is then the right choice's log-odds against the likely wrong ones."""
        weights = np.array([1.0 / max(1, row.last - row.first) for row in self.rows])
        for cap in self.capabilities.values():
            if cap.probe != "multiple_choice":
                continue
            for g, rs in self._choice_rows(cap).items():
                answer = cap.answers[g - cap.items[0]][0]
                wrong = [r for r in rs if self.rows[r].choice != answer]
                sums = np.array([row_sum[r] for r in wrong])
                q = np.exp(sums - np.logaddexp.reduce(sums))
                for r in rs:
                    weights[r] = 1.0 if self.rows[r].choice == answer else 0.0
                for r, qr in zip(wrong, q):
                    weights[r] = -qr
        return weights


def autocast_context(model, enabled):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


def _with_forward_kwargs(model, forward_kwargs):
    """A context that injects ``forward_kwargs`` (e.g. ``tower=`` for Nexus) into the decoder's forward."""
    if not forward_kwargs:
        return contextlib.nullcontext()
    target = getattr(model, "model", model)

    def hook(module, args, kwargs):
        return args, {**kwargs, **forward_kwargs}

    @contextlib.contextmanager
    def ctx():
        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    return ctx()


def _target_scores(model, input_ids, lo, hi, log_odds=False):
    """For logp positions ``lo..hi-1`` (position t scores ``input_ids[:, t + 1]``): log p, top-1 hit and (when asked)
    the log-odds log p - log(1 - p), computed as z_t - logsumexp(z without t) so it stays finite, and its gradient
    alive, when p rounds to 1. Each (B, hi - lo). The head runs on those positions only, in chunks."""
    logits_of, states = _head_fn(model, input_ids, torch.ones_like(input_ids))  # (B, T, H) or full logits
    targets = input_ids[:, lo + 1:hi + 1]
    batch, steps = targets.shape
    vocab = model.config.get_text_config().vocab_size
    span = max(1, FULL_LOGIT_BUDGET // max(1, batch * vocab))
    logp, odds, correct = [], [], []
    for start in range(0, steps, span):
        end = min(start + span, steps)
        logits = logits_of(states[:, lo + start:lo + end]).float()  # (B, span, V)
        target = targets[:, start:end, None]
        picked = logits.gather(-1, target).squeeze(-1)
        logp.append(picked - logits.logsumexp(-1))
        if log_odds:
            odds.append(picked - logits.scatter(-1, target, float("-inf")).logsumexp(-1))
        correct.append(logits.argmax(-1) == target.squeeze(-1))
        del logits
    return torch.cat(logp, 1), torch.cat(correct, 1), (torch.cat(odds, 1) if log_odds else None)


def run_rows(model, items, forward_kwargs=None, autocast=True, before_batch=None, row_weights=None, progress=None):
    """One pass over every row. Returns (row_sum, row_count, row_correct) as float arrays (log-likelihood sums).

    Without ``row_weights`` the pass runs without gradients. With them, each micro-batch backpropagates
    ``sum_r w_r * objective_r`` (``w`` from `ItemSet.choice_weights`), where a row's objective is the sum of its
    targets' log-odds, so hooks that capture activation gradients see d(objective)/d(activation). Unlike log p, whose
    gradient vanishes as p -> 1, the log-odds' does not saturate (the failure mode of attribution patching, Kramar
    et al. 2024), so a unit a confident capability relies on still gets its attribution.
    ``before_batch(batch_rows, mask)`` runs before each forward (recorders use it to know the real tokens).
    """
    n = len(items.rows)
    row_sum, row_count, row_correct = np.zeros(n), np.zeros(n), np.zeros(n)
    grad = row_weights is not None
    with _with_forward_kwargs(model, forward_kwargs), torch.set_grad_enabled(grad):
        for batch in items.batches():
            input_ids, mask = items.tensors(batch)
            if before_batch is not None:
                before_batch(batch, mask)
            lo = min(items.rows[r].first for r in batch)
            hi = max(items.rows[r].last for r in batch)
            with autocast_context(model, autocast):
                logp, correct, log_odds = _target_scores(model, input_ids, lo, hi, log_odds=grad)  # (B, hi - lo)
            objectives = []
            for i, r in enumerate(batch):
                row = items.rows[r]
                a, b = row.first - lo, row.last - lo
                s = logp[i, a:b].sum()
                row_sum[r] = float(s.detach())
                row_count[r] = row.last - row.first
                row_correct[r] = float(correct[i, a:b].float().sum())
                if grad:
                    objectives.append(log_odds[i, a:b].sum())
            if grad:
                w = torch.tensor([row_weights[r] for r in batch], dtype=torch.float32)
                (torch.stack(objectives) * w).sum().backward()
            if progress is not None:
                progress(len(batch))
    return row_sum, row_count, row_correct
