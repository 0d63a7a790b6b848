"""Fit ONE new class of the student's router, keeping every old row bit-identical (``add-teacher``'s default).

A refit of the whole router (`router_fit.fit_router`) moves the old classes' rows, so a window that went to old tower
``i`` may go to old tower ``j`` afterwards, and an old capability's score changes although no tower did (measured on
the tiny test student: prose bpb moved outside its paired CI). Here only the new row (weight and bias) is fitted:
a multinomial logistic regression over all classes in which the old rows' logits are fixed, on the same pooled
windows as `router_fit` (old and new capabilities' training text). An item the old router sent to old tower ``i``
still goes to ``i`` unless the new class now beats it; that is the only way routing of old capabilities can change,
and the proof reports how often it does.
"""

import torch

from .router_fit import _pooled, _windows


def fit_new_router_row(model, tokenizer, texts, new_index, window=128, per_capability=96, seed=0, l2=1e-3,
                       iterations=200):
    """Fit row ``new_index`` of ``model.model.router.proj`` in place; returns the record (held-out accuracy)."""
    router = model.model.router
    mapping = model.config.capability_to_tower
    gen = torch.Generator().manual_seed(seed)
    probe = tokenizer("0", add_special_tokens=True)["input_ids"]
    bos = probe[0] if probe and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id else None
    xs, ys = [], []
    for cap, text in texts.items():
        wins = _windows(tokenizer, text.chunks, window, per_capability, gen)
        if cap in mapping and wins:
            xs.append(_pooled(model, wins, bos))
            ys.extend([mapping[cap]] * len(wins))
    x, y = torch.cat(xs), torch.tensor(ys)
    order = torch.randperm(len(y), generator=gen)
    n_held = max(1, len(y) // 5)
    held, train = order[:n_held], order[n_held:]
    weight, bias = router.proj.weight.detach().float(), router.proj.bias.detach().float()
    keep = [i for i in range(weight.shape[0]) if i != new_index]
    fixed = x @ weight[keep].T + bias[keep]  # (N, n_old) the old classes' logits, unchanged
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def logits(rows):
        new = (z[rows] @ w + b)[:, None]
        return torch.cat([fixed[rows, :new_index], new, fixed[rows, new_index:]], dim=1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits(train), y[train]) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        row = w / std
        router.proj.weight[new_index] = row.to(router.proj.weight.dtype)
        router.proj.bias[new_index] = (b - row @ mean).to(router.proj.bias.dtype)[0]
        pred = router.proj(x.to(router.proj.weight.dtype)).argmax(-1)
    return {"method": "new class only: logistic regression with the old rows' logits fixed (L-BFGS)",
            "windows": len(y), "held_out": n_held,
            "held_out_accuracy": round(float((pred[held] == y[held]).float().mean()), 4)}
