"""A short healing run of a pruned candidate, so that `compress.select_allocation` compares candidates after a little
training instead of right after the cut.

Why: a tower pruned to half its layer parameters is broken before distillation (Gemma-3-270M at 0.52 of its layer
parameters: 7-20 nats/token on held-aside training text), and the order of candidates there need not be their order
after training; Minitron (Muralidharan et al. 2024, section 4) ranks pruned candidates after a light retraining for
the same reason. Healing trains the decoder layers only (embedding, final norm and LM head frozen), with next-token
cross-entropy on the capabilities' calibration windows, in place on the candidate (a pruned copy).
"""

import torch
import torch.nn.functional as F


def heal(model, windows: dict, steps: int, lr: float = 1e-4, batch_size: int = 4, autocast: bool = False) -> list:
    """Train ``model``'s decoder layers for ``steps`` steps on ``{capability: (rows, T) token ids}``, capabilities in
    turn (one batch of ``batch_size`` rows each step, cycling through each capability's rows); returns the losses."""
    if steps < 0:
        raise ValueError(f"heal steps must be >= 0, got {steps}")
    if not windows or any(w.ndim != 2 or w.shape[0] == 0 for w in windows.values()):
        raise ValueError("heal needs at least one capability with (rows, T) calibration windows")
    layers = [p for name, p in model.named_parameters() if ".layers." in name]
    if not layers:
        raise ValueError("heal: the model has no decoder layer parameters (names with '.layers.')")
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in layers:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(layers, lr=lr, weight_decay=0.0)
    caps, cursor, losses = list(windows), {c: 0 for c in windows}, []
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            cap = caps[step % len(caps)]
            rows = windows[cap]
            idx = [(cursor[cap] + i) % rows.shape[0] for i in range(min(batch_size, rows.shape[0]))]
            cursor[cap] = (idx[-1] + 1) % rows.shape[0]
            batch = rows[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(batch).logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return losses
