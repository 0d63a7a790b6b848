"""TIES merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"), as mergekit's
``ties`` method computes it: a baseline for the align stage's OT merge on the same same-family teachers.

For every floating-point tensor, with ``base`` the model the others were fine-tuned from:

1. **Task vectors.** ``tau_i = theta_i - theta_base`` for every other model ``i``.
2. **Trim.** Keep each task vector's ``density`` fraction of largest-magnitude entries (at least one); zero the
   rest.
3. **Elect sign.** ``sign(sum_i w_i * tau_i)`` per entry, plus where the sum is zero (mergekit's ``sum`` consensus).
4. **Disjoint merge.** Per entry, the weighted mean of the trimmed task vectors whose sign agrees with the elected
   one (mergekit's ``normalize: true``), times ``lambda_``; added to the base.

With one fine-tune and its base the result is the base plus the fine-tune's trimmed task vector.
"""

import copy

import torch


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``density`` fraction of largest-magnitude entries set to zero."""
    if density >= 1.0:
        return delta
    if delta.numel() == 0:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.abs().flatten().float()
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold.to(delta.dtype), delta, torch.zeros_like(delta))


def ties_tensor(base: torch.Tensor, others: list, density: float, weights: list, lambda_: float = 1.0):
    """The TIES merge of one tensor: ``base`` plus the sign-elected disjoint mean of ``others``' trimmed deltas."""
    deltas = torch.stack([trim(o.to(torch.float32) - base.to(torch.float32), density) for o in others])
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * base.dim()))
    weighted = deltas * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == elected
    mass = (w * agree).sum(0)
    merged = (weighted * agree).sum(0) / mass.clamp_min(1e-12)
    return (base.to(torch.float32) + lambda_ * merged).to(base.dtype)


@torch.no_grad()
def ties_merge(base_model, models: list, density: float = 0.2, weights: list | None = None, lambda_: float = 1.0):
    """A copy of ``base_model`` whose every floating-point tensor is the TIES merge of ``models`` onto it.

    ``models`` must share ``base_model``'s state-dict keys and shapes (a model that IS the base adds a zero task
    vector and changes nothing)."""
    if not models:
        raise ValueError("ties_merge: no models to merge onto the base")
    weights = list(weights) if weights is not None else [1.0] * len(models)
    if len(weights) != len(models):
        raise ValueError(f"ties_merge: {len(weights)} weights for {len(models)} models")
    base_state = base_model.state_dict()
    states = [m.state_dict() for m in models]
    for i, state in enumerate(states):
        bad = [k for k, t in base_state.items() if k not in state or state[k].shape != t.shape]
        if bad:
            raise ValueError(f"ties_merge: model {i} does not match the base at {bad[:3]}")
    merged = copy.deepcopy(base_model)
    for name, tensor in merged.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(ties_tensor(base_state[name], [s[name] for s in states], density, weights, lambda_))
    return merged
