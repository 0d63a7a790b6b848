"""Capability-weighted structured pruning of a Nexus audio encoder (heads and FFN neurons), under a parameter budget.

Importance is the project's ``capability`` scorer (`importance.CapabilityScorer`: first-order Taylor plus activation
statistics, each normalised by its mean over the stack) on the *speech* capability: the loss is Whisper's own
transcription cross-entropy on the reference text of spoken calibration clips, with the encoder under test feeding
Whisper's decoder. A unit's Taylor term is ``|sum over tokens of gate * dLoss/dgate|`` for a multiplicative gate on
its output (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning"); its activation term is the
mean norm of its output (Minitron). Allocation is dynamic: all heads and neurons of all layers compete on score per
parameter until the budget is spent, so layers end with different widths.

Sample::

    scores = speech_unit_scores(student.model.encoders[0], whisper, calibration)   # {"heads": [...], "neurons": [...]}
    keep = allocate_units(student.model.encoders[0], scores, max_params=5_000_000)
    student = prune_audio_encoder(student, keep)
"""

from types import SimpleNamespace

import torch

from ..modeling_nexus import NexusConfig, NexusForCausalLM
from .importance import CapabilityScorer


def _gated(encoder):
    """Attach multiplicative gates (value 1) to every head output and FFN neuron; returns (gates, activations, hooks)."""
    gates, acts, hooks = {}, {}, []
    for i, layer in enumerate(encoder.layers):
        if layer.self_attn is not None:
            attn = layer.self_attn
            g = torch.ones(attn.num_heads, requires_grad=True)
            gates[("heads", i)] = g

            def pre_out(module, args, g=g, attn=attn, i=i):
                x = args[0]  # (B, T, nh * hd)
                B, T, _ = x.shape
                x = x.view(B, T, attn.num_heads, attn.head_dim)
                acts[("heads", i)] = x.detach().norm(dim=-1).mean(dim=(0, 1))  # (nh,)
                return ((x * g[:, None]).view(B, T, -1),)

            hooks.append(attn.out_proj.register_forward_pre_hook(pre_out))
        if layer.fc1 is not None:
            g = torch.ones(layer.fc1.out_features, requires_grad=True)
            gates[("neurons", i)] = g

            def pre_fc2(module, args, g=g, i=i):
                acts[("neurons", i)] = args[0].detach().abs().mean(dim=(0, 1))  # (ffn,)
                return (args[0] * g,)

            hooks.append(layer.fc2.register_forward_pre_hook(pre_fc2))
    return gates, acts, hooks


def speech_unit_scores(encoder, whisper, calibration, weight=1.0):
    """Capability-weighted importance of every head and FFN neuron of ``encoder`` (a NexusAudioEncoder holding
    Whisper's encoder layout) on the speech capability.

    ``calibration``: list of ``(features (1, n_mels, 3000), labels (1, L))``, labels being Whisper's decoder input
    (prompt + reference text tokens + EOS). ``whisper``: the teacher (its decoder scores the encoder's output).
    Returns ``{"heads": [tensor or None per layer], "neurons": [...]}``, higher = keep.
    """
    n = len(encoder.layers)
    taylor = {"heads": [None] * n, "neurons": [None] * n}
    activation = {"heads": [None] * n, "neurons": [None] * n}
    gates, acts, hooks = _gated(encoder)
    for p in list(encoder.parameters()) + list(whisper.parameters()):
        p.requires_grad_(False)
    try:
        for features, labels in calibration:
            states, _ = encoder.encode(features.to(encoder.conv1.weight.dtype))  # (1, 1500, d)
            logits = whisper(encoder_outputs=(states.to(whisper.dtype),), decoder_input_ids=labels[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten())
            grads = torch.autograd.grad(loss, list(gates.values()))
            for (kind, i), g in zip(gates, grads):
                t = g.abs()  # gate = 1: |gate * dL/dgate|
                taylor[kind][i] = t if taylor[kind][i] is None else taylor[kind][i] + t
                a = acts[(kind, i)]
                activation[kind][i] = a if activation[kind][i] is None else activation[kind][i] + a
    finally:
        for h in hooks:
            h.remove()
    layers = [SimpleNamespace(index=i, attn=l.self_attn, num_heads=0 if l.self_attn is None else l.self_attn.num_heads,
                              mlp=l.fc1, ffn_size=0 if l.fc1 is None else l.fc1.out_features)
              for i, l in enumerate(encoder.layers)]
    d = encoder.spec["d_model"]
    units = SimpleNamespace(layers=layers, hidden_size=d)
    stats = SimpleNamespace(
        gradients=True, tokens=len(calibration),
        head_taylor=taylor["heads"], neuron_taylor=taylor["neurons"],
        head_activation=activation["heads"], neuron_activation=activation["neurons"],
        layer_taylor=torch.zeros(n), layer_redundancy=torch.zeros(n),
        hidden_taylor=torch.zeros(d), hidden_activation=torch.zeros(d),
    )
    scores = CapabilityScorer().score(units, {"speech": stats}, {"speech": weight})
    return {"heads": scores.heads, "neurons": scores.neurons}


def audio_encoder_parameter_count(spec, hidden_size=None):
    """Parameters of a ``whisper_audio`` encoder spec (with its projector when ``hidden_size`` is given)."""
    d, mels = spec["d_model"], spec["num_mel_bins"]
    total = mels * d * 3 + d + d * d * 3 + d + spec["max_source_positions"] * d + 2 * d  # convs, positions, final LN
    for layer in spec["layers"]:
        h, hd, f = layer["num_attention_heads"], layer["head_dim"], layer["intermediate_size"]
        if h:
            total += 2 * d + 4 * d * h * hd + 2 * h * hd + d  # LN, q/k/v/out, q/v biases, out bias
        if f:
            total += 2 * d + 2 * d * f + f + d
    if hidden_size is not None:
        k = spec["downsample"]
        total += d * k * hidden_size + hidden_size
        if spec["projector"] == "mlp":
            total += hidden_size * hidden_size + hidden_size
    return total


def allocate_units(encoder, scores, max_params, hidden_size=None, min_heads_per_layer=1):
    """Which heads and neurons to keep so the encoder (+ projector if ``hidden_size``) fits ``max_params``.

    Dynamic allocation: every unit competes on ``score / parameter cost``; each layer keeps at least
    ``min_heads_per_layer`` heads (its best) so no layer loses its attention. Returns ``{"heads": [...], "neurons":
    [...]}`` of sorted kept indices per layer.
    """
    spec = encoder.spec
    d = spec["d_model"]
    empty = dict(spec, layers=[dict(l, num_attention_heads=0, intermediate_size=0) for l in spec["layers"]])
    budget = max_params - audio_encoder_parameter_count(empty, hidden_size)
    keep = {"heads": [[] for _ in spec["layers"]], "neurons": [[] for _ in spec["layers"]]}
    candidates = []
    for i, layer in enumerate(spec["layers"]):
        hd = layer["head_dim"]
        head_cost, neuron_cost = 4 * d * hd + 2 * hd, 2 * d + 1
        if scores["heads"][i] is not None:
            order = scores["heads"][i].argsort(descending=True).tolist()
            for rank, h in enumerate(order):
                cost = head_cost + (2 * d + d if rank == 0 else 0)  # the first head brings the LN and out bias
                if rank < min_heads_per_layer:
                    keep["heads"][i].append(h)
                    budget -= cost
                else:
                    candidates.append((float(scores["heads"][i][h]) / cost, cost, "heads", i, h))
        if scores["neurons"][i] is not None:
            for u, s in enumerate(scores["neurons"][i].tolist()):
                candidates.append((s / neuron_cost, neuron_cost, "neurons", i, u))
    if budget < 0:
        raise ValueError(f"a budget of {max_params} parameters cannot hold the encoder's fixed parts and "
                         f"{min_heads_per_layer} head(s) per layer")
    has_mlp = [False] * len(spec["layers"])
    for _, cost, kind, i, u in sorted(candidates, key=lambda c: -c[0]):
        extra = 3 * d if kind == "neurons" and not has_mlp[i] else 0  # a layer's first neuron brings LN + fc2 bias
        if cost + extra <= budget:
            keep[kind][i].append(u)
            budget -= cost + extra
            has_mlp[i] = has_mlp[i] or kind == "neurons"
    return {kind: [sorted(v) for v in per_layer] for kind, per_layer in keep.items()}


def prune_audio_encoder(model, keep, index=0):
    """A new NexusForCausalLM whose encoder ``index`` keeps exactly the ``keep`` heads / neurons of ``model``'s."""
    cfg = model.config.to_dict()
    for key in ("auto_map", "architectures", "transformers_version", "model_type"):
        cfg.pop(key, None)
    spec = dict(cfg["encoders"][index])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = f"model.encoders.{index}.layers."
    layers = []
    for i, layer in enumerate(spec["layers"]):
        lp, hd = f"{prefix}{i}.", layer["head_dim"]
        heads, neurons = keep["heads"][i], keep["neurons"][i]
        if layer["num_attention_heads"]:
            rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads]) if heads else torch.zeros(0, dtype=torch.long)
            for p in ("q_proj", "k_proj", "v_proj"):
                state[f"{lp}self_attn.{p}.weight"] = state[f"{lp}self_attn.{p}.weight"][rows]
                if f"{lp}self_attn.{p}.bias" in state:
                    state[f"{lp}self_attn.{p}.bias"] = state[f"{lp}self_attn.{p}.bias"][rows]
            state[f"{lp}self_attn.out_proj.weight"] = state[f"{lp}self_attn.out_proj.weight"][:, rows]
            if not heads:
                for k in [k for k in state if k.startswith(f"{lp}self_attn")]:
                    del state[k]
        if layer["intermediate_size"]:
            idx = torch.tensor(neurons, dtype=torch.long)
            state[f"{lp}fc1.weight"] = state[f"{lp}fc1.weight"][idx]
            state[f"{lp}fc1.bias"] = state[f"{lp}fc1.bias"][idx]
            state[f"{lp}fc2.weight"] = state[f"{lp}fc2.weight"][:, idx]
            if not neurons:
                for k in [k for k in state if k.startswith((f"{lp}fc1", f"{lp}fc2", f"{lp}final_layer_norm"))]:
                    del state[k]
        layers.append({"num_attention_heads": len(heads), "head_dim": hd, "intermediate_size": len(neurons)})
    spec["layers"] = layers
    cfg["encoders"] = [spec if j == index else e for j, e in enumerate(cfg["encoders"])]
    pruned = NexusForCausalLM(NexusConfig(**cfg)).to(next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    return pruned.eval()
