"""The "manifold-aware" option: low-rank factorisation of linear layers in the subspace of a capability's activations,
compared with plain weight SVD at the same rank.

Plain SVD keeps the directions of largest *weight* energy: ``W ~ U_r S_r V_r^T``, the best rank-r approximation in
Frobenius norm, blind to which inputs the layer actually sees. The activation-aware factorisation (SVD-LLM, Wang et
al. 2024; ASVD, Yuan et al. 2023, is its diagonal cousin) minimises the error on the layer's real inputs instead:
with ``C = X^T X / n`` the input covariance on the capability's calibration tokens (damped: ``C + lambda * mean(diag C)
* I``) and ``C = S S^T`` its Cholesky factor,

    min_{rank(W') <= r} ||(W - W') X^T||_F  =  min ||(W - W') S||_F   ->   W S = U Sigma V^T,
    W' = (U_r Sigma_r) (V_r^T S^{-1})  =:  B A,   B: (out, r), A: (r, in).

Several capabilities give ``C = sum_c w_c C_c / sum_c w_c`` with the recipe's weights, so the factorisation keeps the
subspace the weighted capabilities use.

Storage: `NexusForCausalLM` has no factorised linear yet, so `low_rank_model` writes the rank-r product back as a
dense weight. That measures the *quality* of a rank-r model (what the comparison needs), not its size; the factored
size ``r * (in + out)`` per matrix is reported alongside. Storing the factors needs a modeling change (a per-layer
``ranks`` field and a two-matrix linear), described in the compression report.
"""

import contextlib
import copy

import torch

from .decoder_units import DecoderUnits

METHODS = ("weight", "activation")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # same input as another projection


def _linears(units, modules):
    """``{(layer, name): nn.Linear}`` for the named projections that exist in the stack."""
    out = {}
    for info in units.layers:
        for name in modules:
            parent = info.attn if name in ATTENTION else info.mlp
            if parent is not None:
                out[(info.index, name)] = getattr(parent, name)
    return out


def input_covariances(model, windows, tower=None, modules=ATTENTION + MLP, autocast=True, batch_size=4):
    """``{(layer, name): (in, in) float64 X^T X / n}`` of each projection's input over ``windows`` (rows, T)."""
    units = DecoderUnits(model, tower)
    linears = _linears(units, modules)
    sums, counts, handles = {}, {}, []
    for key, linear in linears.items():
        if key[1] in SHARED_INPUT and (key[0], SHARED_INPUT[key[1]]) in linears:
            continue

        def hook(module, args, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        handles.append(linear.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch_size):
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with ctx:
                    model(windows[start:start + batch_size], use_cache=False, **units.forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    out = {key: sums[key] / counts[key] for key in sums}
    for key in linears:
        if key not in out:
            out[key] = out[(key[0], SHARED_INPUT[key[1]])]
    return out


def weighted_covariances(per_capability, weights):
    """``sum_c w_c C_c / sum_c w_c`` for every projection (the capability-weighted subspace)."""
    total = sum(weights.get(c, 1.0) for c in per_capability)
    keys = next(iter(per_capability.values())).keys()
    return {k: sum(weights.get(c, 1.0) * cov[k] for c, cov in per_capability.items()) / total for k in keys}


def rank_for(shape, keep):
    """The rank whose factors hold ``keep`` x the dense matrix's parameters: ``r (out + in) <= keep * out * in``."""
    out_f, in_f = shape
    return max(1, min(min(out_f, in_f), int(keep * out_f * in_f / (out_f + in_f))))


def factorise(weight, rank, covariance=None, damping=1e-2):
    """``(B, A)`` with ``B @ A`` the rank-``rank`` approximation of ``weight`` (out, in).

    Without ``covariance``: plain truncated SVD. With it: the activation-aware factorisation (module docstring).
    """
    w = weight.detach().double()
    if covariance is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
    c = covariance.double()
    c = c + damping * c.diagonal().mean().clamp(min=1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
    s_chol = torch.linalg.cholesky(c)  # (in, in) lower: C = S S^T
    u, sig, vh = torch.linalg.svd(w @ s_chol, full_matrices=False)
    a = torch.linalg.solve_triangular(s_chol, vh[:rank], upper=False, left=False)  # V_r^T S^{-1}
    return (u[:, :rank] * sig[:rank]).float(), a.float()


def output_error(weight, approx, covariance):
    """Relative error on the layer's inputs: ``||(W - W') S||_F / ||W S||_F`` (= on the calibration activations)."""
    diff = (weight.double() - approx.double())
    c = covariance.double()
    num = torch.einsum("oi,ij,oj->", diff, c, diff)
    den = torch.einsum("oi,ij,oj->", weight.double(), c, weight.double())
    return float((num / den).clamp(min=0).sqrt())


def low_rank_model(model, keep, method, covariances=None, tower=None, modules=ATTENTION + MLP, damping=1e-2):
    """``(copy of model with every projection replaced by its rank-r reconstruction, report)``.

    ``keep`` sets each matrix's rank so that its factors would hold ``keep`` x its parameters (`rank_for`), the same
    rank for both ``method`` values. ``covariances`` (from `input_covariances`) are required for ``"activation"``
    and, when given, also used to report each method's error on the calibration inputs.
    """
    if method not in METHODS:
        raise ValueError(f"low-rank method must be one of {METHODS}, got {method!r}")
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1): the factors' share of the dense parameters, got {keep}")
    if method == "activation" and covariances is None:
        raise ValueError("the activation-aware factorisation needs input covariances (input_covariances)")
    result = copy.deepcopy(model)
    units = DecoderUnits(result, tower)
    dense = factored = 0
    errors = []
    with torch.no_grad():
        for key, linear in _linears(units, modules).items():
            w = linear.weight
            r = rank_for(tuple(w.shape), keep)
            cov = covariances.get(key) if covariances is not None else None
            b, a = factorise(w, r, cov if method == "activation" else None, damping)
            approx = (b @ a).to(w.dtype)
            if cov is not None:
                errors.append(output_error(w, approx, cov))
            w.copy_(approx)
            dense += w.numel()
            factored += r * (w.shape[0] + w.shape[1])
    report = {"method": method, "keep": keep, "dense_params": dense, "factored_params": factored,
              "stored": "dense reconstruction (modeling_nexus has no factorised linear): quality, not size"}
    if errors:
        report["mean_relative_output_error"] = sum(errors) / len(errors)
    return result, report
