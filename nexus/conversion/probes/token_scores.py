"""Next-token log-probabilities of a causal LM without materialising the full (B, T, vocab) logits.

A 262k-token vocabulary (Gemma 3) makes the fp32 logits of one 8 x 256-token batch 2 GB, four times the whole
270M model in bf16. For the decoder families whose head is exactly "final norm -> lm_head (-> tanh softcap)", the
head runs over slices of the vocabulary with a running log-sum-exp, so at most ``LOGIT_BUDGET`` logits exist at once
and each slice of the (bf16) head weight is cast once per batch. Any other model falls back to its own forward.
"""

import torch

# model_type -> the head is exactly `lm_head(last_hidden_state)`, then tanh softcap when the config sets one
SLICED_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"})
LOGIT_BUDGET = 1024 * 1024  # logits (fp32) alive at once: 4 MB. Measured on Gemma-3-270M (8 x 256 tokens, 1 thread):
# 64 MB slices peaked 146 MiB higher than 4 MB slices and were slower (49 s vs 41 s for 16 chunks)
FULL_LOGIT_BUDGET = 16 * 1024 * 1024  # the fallback (full-vocabulary rows, sliced over positions): 64 MB
MIN_VOCAB_SLICE = 256


def _sliced_head_scores(hidden, head, cap, targets):
    """(logp, correct) of ``targets`` from final hidden states, over slices of the head's rows (its vocabulary)."""
    batch, steps = targets.shape
    h = hidden[:, :steps].reshape(batch * steps, -1)  # (N, H): position t predicts targets[:, t]
    flat = targets.reshape(-1)  # (N,)
    n = flat.shape[0]
    vocab = head.weight.shape[0]
    span = max(MIN_VOCAB_SLICE, LOGIT_BUDGET // max(1, n))
    lse = torch.full((n,), float("-inf"))
    best = torch.full((n,), float("-inf"))
    arg = torch.zeros(n, dtype=torch.long)
    target_logit = torch.zeros(n)
    rows = torch.arange(n)
    for start in range(0, vocab, span):
        end = min(start + span, vocab)
        weight = head.weight[start:end].to(h.dtype)
        logits = (h @ weight.T).float()  # (N, span)
        if head.bias is not None:
            logits += head.bias[start:end].float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        top, idx = logits.max(dim=-1)
        better = top > best
        best = torch.where(better, top, best)
        arg = torch.where(better, idx + start, arg)
        inside = (flat >= start) & (flat < end)
        target_logit[inside] = logits[rows[inside], flat[inside] - start]
        del logits
    logp = (target_logit - lse).reshape(batch, steps)
    return logp, (arg == flat).reshape(batch, steps)


def _sliced_head_layout(model):
    """(decoder, head, softcap) when the model's head is `lm_head(last_hidden_state)` (+ softcap), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "model", None)
    if getattr(decoder, "get_output_embeddings", lambda: None)() is not None:
        return None  # a wrapper whose ``.model`` is itself a model with a head: use its own forward
    if getattr(model.config, "model_type", None) in SLICED_HEAD_TYPES and head is not None and decoder is not None:
        return decoder, head, getattr(model.config, "final_logit_softcapping", None)
    return None


def head_fn(model, input_ids, attention_mask):
    """``(logits_of, states)``: the final hidden states (B, T, H) and a function mapping a slice of them to logits,
    or, for a model whose head is not known, the full logits (B, T, V) and the identity (used by localise)."""
    layout = _sliced_head_layout(model)
    if layout is not None:
        decoder, head, cap = layout
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

        def logits_of(h):
            logits = head(h)
            return torch.tanh(logits / cap) * cap if cap else logits

        return logits_of, hidden
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return (lambda h: h), logits


_head_fn = head_fn  # the name localise_items imports


def next_token_scores(model, input_ids, attention_mask=None):
    """For every position t < T-1: log p(input_ids[:, t+1] | input_ids[:, :t+1]) and whether it was the argmax.

    Returns ``(logp, correct)``, both (B, T-1): float32 and bool. Padded positions hold garbage; mask them yourself.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    targets = input_ids[:, 1:]  # (B, T-1)
    layout = _sliced_head_layout(model)
    if layout is not None:
        decoder, head, cap = layout
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return _sliced_head_scores(hidden, head, cap, targets)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    batch, steps = targets.shape
    logp = torch.empty(batch, steps, dtype=torch.float32)
    correct = torch.empty(batch, steps, dtype=torch.bool)
    span = max(1, FULL_LOGIT_BUDGET // max(1, batch * logits.shape[-1]))
    for start in range(0, steps, span):  # log-softmax in fp32, a few positions at a time
        end = min(start + span, steps)
        chunk = logits[:, start:end].float()
        target = targets[:, start:end]
        logp[:, start:end] = torch.log_softmax(chunk, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        correct[:, start:end] = chunk.argmax(dim=-1) == target
    return logp, correct
