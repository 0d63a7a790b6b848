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

Storage (``store``): ``"factors"`` replaces each projection of a Nexus tower by a `NexusLowRankLinear` holding ``B`` and
``A`` and records the rank in the layer spec's ``ranks`` (``r * (in + out)`` parameters instead of ``in * out``: the
model gets smaller and saves / loads as any Nexus checkpoint); ``"dense"`` writes the rank-r product back as a dense
weight (the same outputs at the dense size: what a quality-only comparison of the two factorisations needs).
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


STORES = ("dense", "factors")


def low_rank_model(model, keep, method, covariances=None, tower=None, modules=ATTENTION + MLP, damping=1e-2,
                   store="dense"):
    """``(copy of model with every projection replaced by its rank-r approximation, report)``.

    ``keep`` sets each matrix's rank so that its factors hold ``keep`` x its parameters (`rank_for`), the same rank
    for both ``method`` values. ``covariances`` (from `input_covariances`) are required for ``"activation"`` and, when
    given, also used to report each method's error on the calibration inputs. ``store``: ``"dense"`` (the rank-r
    product written back, same size) or ``"factors"`` (a Nexus model only: the factors themselves, smaller).
    """
    from nexus.modeling_nexus.low_rank_linear import NexusLowRankLinear

    if method not in METHODS:
        raise ValueError(f"low-rank method must be one of {METHODS}, got {method!r}")
    if store not in STORES:
        raise ValueError(f"low-rank store must be one of {STORES}, got {store!r}")
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1): the factors' share of the dense parameters, got {keep}")
    if method == "activation" and covariances is None:
        raise ValueError("the activation-aware factorisation needs input covariances (input_covariances)")
    result = copy.deepcopy(model)
    units = DecoderUnits(result, tower)
    if store == "factors" and not units.is_nexus:
        raise ValueError("store='factors' needs a Nexus model (its layer specs record the ranks); "
                         f"this is {result.config.model_type!r}")
    dense = factored = 0
    errors = []
    with torch.no_grad():
        for key, linear in _linears(units, modules).items():
            if not isinstance(linear, torch.nn.Linear):
                raise ValueError(f"layer {key[0]} {key[1]} is already factored; factorise a dense tower")
            w = linear.weight
            r = rank_for(tuple(w.shape), keep)
            cov = covariances.get(key) if covariances is not None else None
            b, a = factorise(w, r, cov if method == "activation" else None, damping)
            approx = (b @ a).to(w.dtype)
            if cov is not None:
                errors.append(output_error(w, approx, cov))
            dense += w.numel()
            factored += r * (w.shape[0] + w.shape[1])
            if store == "dense":
                w.copy_(approx)
                continue
            low = NexusLowRankLinear(w.shape[1], w.shape[0], r, bias=linear.bias is not None).to(w.dtype)
            low.factor_a.weight.copy_(a.to(w.dtype))
            low.factor_b.weight.copy_(b.to(w.dtype))
            if linear.bias is not None:
                low.factor_b.bias.copy_(linear.bias)
            info = units.layers[key[0]]
            setattr(info.attn if key[1] in ATTENTION else info.mlp, key[1], low)
            spec = result.config.towers[units.tower_index]["layers"][key[0]]
            spec["ranks"] = {**spec.get("ranks", {}), key[1]: r}
    report = {"method": method, "keep": keep, "dense_params": dense, "factored_params": factored, "store": store}
    if errors:
        report["mean_relative_output_error"] = sum(errors) / len(errors)
    return result, report


def fit_keep(model, target, tower=None, modules=ATTENTION + MLP):
    """The ``keep`` whose factored model holds at most ``target`` parameters (the dense-stored parameters of
    ``model``, minus what factorising every projection at that keep saves); ``None`` when even the dense model fits.
    Raises ``ValueError`` when factorising cannot reach ``target`` (rank 1 everywhere is still too large)."""
    from .structured_prune import parameter_count

    total = parameter_count(model)
    if total <= target:
        return None
    shapes = [tuple(linear.weight.shape) for linear in _linears(DecoderUnits(model, tower), modules).values()]
    dense = sum(o * i for o, i in shapes)

    def size(keep):
        return total - dense + sum(rank_for(s, keep) * (s[0] + s[1]) for s in shapes)

    if size(1e-9) > target:
        raise ValueError(f"factorising every projection at rank 1 still leaves {size(1e-9):,} parameters, over "
                         f"the target of {target:,}")
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(mid) <= target else (lo, mid)
    return lo
