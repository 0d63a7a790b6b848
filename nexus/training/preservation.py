"""In-process preservation: weights the localiser found critical move slowly while the student is distilled.

Importance is a dict ``{parameter name: tensor}``; each tensor has the parameter's shape or broadcasts to it
(row scores of a ``(out, in)`` matrix as ``(out, 1)``, column scores as ``(1, in)``). Parameters left out are not
protected. Without a feature map, `taylor_importance` builds it from calibration batches: the first-order Taylor
score ``|theta * dL/dtheta|`` averaged over the batches (Molchanov et al. 2019, "Importance Estimation for Neural
Network Pruning"). Scores are normalised to ``[0, 1]`` over all protected elements (``rank``: an element's quantile;
``max``: divided by the largest score), giving ``I``.

Modes (`PreservationOptions.mode`, a recipe switch):

``off``
    Nothing.
``lr_scale``
    Per-element learning rate ``lr * (1 - strength * I)``. Adam is invariant to a constant per-element gradient scale
    (m / sqrt(v) cancels it), so scaling gradients with hooks would change nothing; the optimizer's *update* is scaled
    instead: an optimizer step pre-hook saves the protected tensors, a post-hook rewrites
    ``theta_old + (1 - strength * I) * (theta_new - theta_old)``. That is exactly a per-element learning rate for SGD
    and AdamW (decoupled weight decay included).
``anchor``
    EWC-like penalty ``anchor_lambda * sum_i I_i * (theta_i - theta*_i)^2`` (Kirkpatrick et al. 2017), ``theta*`` the
    weights when training started, ``I`` standing in for the Fisher diagonal. Its gradient
    ``2 * anchor_lambda * I * (theta - theta*)`` is added to ``.grad`` after the backward pass (and so outside DDP's
    gradient hooks, identically on every rank); its value is reported as the loss part ``anchor``.

Lifecycle: ``Preservation(options, importance)`` -> ``attach(model, optimizer)`` -> per step `add_penalty_grad`
(the engine calls it) -> ``detach()``.
"""

import hashlib
import json

import torch

from .distill_options import PreservationOptions

RANK_SAMPLE = 1 << 22  # rank normalisation sorts at most this many sampled scores


def canonical_parameters(model):
    """``{name: parameter}`` without duplicates, plus ``{alias: canonical name}`` for tied parameters."""
    canonical, by_id, alias = {}, {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in by_id:
            alias[name] = by_id[id(p)]
        else:
            by_id[id(p)] = name
            canonical[name] = p
            alias[name] = name
    return canonical, alias


def check_importance(importance, model):
    """Validate ``importance`` against ``model``; returns ``{canonical name: float32 score tensor}``.

    Tied parameters given under both names are merged with an element-wise maximum.
    """
    if not isinstance(importance, dict) or not importance:
        raise ValueError("importance must be a non-empty dict {parameter name: tensor}")
    params, alias = canonical_parameters(model)
    out = {}
    for name, score in importance.items():
        if name not in alias:
            some = ", ".join(list(params)[:4])
            raise ValueError(f"importance[{name!r}]: the model has no such parameter (names look like: {some}, ...)")
        p = params[alias[name]]
        score = torch.as_tensor(score).detach().to(torch.float32).cpu()
        if p.ndim >= 2 and score.ndim == 1:
            raise ValueError(f"importance[{name!r}]: a 1-D score for a {tuple(p.shape)} parameter is ambiguous; "
                             f"give row scores as ({p.shape[0]}, 1) and column scores as (1, {p.shape[-1]})")
        try:
            shape = torch.broadcast_shapes(score.shape, p.shape)
        except RuntimeError:
            shape = None
        if shape != p.shape:
            raise ValueError(f"importance[{name!r}]: shape {tuple(score.shape)} does not broadcast to the "
                             f"parameter's shape {tuple(p.shape)}")
        if not torch.isfinite(score).all() or (score < 0).any():
            raise ValueError(f"importance[{name!r}]: scores must be finite and >= 0")
        key = alias[name]
        if key in out:
            merged = torch.broadcast_shapes(out[key].shape, score.shape)
            score = torch.maximum(out[key].expand(merged), score.expand(merged)).contiguous()
        out[key] = score
    return out


def normalise_importance(scores, how="rank", seed=0):
    """Map checked scores to ``[0, 1]`` jointly over all tensors: 'rank' (quantile) or 'max' (divide by the max)."""
    if how not in ("rank", "max"):
        raise ValueError(f"normalise must be 'rank' or 'max', got {how!r}")
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    if how == "max":
        top = flat.max()
        return {k: (s / top if top > 0 else torch.zeros_like(s)) for k, s in scores.items()}
    if flat.numel() > RANK_SAMPLE:  # quantiles from a seeded sample: exact enough, bounded memory
        gen = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (RANK_SAMPLE,), generator=gen)]
    ordered = flat.sort().values
    below_top = torch.searchsorted(ordered, ordered[-1:], right=False).item()  # how many are < the maximum
    if below_top == 0:  # all scores equal: nothing stands out
        return {k: torch.zeros_like(s) for k, s in scores.items()}
    # I(x) = #(scores < x) / #(scores < max): the least important -> 0, ties share a value, the maximum -> 1
    return {k: (torch.searchsorted(ordered, s.reshape(-1).contiguous(), right=False).float() / below_top)
            .clamp_(0, 1).reshape(s.shape) for k, s in scores.items()}


def taylor_importance(model, batches, loss_module, forward=None):
    """``{name: mean over batches of |theta * dL/dtheta|}`` for every trainable parameter (first-order Taylor).

    ``batches``: an iterable of batch dicts; ``loss_module(outputs, batch) -> (loss, parts)``; ``forward(model,
    batch)`` defaults to the engine's `forward_batch`. ``.grad`` is left untouched.
    """
    from .forward_batch import forward_batch

    forward = forward or forward_batch
    params, _ = canonical_parameters(model)
    params = {k: p for k, p in params.items() if p.requires_grad}
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    n = 0
    for batch in batches:
        loss, _ = loss_module(forward(model, batch), batch)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads):
                if g is not None:
                    sums[k] += (p.detach().float() * g.float()).abs()
        n += 1
    if n == 0:
        raise ValueError("taylor_importance needs at least one calibration batch")
    return {k: s / n for k, s in sums.items()}


class Preservation:
    """Protect important weights while training; see the module docstring for the modes."""

    def __init__(self, options, importance=None):
        self.options = options if isinstance(options, PreservationOptions) else PreservationOptions(**options)
        if self.options.mode != "off" and not importance:
            raise ValueError(f"preservation mode {self.options.mode!r} needs importance scores "
                             "(a dict {parameter name: tensor}, e.g. from taylor_importance)")
        self.importance = importance
        self.level = {}  # canonical name -> normalised importance in [0, 1], broadcastable to the parameter
        self.anchor = {}  # canonical name -> theta* (anchor mode)
        self._params = {}
        self._hooks = []
        self._saved = {}
        self._attached = False

    @property
    def active(self):
        return self.options.mode != "off"

    def fingerprint(self):
        """A hash of the options and the importance scores: a resumed run must use the same protection."""
        h = hashlib.sha256(json.dumps(self.options.model_dump(mode="json"), sort_keys=True).encode())
        for name in sorted(self.importance or {}):
            t = torch.as_tensor(self.importance[name]).detach().to(torch.float32).cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def attach(self, model, optimizer, anchor_state=None):
        """Bind to ``model`` (unwrapped) and ``optimizer``; ``anchor_state`` restores theta* when resuming."""
        if self._attached:
            raise RuntimeError("this Preservation is already attached; detach() it first")
        self._attached = True
        if not self.active:
            return self
        scores = check_importance(self.importance, model)
        self.level = normalise_importance(scores, self.options.normalise)
        params, _ = canonical_parameters(model)
        self._params = {k: params[k] for k in self.level}
        for k, p in self._params.items():
            self.level[k] = self.level[k].to(device=p.device, dtype=p.dtype)
        if self.options.mode == "lr_scale":
            self.lr_factor = {k: 1.0 - self.options.strength * lvl for k, lvl in self.level.items()}
            self._hooks.append(optimizer.register_step_pre_hook(self._save_before_step))
            self._hooks.append(optimizer.register_step_post_hook(self._scale_update))
        elif self.options.mode == "anchor":
            if anchor_state is not None:
                missing = sorted(set(self._params) - set(anchor_state))
                if missing:
                    raise ValueError(f"the saved preservation anchor lacks parameter(s) {missing[:4]}")
                self.anchor = {k: anchor_state[k].to(self._params[k]).clone() for k in self._params}
            else:
                self.anchor = {k: p.detach().clone() for k, p in self._params.items()}
        return self

    def detach(self):
        for h in self._hooks:
            h.remove()
        self._hooks, self._saved, self._attached = [], {}, False

    # --- lr_scale
    @torch.no_grad()
    def _save_before_step(self, optimizer, args, kwargs):
        self._saved = {k: p.detach().clone() for k, p in self._params.items()}

    @torch.no_grad()
    def _scale_update(self, optimizer, args, kwargs):
        for k, p in self._params.items():
            old = self._saved[k]
            p.copy_(old.add_((p - old).mul_(self.lr_factor[k])))
        self._saved = {}

    # --- anchor
    def anchor_state(self):
        """theta* of the anchor mode, to checkpoint (empty in the other modes)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.anchor.items()}

    @torch.no_grad()
    def penalty_value(self):
        """``anchor_lambda * sum I (theta - theta*)^2`` as a float (0.0 outside anchor mode)."""
        if self.options.mode != "anchor":
            return 0.0
        total = sum(float((self.level[k] * (p - self.anchor[k]).pow(2)).sum()) for k, p in self._params.items())
        return self.options.anchor_lambda * total

    @torch.no_grad()
    def add_penalty_grad(self):
        """Add the anchor penalty's gradient to ``.grad``; returns the penalty value (0.0 outside anchor mode)."""
        if self.options.mode != "anchor":
            return 0.0
        lam = self.options.anchor_lambda
        total = 0.0
        for k, p in self._params.items():
            diff = p.detach() - self.anchor[k]
            total += float((self.level[k] * diff.pow(2)).sum())
            g = (2.0 * lam) * self.level[k] * diff
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g)
        return lam * total
