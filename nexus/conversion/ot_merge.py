"""Merge two teachers of the same architecture: match their FFN units and attention heads by optimal transport on
activation correlations, permute one onto the other, then average.

Hidden units of a layer can be permuted without changing the function (gate/up rows and down columns together; a
head's q rows and o columns, with its kv group's k/v rows), so two independently trained networks may compute the same
thing with their units in different orders, and averaging them unit by unit mixes unrelated units. Following
"Model Fusion via Optimal Transport" (Singh & Jaggi 2020) and Git Re-Basin's activation matching (Ainsworth et al.
2023), both models run on the same tokens (both teachers' data), and for every layer:

- FFN units: ``cost[i, j] = 1 - corr(a_i, b_j)`` over tokens, ``plan = ot.emd(uniform, uniform, cost)`` (POT's exact
  network-simplex solver). With equal uniform marginals the optimal plan is a permutation matrix (a vertex of the
  Birkhoff polytope); `match_units` checks that it is one.
- heads, respecting grouped-query attention: within every pair of kv groups the query heads are matched by OT on
  ``1 - mean_d corr(a_{h,d}, b_{h',d})``, then kv groups are matched by OT on the summed costs of those matchings.

Model B is permuted onto A and the two state dicts are averaged with weight ``alpha`` (B's share). The residual stream
is not permuted: the teachers are expected to share it, which is true when they were trained from one initialisation
(the bench's case) and for fine-tunes of one base model. Without that, neuron matching alone cannot align them.
"""

import contextlib
import copy

import numpy as np
import ot
import torch

from .decoder_units import DecoderUnits


class MergeError(ValueError):
    pass


def _check_same_architecture(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        bad = sorted(set(sa) ^ set(sb))[:3] or [k for k in sa if sa[k].shape != sb[k].shape][:3]
        raise MergeError(f"the two models do not share one architecture (first differences: {bad})")


class _CrossMoments:
    """Running sums for correlations between A's and B's units of one kind in one layer."""

    def __init__(self):
        self.n = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = None

    def add(self, a, b, einsum):
        a, b = a.double(), b.double()
        first = self.sa is None
        sums = (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), torch.einsum(einsum, a, b))
        if first:
            self.sa, self.sb, self.saa, self.sbb, self.sab = sums
        else:
            self.sa, self.sb, self.saa, self.sbb, self.sab = (x + y for x, y in zip(
                (self.sa, self.sb, self.saa, self.sbb, self.sab), sums))
        self.n += a.shape[0]

    def correlation(self, einsum_outer):
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        va = (self.saa / n - ma**2).clamp(min=1e-12)
        vb = (self.sbb / n - mb**2).clamp(min=1e-12)
        cov = self.sab / n - torch.einsum(einsum_outer, ma, mb)
        return cov / torch.einsum(einsum_outer, va.sqrt(), vb.sqrt())


def unit_correlations(model_a, model_b, windows, autocast=True, batch_size=4):
    """Per layer: ``{"neurons": (I, I) corr, "heads": (nh, nh) mean-over-dims corr}`` between A's and B's units."""
    _check_same_architecture(model_a, model_b)
    ua, ub = DecoderUnits(model_a), DecoderUnits(model_b)
    captured = {}

    def capture(tag, kind, l):
        def hook(module, args):
            captured[(tag, kind, l)] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    handles = []
    for tag, units in (("a", ua), ("b", ub)):
        for info in units.layers:
            if info.mlp is not None:
                handles.append(info.mlp.down_proj.register_forward_pre_hook(capture(tag, "neurons", info.index)))
            if info.attn is not None:
                handles.append(info.attn.o_proj.register_forward_pre_hook(capture(tag, "heads", info.index)))
    moments = {}
    try:
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start:start + batch_size]
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with ctx:
                    model_a(ids, use_cache=False, **ua.forward_kwargs)
                    model_b(ids, use_cache=False, **ub.forward_kwargs)
                for info in ua.layers:
                    l = info.index
                    if info.mlp is not None:
                        m = moments.setdefault(("neurons", l), _CrossMoments())
                        m.add(captured[("a", "neurons", l)], captured[("b", "neurons", l)], "ti,tj->ij")
                    if info.attn is not None:
                        nh, hd = info.num_heads, info.head_dim
                        a = captured[("a", "heads", l)].reshape(-1, nh, hd)
                        b = captured[("b", "heads", l)].reshape(-1, nh, hd)
                        moments.setdefault(("heads", l), _CrossMoments()).add(a, b, "thd,tgd->hgd")
                captured.clear()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for (kind, l), m in moments.items():
        if kind == "neurons":
            out.setdefault(l, {})["neurons"] = m.correlation("i,j->ij").float()
        else:
            out.setdefault(l, {})["heads"] = m.correlation("hd,gd->hgd").mean(-1).float()
    return out


def match_units(cost):
    """The permutation ``perm`` (B's unit ``perm[i]`` goes to A's slot ``i``) solving OT with uniform marginals."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise MergeError(f"unit matching needs a square cost matrix, got {cost.shape}")
    if n == 1:
        return [0], 0.0
    weights = np.full(n, 1.0 / n)
    plan = ot.emd(weights, weights, cost)
    perm = plan.argmax(1)
    if len(set(perm.tolist())) != n or not np.allclose(plan[np.arange(n), perm], 1.0 / n, atol=1e-9):
        raise MergeError("the optimal transport plan is not a permutation (a degenerate cost matrix)")
    return perm.tolist(), float(cost[np.arange(n), perm].mean())


def head_permutation(corr, num_kv):
    """Head permutation for one layer from the (nh, nh) head correlation, keeping kv groups whole."""
    nh = corr.shape[0]
    group = nh // num_kv
    cost = 1.0 - np.asarray(corr, dtype=np.float64)
    inner, group_cost = {}, np.zeros((num_kv, num_kv))
    for g in range(num_kv):
        for h in range(num_kv):
            block = cost[g * group:(g + 1) * group, h * group:(h + 1) * group]
            perm, mean = match_units(block)
            inner[(g, h)] = perm
            group_cost[g, h] = mean
    groups, _ = match_units(group_cost)
    heads = []
    for g, h in enumerate(groups):
        heads += [h * group + j for j in inner[(g, h)]]
    return heads, groups


def permute_model(model, neuron_perms, head_perms):
    """A copy of ``model`` with layer ``l``'s FFN units / heads reordered: new unit ``i`` = old ``perm[i]``.

    ``head_perms[l]`` is ``(heads, kv_groups)`` from `head_permutation`.
    """
    result = copy.deepcopy(model)
    units = DecoderUnits(result)
    with torch.no_grad():
        for info in units.layers:
            l = info.index
            if l in neuron_perms and info.mlp is not None:
                p = torch.as_tensor(neuron_perms[l])
                for name in ("gate_proj", "up_proj"):
                    lin = getattr(info.mlp, name)
                    lin.weight.copy_(lin.weight[p])
                    if lin.bias is not None:
                        lin.bias.copy_(lin.bias[p])
                info.mlp.down_proj.weight.copy_(info.mlp.down_proj.weight[:, p])
            if l in head_perms and info.attn is not None:
                heads, groups = head_perms[l]
                hd, attn = info.head_dim, info.attn
                rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
                kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
                for lin, idx in ((attn.q_proj, rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
                    lin.weight.copy_(lin.weight[idx])
                    if lin.bias is not None:
                        lin.bias.copy_(lin.bias[idx])
                attn.o_proj.weight.copy_(attn.o_proj.weight[:, rows])
    return result


def average_models(model_a, model_b, alpha=0.5):
    """A copy of A whose every tensor is ``(1 - alpha) * A + alpha * B`` (naive averaging when B is unpermuted)."""
    _check_same_architecture(model_a, model_b)
    merged = copy.deepcopy(model_a)
    sb = model_b.state_dict()
    with torch.no_grad():
        for name, tensor in merged.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_((1 - alpha) * tensor + alpha * sb[name].to(tensor.dtype))
    return merged


def ot_merge(model_a, model_b, windows, alpha=0.5, match_heads=True, autocast=True):
    """``(merged, report)``: B's units matched onto A's by OT on activation correlations over ``windows``, then
    averaged. ``report`` holds, per layer, how many units moved and the mean matched correlation."""
    corr = unit_correlations(model_a, model_b, windows, autocast=autocast)
    units = DecoderUnits(model_a)
    neuron_perms, head_perms, report = {}, {}, {"layers": []}
    for info in units.layers:
        l, entry = info.index, {"layer": info.index}
        if "neurons" in corr.get(l, {}):
            c = corr[l]["neurons"]
            perm, _ = match_units(1.0 - c.numpy())
            neuron_perms[l] = perm
            entry.update(neurons_moved=int(sum(p != i for i, p in enumerate(perm))), neurons=len(perm),
                         neuron_corr_matched=float(c[torch.arange(len(perm)), torch.as_tensor(perm)].mean()),
                         neuron_corr_identity=float(c.diagonal().mean()))
        if match_heads and "heads" in corr.get(l, {}):
            heads, groups = head_permutation(corr[l]["heads"].numpy(), info.num_kv_heads)
            head_perms[l] = (heads, groups)
            entry.update(heads_moved=int(sum(h != i for i, h in enumerate(heads))))
        report["layers"].append(entry)
    aligned = permute_model(model_b, neuron_perms, head_perms)
    report["neuron_permutations"] = neuron_perms
    report["head_permutations"] = {l: v[0] for l, v in head_perms.items()}
    return average_models(model_a, aligned, alpha), report
