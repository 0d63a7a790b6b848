"""Standard-architecture export: one Nexus tower as a plain Llama / Gemma-3 / Qwen2 / Qwen3 checkpoint.

The result loads with ``AutoModelForCausalLM.from_pretrained(path)`` and no remote code, which is what Unsloth, vLLM
and llama.cpp users need, and gives the same logits as ``nexus_model(ids, tower=i)``. It is the inverse of
`nexus.conversion.teacher_families`: the tower's norm type and placement, q/k-norm, biases, embedding scale and
softcaps pick the family (``arch="auto"``), and every Nexus feature the family cannot express is an error naming it.

Standard architectures have one width per model; a pruned tower has one per layer. ``pad_to_uniform=True`` pads
every layer to a common shape with zero weights, which leaves the logits unchanged:

- FFN: extra gate/up rows and down columns are zero, so the extra units output ``0 * act(0) = 0``;
- attention: extra query heads get zero ``o_proj`` columns, so whatever they attend to is dropped; a kv head whose
  query group would exceed the common group size is duplicated, each copy serving a slice of the group; unused kv
  slots are zero; a layer with 0 heads becomes one whose every head is zero (its output is exactly 0);
- the head count is also raised until it divides ``hidden_size``, which transformers' configs require.
``head_dim`` cannot be padded (it changes RoPE), so it must already be uniform.

Any single tower exports, whatever the other towers' families (`tower_view`):

- a shared-vocabulary tower gets the shared embedding, final norm and head, in its family's form: a final norm of
  the other kind is converted (``rms`` weight ``w`` = gemma ``1 + w'``), and the shared embedding scale is folded
  into the embedding rows when the head is not tied to them (Gemma multiplies by ``sqrt(hidden)``, the others by 1);
- an own-vocabulary tower (``vocabulary: own``) exports with its own embedding, final norm and head at its own
  width, mapped back to the shared vocabulary: each id in ``vocabulary_ids`` gets its row, every other id gets the
  tower's last embedding row (its zero input) and the head's last row, which is the logit Nexus gives those ids.

A shared final norm whose eps differs from the tower's stays an error (standard configs have one eps for every
norm, and an eps cannot be folded into weights). Every export records ``max_logit_diff``, the largest |logit
difference| from the Nexus model with that tower forced, on a short probe sequence (``nexus_export.json``).

Example::

    from nexus.hub.standard_export import export_standard
    export_standard("runs/demo/student", "out/prose-llama", tower="prose", pad_to_uniform=True)  # a capability's
    # name exports the tower that serves it (towers are named after their teachers)
"""

import copy
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..conversion.atomic_output import atomic_dir, check_output_vs_sources
from ..conversion.load_check import checked_load_state_dict
from .nexus_checkpoint import load_nexus_checkpoint, tokenizer_files

ARCHES = ("llama", "qwen2", "qwen3", "gemma3_text")


class StandardExportError(ValueError):
    pass


@dataclass
class LayerShape:
    """The common shape every exported layer gets, and how each Nexus layer is placed into it."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- family choice


def choose_arch(config, tower_index):
    """The standard family that expresses tower ``tower_index`` (llama, qwen2, qwen3 or gemma3_text)."""
    spec = config.towers[tower_index]
    where = f"towers[{tower_index}]"
    if spec["norm"] == "gemma_rms":
        if not spec["sandwich_norms"]:
            raise StandardExportError(f"{where}: norm 'gemma_rms' without sandwich_norms matches no standard "
                                      f"architecture ({', '.join(ARCHES)})")
        return "gemma3_text"
    if spec["sandwich_norms"]:
        raise StandardExportError(f"{where}: sandwich_norms with norm 'rms' matches no standard architecture "
                                  f"({', '.join(ARCHES)})")
    if spec["qk_norm"]:
        return "qwen3"
    if spec["attention_bias"] and not spec["attention_out_bias"]:
        return "qwen2"
    return "llama"


def _require(ok, where, field_name, value, arch, expected):
    if not ok:
        raise StandardExportError(f"{where}.{field_name} = {value!r} cannot be expressed by {arch} "
                                  f"(needs {expected})")


def _check_family(config, tower_index, arch):
    """Every tower/model field the family cannot express is an error naming the field."""
    spec = config.towers[tower_index]
    w = f"towers[{tower_index}]"
    gemma = arch == "gemma3_text"
    _require(spec["hidden_size"] == config.hidden_size, w, "hidden_size", spec["hidden_size"], arch,
             f"the shared hidden_size {config.hidden_size}: a tower with edge projections has no standard form")
    _require(math.isclose(config.final_norm_eps, spec["rms_norm_eps"], rel_tol=1e-9), "config", "final_norm_eps",
             config.final_norm_eps, arch, f"the tower's rms_norm_eps {spec['rms_norm_eps']} (one eps for all norms; "
             "an eps cannot be folded into weights)")
    _require(spec["norm"] == ("gemma_rms" if gemma else "rms"), w, "norm", spec["norm"], arch,
             "'gemma_rms'" if gemma else "'rms'")
    _require(spec["sandwich_norms"] == gemma, w, "sandwich_norms", spec["sandwich_norms"], arch, str(gemma))
    _require(spec["qk_norm"] == (arch in ("qwen3", "gemma3_text")), w, "qk_norm", spec["qk_norm"], arch,
             str(arch in ("qwen3", "gemma3_text")))
    if arch == "qwen2":
        _require(spec["attention_bias"], w, "attention_bias", spec["attention_bias"], arch, "True (q/k/v bias)")
        _require(not spec["attention_out_bias"], w, "attention_out_bias", spec["attention_out_bias"], arch, "False")
    else:
        _require(spec["attention_bias"] == spec["attention_out_bias"], w, "attention_out_bias",
                 spec["attention_out_bias"], arch, f"the same as attention_bias ({spec['attention_bias']}): "
                 "one flag covers q/k/v/o")
    if arch != "llama":
        _require(not spec["mlp_bias"], w, "mlp_bias", spec["mlp_bias"], arch, "False")
    if gemma:
        scale = config.embedding_scale
        _require(scale is not None and math.isclose(scale, config.hidden_size**0.5, rel_tol=1e-6), "config",
                 "embedding_scale", scale, arch, f"sqrt(hidden_size) = {config.hidden_size**0.5:.6g}")
    else:
        _require(config.embedding_scale in (None, 1.0), "config", "embedding_scale", config.embedding_scale, arch,
                 "None")
        _require(config.final_logit_softcapping is None, "config", "final_logit_softcapping",
                 config.final_logit_softcapping, arch, "None")
        _require(spec["attn_logit_softcapping"] is None, w, "attn_logit_softcapping", spec["attn_logit_softcapping"],
                 arch, "None")


# ------------------------------------------------------------------------------------------------- layer widths


def _group_layout(layers, hidden, where, pad):
    """Common (heads, kv_heads) for the attention layers, padding when ``pad``; errors name the layer and field."""
    attn = [(i, l["num_attention_heads"], l["num_key_value_heads"]) for i, l in enumerate(layers)
            if l["num_attention_heads"] > 0]
    if not attn:
        raise StandardExportError(f"{where}: no layer has attention heads; a standard architecture needs some")
    if not pad:
        i0, h0, kv0 = attn[0]
        for i, h, kv in attn[1:]:
            for name, value, ref in (("num_attention_heads", h, h0), ("num_key_value_heads", kv, kv0)):
                if value != ref:
                    raise StandardExportError(
                        f"{where}.layers[{i}].{name} = {value} differs from layers[{i0}] ({ref}); widths must be "
                        "uniform for a standard architecture: pass pad_to_uniform=True (CLI: --pad-to-uniform) to pad with zero weights")
        if hidden % h0:
            raise StandardExportError(
                f"{where}.layers[*].num_attention_heads = {h0} does not divide hidden_size {hidden}, which "
                "transformers' standard configs require: pass pad_to_uniform=True (CLI: --pad-to-uniform) to add zero heads")
        return h0, kv0
    kv_min = max(kv for _, _, kv in attn)
    h_min = max(h for _, h, _ in attn)

    def fits(kv_slots, group):
        return all(kv * math.ceil((h // kv) / group) <= kv_slots for _, h, kv in attn)

    for heads in range(h_min, 64 * hidden + 1):
        if hidden % heads:
            continue
        for kv_slots in range(kv_min, heads + 1):
            if heads % kv_slots == 0 and fits(kv_slots, heads // kv_slots):
                return heads, kv_slots
    raise StandardExportError(f"{where}: no uniform head layout fits hidden_size {hidden}")


def uniform_shape(config, tower_index, pad_to_uniform=False):
    """The `LayerShape` every exported layer gets; without padding, irregular widths are an error naming the layer."""
    spec = config.towers[tower_index]
    where = f"towers[{tower_index}]"
    layers = spec["layers"]
    notes = []
    for i, layer in enumerate(layers):
        for name in ("num_attention_heads", "intermediate_size"):
            if layer[name] == 0 and not pad_to_uniform:
                part = "attention" if name == "num_attention_heads" else "MLP"
                raise StandardExportError(
                    f"{where}.layers[{i}].{name} = 0 (its {part} was pruned away): a standard architecture has "
                    f"{part} in every layer; pass pad_to_uniform=True (CLI: --pad-to-uniform) to give it an all-zero {part}")
    head_dims = {l["head_dim"] for l in layers if l["num_attention_heads"] > 0}
    if len(head_dims) > 1:
        first = next(l["head_dim"] for l in layers if l["num_attention_heads"] > 0)
        bad = next(i for i, l in enumerate(layers) if l["num_attention_heads"] > 0 and l["head_dim"] != first)
        raise StandardExportError(f"{where}.layers[{bad}].head_dim = {layers[bad]['head_dim']} differs from {first}; "
                                  "head_dim cannot be padded (it changes RoPE), so it must be uniform")
    heads, kv_heads = _group_layout(layers, config.hidden_size, where, pad_to_uniform)
    ffn = [l["intermediate_size"] for l in layers]
    if not pad_to_uniform and len(set(ffn)) > 1:
        i = next(i for i, f in enumerate(ffn) if f != ffn[0])
        raise StandardExportError(f"{where}.layers[{i}].intermediate_size = {ffn[i]} differs from layers[0] "
                                  f"({ffn[0]}); widths must be uniform for a standard architecture: pass "
                                  "pad_to_uniform=True to pad with zero weights")
    for i, layer in enumerate(layers):
        if (layer["num_attention_heads"], layer["num_key_value_heads"]) != (heads, kv_heads):
            notes.append(f"layers[{i}]: attention {layer['num_attention_heads']}q/{layer['num_key_value_heads']}kv "
                         f"padded to {heads}q/{kv_heads}kv")
        if layer["intermediate_size"] != max(ffn):
            notes.append(f"layers[{i}]: FFN {layer['intermediate_size']} padded to {max(ffn)}")
    return LayerShape(heads, kv_heads, head_dims.pop(), max(ffn), notes)


def _rows(indices, width):
    return [r for i in indices for r in range(i * width, (i + 1) * width)]


def _place_attention(state, prefix, layer, shape, bias, out_bias, dtype, hidden):
    """Attention weights of one Nexus layer, placed into the common (heads, kv_heads) layout."""
    hd, H, KV = shape.head_dim, shape.heads, shape.kv_heads
    G = H // KV
    q = torch.zeros(H * hd, hidden, dtype=dtype)
    k = torch.zeros(KV * hd, hidden, dtype=dtype)
    v = torch.zeros(KV * hd, hidden, dtype=dtype)
    o = torch.zeros(hidden, H * hd, dtype=dtype)
    qb, kb, vb = (torch.zeros(n * hd, dtype=dtype) for n in (H, KV, KV))
    ob = torch.zeros(hidden, dtype=dtype)
    h, kv = layer["num_attention_heads"], layer["num_key_value_heads"]
    a = f"{prefix}self_attn."
    if h > 0:
        g = h // kv
        copies = math.ceil(g / G)
        for j in range(kv):  # original kv head j -> target kv slots j*copies + r
            for r in range(copies):
                slot = j * copies + r
                k[_rows([slot], hd)] = state[f"{a}k_proj.weight"][_rows([j], hd)]
                v[_rows([slot], hd)] = state[f"{a}v_proj.weight"][_rows([j], hd)]
                if bias:
                    kb[_rows([slot], hd)] = state[f"{a}k_proj.bias"][_rows([j], hd)]
                    vb[_rows([slot], hd)] = state[f"{a}v_proj.bias"][_rows([j], hd)]
                for s in range(min(G, g - r * G)):
                    src, dst = j * g + r * G + s, slot * G + s
                    q[_rows([dst], hd)] = state[f"{a}q_proj.weight"][_rows([src], hd)]
                    o[:, _rows([dst], hd)] = state[f"{a}o_proj.weight"][:, _rows([src], hd)]
                    if bias:
                        qb[_rows([dst], hd)] = state[f"{a}q_proj.bias"][_rows([src], hd)]
        if out_bias:
            ob = state[f"{a}o_proj.bias"].clone()
    out = {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "o_proj.weight": o}
    if bias:
        out.update({"q_proj.bias": qb, "k_proj.bias": kb, "v_proj.bias": vb})
    if out_bias:
        out["o_proj.bias"] = ob
    return out


def _place_mlp(state, prefix, layer, shape, bias, dtype, hidden):
    n, F = layer["intermediate_size"], shape.intermediate_size
    out = {"gate_proj.weight": torch.zeros(F, hidden, dtype=dtype), "up_proj.weight": torch.zeros(F, hidden, dtype=dtype),
           "down_proj.weight": torch.zeros(hidden, F, dtype=dtype)}
    if bias:
        out.update({"gate_proj.bias": torch.zeros(F, dtype=dtype), "up_proj.bias": torch.zeros(F, dtype=dtype),
                    "down_proj.bias": torch.zeros(hidden, dtype=dtype)})
    if n > 0:
        m = f"{prefix}mlp."
        out["gate_proj.weight"][:n] = state[f"{m}gate_proj.weight"]
        out["up_proj.weight"][:n] = state[f"{m}up_proj.weight"]
        out["down_proj.weight"][:, :n] = state[f"{m}down_proj.weight"]
        if bias:
            out["gate_proj.bias"][:n] = state[f"{m}gate_proj.bias"]
            out["up_proj.bias"][:n] = state[f"{m}up_proj.bias"]
            out["down_proj.bias"] = state[f"{m}down_proj.bias"].clone()
    return out


# ----------------------------------------------------------------------------------------------------- config


def _rope_parameters(layer):
    return {"rope_type": "default", "rope_theta": float(layer["rope_theta"]), **(layer["rope_scaling"] or {})}


def _uniform_rope(layers, where, arch, which):
    """The one rope dict (and window) shared by ``layers`` (index, spec); an error names a layer that differs."""
    (i0, ref), *rest = layers
    for i, layer in rest:
        for name in ("rope_theta", "rope_scaling", "sliding_window"):
            if layer[name] != ref[name]:
                raise StandardExportError(f"{where}.layers[{i}].{name} = {layer[name]!r} differs from layers[{i0}] "
                                          f"({ref[name]!r}); {arch} has one value for all {which} layers")
    return _rope_parameters(ref), ref["sliding_window"]


def standard_config(config, tower_index, arch, shape):
    """The HF config (a PreTrainedConfig) of the standard export of tower ``tower_index``."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    spec = config.towers[tower_index]
    where = f"towers[{tower_index}]"
    layers = list(enumerate(spec["layers"]))
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=len(layers), num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=spec["rms_norm_eps"], tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )
    scalar = spec["query_pre_attn_scalar"]
    if arch == "gemma3_text":
        sliding = [(i, l) for i, l in layers if l["sliding_window"] is not None]
        full = [(i, l) for i, l in layers if l["sliding_window"] is None]
        rope, window = {}, None
        if sliding:
            rope["sliding_attention"], window = _uniform_rope(sliding, where, arch, "sliding-window")
        if full:
            rope["full_attention"], _ = _uniform_rope(full, where, arch, "full-attention")
        rope.setdefault("sliding_attention", rope.get("full_attention"))
        rope.setdefault("full_attention", rope.get("sliding_attention"))
        return Gemma3TextConfig(
            **common, hidden_activation=spec["hidden_act"], attention_bias=spec["attention_bias"],
            query_pre_attn_scalar=scalar or shape.head_dim, sliding_window=window or config.max_position_embeddings,
            layer_types=["sliding_attention" if l["sliding_window"] is not None else "full_attention" for _, l in layers],
            rope_parameters=copy.deepcopy(rope), final_logit_softcapping=config.final_logit_softcapping,
            attn_logit_softcapping=spec["attn_logit_softcapping"],
        )
    if scalar not in (None, shape.head_dim):
        raise StandardExportError(f"{where}.query_pre_attn_scalar = {scalar} cannot be expressed by {arch} "
                                  f"(its attention scale is head_dim ** -0.5, head_dim = {shape.head_dim})")
    for i, layer in layers:
        if layer["sliding_window"] is not None:
            raise StandardExportError(f"{where}.layers[{i}].sliding_window = {layer['sliding_window']} cannot be "
                                      f"expressed by {arch} (only gemma3_text export has sliding-window layers)")
    rope, _ = _uniform_rope(layers, where, arch, "")
    kwargs = dict(common, hidden_act=spec["hidden_act"], rope_parameters=rope)
    if arch == "llama":
        return LlamaConfig(**kwargs, attention_bias=spec["attention_bias"], mlp_bias=spec["mlp_bias"])
    if arch == "qwen2":
        kwargs.pop("head_dim")
        if shape.head_dim * shape.heads != config.hidden_size:
            raise StandardExportError(f"{where}: qwen2 needs head_dim * num_attention_heads == hidden_size, got "
                                      f"{shape.head_dim} * {shape.heads} != {config.hidden_size}; use arch='llama'")
        return Qwen2Config(**kwargs)
    return Qwen3Config(**kwargs, attention_bias=spec["attention_bias"])


# ------------------------------------------------------------------------------------------------------ model


def _tower_index(model, tower):
    try:
        return model.model.tower_index_for(tower=tower)
    except ValueError as exc:
        raise StandardExportError(str(exc)) from None


def tower_view(model, t, arch):
    """``(config view, {embed, norm, head} tensors, notes)``: the model-level fields and tensors tower ``t`` exports
    with, in the form of ``arch`` (see the module docstring). The view is a shallow copy of the Nexus config."""
    config, spec = model.config, model.config.towers[t]
    tower = model.model.towers[t]
    view = copy.copy(config)
    family_norm = "gemma_rms" if arch == "gemma3_text" else "rms"
    notes = []
    with torch.no_grad():
        if tower.own_vocabulary:
            h, n = spec["hidden_size"], (len(spec["vocabulary_ids"]) if spec["vocabulary_ids"] else None)
            embed, head = tower.embed_tokens.weight.detach(), tower.lm_head.weight.detach()
            if n is not None:  # rows for vocabulary_ids; every other shared id: the last (zero-input) row
                ids = torch.tensor(spec["vocabulary_ids"], dtype=torch.long)
                embed = embed[n].expand(config.vocab_size, h).clone().index_copy_(0, ids, embed[:n])
                head = head[n].expand(config.vocab_size, h).clone().index_copy_(0, ids, head[:n])
                notes.append(f"own vocabulary: {n} of {config.vocab_size} ids have their own rows; the other "
                             "ids share the tower's last embedding and head rows")
            weights = {"embed": embed, "norm": tower.norm.weight.detach(), "head": head}
            view.hidden_size, view.tie_word_embeddings = h, False
            view.final_norm, view.final_norm_eps = spec["norm"], spec["rms_norm_eps"]
            scale, view.final_logit_softcapping = spec["embedding_scale"], spec["final_logit_softcapping"]
        else:
            weights = {"embed": model.model.embed_tokens.weight.detach(), "norm": model.model.norm.weight.detach(),
                       "head": None if config.tie_word_embeddings else model.lm_head.weight.detach()}
            scale = config.embedding_scale
        if view.final_norm != family_norm:  # rms: w * x_hat;  gemma_rms: (1 + w) * x_hat
            w = weights["norm"].float()
            weights["norm"] = w - 1.0 if family_norm == "gemma_rms" else w + 1.0
            notes.append(f"final norm {view.final_norm!r} converted to {family_norm!r}")
            view.final_norm = family_norm
        want = view.hidden_size**0.5 if arch == "gemma3_text" else None  # the family's embedding scale
        if (scale or 1.0) != (want or 1.0) and not view.tie_word_embeddings:
            weights["embed"] = weights["embed"].float() * ((scale or 1.0) / (want or 1.0))
            notes.append(f"embedding scale {scale} folded into the embedding rows ({arch} scales by {want or 1})")
            scale = want
        view.embedding_scale = scale
    return view, weights, notes


def max_logit_diff(model, hf_model, t, length=16):
    """max |logits| difference of the export from ``model(ids, tower=t)`` on a fixed pseudo-random sequence."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen)
    with torch.no_grad():
        ref = model(input_ids=ids, tower=t, use_cache=False).logits.float()
        got = hf_model(input_ids=ids, use_cache=False).logits.float()
    return float((ref - got).abs().max())


def standard_model(model, tower=0, pad_to_uniform=False, arch="auto"):
    """``(hf_model, notes)``: tower ``tower`` of the NexusForCausalLM ``model`` as a standard HF causal LM.

    ``arch`` is ``"auto"`` or one of ARCHES; ``notes`` lists every layer that was padded.
    """
    config = model.config
    t = _tower_index(model, tower)
    if config.towers[t].get("type") != "decoder":
        raise StandardExportError(f"towers[{t}].type = {config.towers[t].get('type')!r}: only decoder towers export")
    if arch == "auto":
        arch = choose_arch(config, t)
    elif arch not in ARCHES:
        raise StandardExportError(f"arch must be 'auto' or one of {', '.join(ARCHES)}, got {arch!r}")
    view, weights, view_notes = tower_view(model, t, arch)
    config = view  # the model-level fields this tower exports with
    _check_family(config, t, arch)
    shape = uniform_shape(config, t, pad_to_uniform)
    try:
        hf_config = standard_config(config, t, arch, shape)
    except StandardExportError:
        raise
    except (ValueError, TypeError) as exc:  # transformers' own config validation
        raise StandardExportError(f"towers[{t}] as {arch}: {exc}") from None

    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    spec = config.towers[t]
    state, factored = _dense_projections(model.state_dict(), f"model.towers.{t}.")
    hidden = config.hidden_size
    gemma = arch == "gemma3_text"
    norm_fill = 0.0 if gemma else 1.0  # an absent norm: its value never matters (it feeds all-zero weights)
    out = {"model.embed_tokens.weight": weights["embed"].to(dtype), "model.norm.weight": weights["norm"].to(dtype)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = weights["head"].to(dtype)
    norm_names = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i, layer in enumerate(spec["layers"]):
        src = f"model.towers.{t}.layers.{i}."
        dst = f"model.layers.{i}."
        for name, tensor in _place_attention(state, src, layer, shape, spec["attention_bias"],
                                             spec["attention_out_bias"], dtype, hidden).items():
            out[f"{dst}self_attn.{name}"] = tensor
        for name, tensor in _place_mlp(state, src, layer, shape, spec["mlp_bias"], dtype, hidden).items():
            out[f"{dst}mlp.{name}"] = tensor
        if spec["qk_norm"]:
            for name in ("q_norm", "k_norm"):
                key = f"{src}self_attn.{name}.weight"
                out[f"{dst}self_attn.{name}.weight"] = state[key] if key in state else torch.full(
                    (shape.head_dim,), norm_fill, dtype=dtype)
        for name in norm_names if gemma else norm_names[:3:2]:
            key = f"{src}{name}.weight"
            hf_name = name if gemma or name == "input_layernorm" else "post_attention_layernorm"
            out[f"{dst}{hf_name}.weight"] = state[key] if key in state else torch.full((hidden,), norm_fill, dtype=dtype)

    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    source = getattr(config, "_name_or_path", None) or "(in memory)"
    checked_load_state_dict(hf_model, out, f"{source} (tower {t} as {arch})", what="checkpoint",
                            allow_missing=("lm_head.weight",) if config.tie_word_embeddings else ())
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    notes = view_notes + shape.notes
    if factored:
        notes.append(f"{factored} factored projections (the manifold option's low-rank factors) multiplied out into "
                     "dense weights: the standard family has no factored layer, so this export is larger than the "
                     "tower")
    return hf_model.eval(), notes


def _dense_projections(state, prefix):
    """``(state, n)``: ``state`` with every factored projection under ``prefix`` (``<name>.factor_a`` / ``factor_b``,
    low_rank_linear.py) replaced by its dense ``<name>.weight = B A`` (and ``<name>.bias``), and how many there were."""
    out, n = dict(state), 0
    for key in [k for k in state if k.startswith(prefix) and k.endswith(".factor_a.weight")]:
        name = key[:-len(".factor_a.weight")]
        a, b = out.pop(key), out.pop(f"{name}.factor_b.weight")
        out[f"{name}.weight"] = (b.float() @ a.float()).to(a.dtype)
        if f"{name}.factor_b.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.factor_b.bias")
        n += 1
    return out, n


def export_standard(src, out, tower=0, pad_to_uniform=False, arch="auto", overwrite=False, tokenizer_src=None,
                    gguf=None):
    """Write tower ``tower`` of the Nexus checkpoint (folder or model) ``src`` as a standard HF folder at ``out``.

    The folder holds config.json, model.safetensors, generation config, the tokenizer files of ``src`` (or of
    ``tokenizer_src``) and ``nexus_export.json`` (source, tower, family, padding notes). With ``gguf`` set to a
    dtype (``"f32"``, ``"f16"``, ``"q8_0"``) it also holds ``model-<dtype>.gguf`` (see `gguf_export.py`); a tower
    GGUF cannot express fails the whole export. Returns a dict of the same.
    """
    out = Path(out)
    sources = {"checkpoint": None if isinstance(src, torch.nn.Module) else src, "tokenizer": tokenizer_src}
    check_output_vs_sources(out, sources)  # an output that is, holds or sits in a source would delete it
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass overwrite")
    model = src if isinstance(src, torch.nn.Module) else load_nexus_checkpoint(src)
    hf_model, notes = standard_model(model, tower, pad_to_uniform, arch)
    t = _tower_index(model, tower)
    info = {"source": None if isinstance(src, torch.nn.Module) else str(src), "tower": t,
            "tower_name": model.model.towers[t].name, "architecture": hf_model.config.model_type,
            "padded": any("padded" in n for n in notes), "notes": notes,
            "max_logit_diff": max_logit_diff(model, hf_model, t)}
    tok_dir = tokenizer_src or (None if isinstance(src, torch.nn.Module) else src)
    with atomic_dir(out, overwrite=overwrite, sources=sources) as tmp:
        hf_model.save_pretrained(tmp)
        for path in tokenizer_files(tok_dir) if tok_dir else []:
            shutil.copy2(path, tmp / path.name)
        if gguf:
            from .gguf_export import export_gguf

            info["gguf"] = export_gguf(tmp, tmp / f"model-{gguf}.gguf", dtype=gguf, name=out.name)
            info["gguf"]["path"] = str(out / f"model-{gguf}.gguf")
        (tmp / "nexus_export.json").write_text(json.dumps(info, indent=2))
    return {**info, "path": str(out)}
