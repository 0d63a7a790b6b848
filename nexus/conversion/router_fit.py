"""Fit the student's router at build time, so routing is right before any distillation.

The pooled-linear router (`NexusPooledRouter`) classifies a prompt by the mean of its shared input embeddings. At
random init it sends whole capabilities to the wrong tower (measured on Gemma-3-270M + two specialists: 5 of 20
code windows went to the arithmetic tower before distillation), and distillation's router loss then spends its
steps undoing that. Here it is fitted once, on the shared embeddings the student already has:

- each served capability's training text is cut into windows of ``window`` student tokens, and prefixes of random
  lengths (prompts are short: an arithmetic probe is a few tokens), pooled like the router pools them;
- a multinomial logistic regression (L-BFGS, L2-regularised) maps pooled vectors to tower indices, on inputs
  standardised per channel, whose scale and shift are then folded into the router's weight and bias;
- a fifth of the windows is held out; the record gives held-out accuracy per capability.
"""

import torch

from .training_text import TrainingText


def _windows(tokenizer, chunks, window, n, generator):
    ids = []
    for chunk in chunks:
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        if len(ids) >= window * n:
            break
    out = []
    for start in range(0, max(1, len(ids) - 1), window):
        piece = ids[start:start + window]
        if not piece:
            break
        length = int(torch.randint(1, len(piece) + 1, (1,), generator=generator)) if len(out) % 2 else len(piece)
        out.append(piece[:length])  # every other window a random-length prefix
        if len(out) >= n:
            break
    return out


@torch.no_grad()
def _pooled(model, windows, bos):
    embed = model.model.embed_tokens
    rows = []
    for w in windows:
        ids = torch.tensor([([bos] if bos is not None else []) + w])
        rows.append(embed(ids).float().mean(1)[0])
    return torch.stack(rows)


def fit_router(model, tokenizer, texts: dict[str, TrainingText], window=128, per_capability=96, seed=0,
               l2=1e-3, iterations=200):
    """Fit ``model.model.router`` (a `NexusPooledRouter`) in place; returns the record (held-out accuracy)."""
    router = model.model.router
    if router is None:
        return {"note": "one tower: no router"}
    mapping = model.config.capability_to_tower
    gen = torch.Generator().manual_seed(seed)
    probe = tokenizer("0", add_special_tokens=True)["input_ids"]  # pooled as at inference: with the BOS it adds
    bos = probe[0] if probe and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id else None
    xs, ys, caps = [], [], []
    for cap, text in texts.items():
        if cap not in mapping:
            continue
        wins = _windows(tokenizer, text.chunks, window, per_capability, gen)
        if not wins:
            continue
        xs.append(_pooled(model, wins, bos))
        ys.extend([mapping[cap]] * len(wins))
        caps.extend([cap] * len(wins))
    x, y = torch.cat(xs), torch.tensor(ys)
    order = torch.randperm(len(y), generator=gen)
    n_held = max(1, len(y) // 5)
    held, train = order[:n_held], order[n_held:]
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    z = (x - mean) / std
    n_classes = router.proj.weight.shape[0]
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z[train] @ w.T + b, y[train]) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        first = float(opt.step(closure).detach())  # L-BFGS returns the loss before its iterations
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(z[train] @ w.T + b, y[train]))
    with torch.no_grad():  # fold the standardisation in: (x - mean) / std @ w.T + b
        weight = w / std
        router.proj.weight.copy_(weight.to(router.proj.weight.dtype))
        router.proj.bias.copy_((b - weight @ mean).to(router.proj.bias.dtype))
        pred = router.proj(x.to(router.proj.weight.dtype)).argmax(-1)
    right = pred[held] == y[held]
    per = {}
    for cap in dict.fromkeys(caps):
        idx = [i for i in held.tolist() if caps[i] == cap]
        if idx:
            per[cap] = round(float((pred[idx] == y[idx]).float().mean()), 4)
    return {"method": "logistic regression on pooled shared embeddings (L-BFGS)", "windows": len(y),
            "held_out": n_held, "held_out_accuracy": round(float(right.float().mean()), 4),
            "per_capability": per, "train_loss_before": round(first, 4),
            "train_loss": round(loss, 4)}
