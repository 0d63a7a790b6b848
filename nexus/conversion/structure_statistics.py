"""What the pruner's scorers measure on a capability's calibration windows: one forward (+ backward) with hooks.

For every prunable structure of one decoder stack (a Nexus tower, addressed through `DecoderUnits`), per token:

===============  ===========================================  ==================================================
structure        activation statistic                          first-order Taylor statistic (needs a backward)
===============  ===========================================  ==================================================
head ``h``       ``||a_h||_2``: its slice of ``o_proj``'s input  ``|sum_d a_{h,d} * dL/da_{h,d}|``
FFN unit ``j``   ``|a_j|``: its column of ``down_proj``'s input  ``|a_j * dL/da_j|``
layer ``l``      ``1 - cos(x_l, y_l)`` (ShortGPT's block        ``|sum_c (y_l - x_l)_c * dL/dy_{l,c}|``: the loss
                 influence: how much the layer turns the stream)  change of skipping the layer
hidden ``c``     ``|RMSNorm(x)_c|`` summed over every norm that  ``|x_c * dL/dx_c|`` summed over the residual
                 feeds a sub-block (Minitron's channel score)    states (embedding output and every layer output)
===============  ===========================================  ==================================================

``L`` is the summed next-token cross-entropy of the window, so a Taylor statistic estimates, per token, how much the
loss moves when the structure is removed (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning";
LLM-Pruner, Ma et al. 2023, use the same first-order term for coupled structures). Every statistic is a mean over
the calibration tokens. Only activations carry gradients: the weights are frozen during the pass and restored after.
"""

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .decoder_units import DecoderUnits


@dataclass
class StructureStatistics:
    """Means over ``tokens`` calibration tokens; lists hold one entry per layer (None where the layer has none)."""

    tokens: int
    gradients: bool
    head_activation: list = field(default_factory=list)  # (num_heads,)
    head_taylor: list = field(default_factory=list)
    neuron_activation: list = field(default_factory=list)  # (ffn_size,)
    neuron_taylor: list = field(default_factory=list)
    layer_redundancy: torch.Tensor | None = None  # (layers,) 1 - cos(in, out)
    layer_taylor: torch.Tensor | None = None
    hidden_activation: torch.Tensor | None = None  # (hidden,)
    hidden_taylor: torch.Tensor | None = None


class _Sums:
    def __init__(self):
        self.values = {}

    def add(self, key, value):
        value = value.detach().float()
        self.values[key] = self.values[key] + value if key in self.values else value

    def get(self, key, tokens):
        return self.values[key] / tokens if key in self.values else None


def _tokens_sum(x):
    """Sum over the batch and time axes: (B, T, ...) -> (...)."""
    return x.reshape(-1, *x.shape[2:]).sum(0)


@contextlib.contextmanager
def _frozen(model):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def collect_structure_statistics(model, windows, tower=None, gradients=True, autocast=True, batch_size=4,
                                 advance=None):
    """`StructureStatistics` of one decoder stack of ``model`` over ``windows`` ((rows, T) token ids, no padding).

    ``gradients=False`` skips the backward (activation statistics only, Taylor fields stay None).
    ``advance(k)`` is called after every k rows (progress bars).
    """
    units = DecoderUnits(model, tower)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (rows, T>=2) token ids, got shape {tuple(windows.shape)}")
    sums, handles, inputs = _Sums(), [], {}
    embed = model.get_input_embeddings()

    def grad_hook(key_fn):
        def register(tensor, *saved):
            if gradients and tensor.requires_grad:
                tensor.register_hook(lambda g: key_fn(g, *saved))
        return register

    def on_state(state):  # a residual state with its gradient -> hidden Taylor
        grad_hook(lambda g, s: sums.add("hidden_taylor", _tokens_sum((s * g.float()).abs())))(state, state.detach().float())

    def embed_hook(module, args, output):
        if not gradients:
            return output
        out = output.detach().requires_grad_(True)
        on_state(out)
        return out

    handles.append(embed.register_forward_hook(embed_hook))
    for info in units.layers:
        l = info.index

        def pre(module, args, kwargs, l=l):
            inputs[l] = (args[0] if args else kwargs["hidden_states"]).detach().float()

        def post(module, args, kwargs, output, l=l):
            y = output[0] if isinstance(output, tuple) else output
            x = inputs.pop(l)
            yf = y.detach().float()
            sums.add(("layer_redundancy", l), (1 - F.cosine_similarity(x, yf, dim=-1)).sum())
            delta = yf - x
            grad_hook(lambda g, d: sums.add(("layer_taylor", l), (d * g.float()).sum(-1).abs().sum()))(y, delta)
            on_state(y)

        handles.append(info.layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(info.layer.register_forward_hook(post, with_kwargs=True))
        for norm_name in ("input_layernorm", "pre_feedforward_layernorm"):
            norm = getattr(info.layer, norm_name, None)
            if norm is not None:
                handles.append(norm.register_forward_hook(
                    lambda m, a, out: sums.add("hidden_activation", _tokens_sum(out.detach().float().abs()))))
        if info.attn is not None:
            nh, hd = info.num_heads, info.head_dim

            def heads_in(module, args, l=l, nh=nh, hd=hd):
                a = args[0]
                af = a.detach().float().reshape(*a.shape[:2], nh, hd)
                sums.add(("head_activation", l), _tokens_sum(af.norm(dim=-1)))
                grad_hook(lambda g, s: sums.add(
                    ("head_taylor", l), _tokens_sum((s * g.float().reshape(s.shape)).sum(-1).abs())))(a, af)

            handles.append(info.attn.o_proj.register_forward_pre_hook(heads_in))
        if info.mlp is not None:
            def neurons_in(module, args, l=l):
                a = args[0]
                af = a.detach().float()
                sums.add(("neuron_activation", l), _tokens_sum(af.abs()))
                grad_hook(lambda g, s: sums.add(("neuron_taylor", l), _tokens_sum((s * g.float()).abs())))(a, af)

            handles.append(info.mlp.down_proj.register_forward_pre_hook(neurons_in))

    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with _frozen(model), torch.set_grad_enabled(gradients):
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start:start + batch_size]
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with ctx:
                    logits = model(ids, use_cache=False, **units.forward_kwargs).logits  # (B, T, V)
                if gradients:
                    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1), reduction="sum")
                    loss.backward()
                del logits
                tokens += ids.numel()
                if advance:
                    advance(ids.shape[0])
    finally:
        for h in handles:
            h.remove()
        inputs.clear()
        model.train(was_training)

    n = len(units.layers)
    stats = StructureStatistics(tokens=tokens, gradients=gradients)
    for name in ("head_activation", "head_taylor", "neuron_activation", "neuron_taylor"):
        setattr(stats, name, [sums.get((name, l), tokens) for l in range(n)])
    stats.layer_redundancy = torch.stack([sums.get(("layer_redundancy", l), tokens) for l in range(n)])
    if gradients:
        stats.layer_taylor = torch.stack([sums.get(("layer_taylor", l), tokens) for l in range(n)])
        stats.hidden_taylor = sums.get("hidden_taylor", tokens)
    stats.hidden_activation = sums.get("hidden_activation", tokens)
    return stats
