"""The ablatable units of a decoder and the modules they live in: layers, attention blocks, heads, kv groups, FFN
blocks and FFN neurons.

One `DecoderUnits` describes either an HF decoder (Llama, Qwen2, Qwen3, Gemma-3 text: ``model.model.layers``) or one
tower of a `NexusForCausalLM` (``model.model.towers[t].layers``), so localisation and compression address units the
same way whatever the source. Widths are read from the modules themselves (``o_proj.in_features // head_dim``), so
pruned Nexus towers with irregular per-layer widths work, and a layer without attention or without an MLP simply has
no units of that kind.

Unit identifiers are plain tuples, as stored in the feature map:

=============  ==================  ==============================================================================
kind           id                  what ablating it removes
=============  ==================  ==============================================================================
``layer``      ``(l,)``            the whole block: its output becomes its input (plus the mean update, mean mode)
``attention``  ``(l,)``            the attention sub-block's contribution to the residual stream
``head``       ``(l, h)``          query head ``h``: its slice of ``o_proj``'s input
``kv_group``   ``(l, g)``          every query head sharing kv head ``g`` (what a GQA pruner can remove)
``ffn``        ``(l,)``            the MLP sub-block's contribution to the residual stream
``neuron``     ``(l, n)``          FFN unit ``n``: column ``n`` of ``down_proj``'s input
=============  ==================  ==============================================================================

A sub-block's "contribution" is taken where it enters the residual stream: after Gemma's post-attention /
post-feedforward norm when the layer has those sandwich norms, else at the attention / MLP module output.
"""

from dataclasses import dataclass

from torch import nn

UNIT_KINDS = ("layer", "attention", "head", "kv_group", "ffn", "neuron")
BLOCK_KINDS = ("layer", "attention", "ffn")
FINE_KINDS = ("head", "neuron")


@dataclass
class LayerUnits:
    """One decoder layer: its modules and widths (``attn``/``mlp`` are None when the layer has none)."""

    index: int
    layer: nn.Module
    attn: nn.Module | None
    mlp: nn.Module | None
    attn_out: nn.Module | None  # the module whose output is the attention contribution to the residual
    ffn_out: nn.Module | None  # likewise for the MLP
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    ffn_size: int = 0

    @property
    def group_size(self):
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


class DecoderUnits:
    """The layers of one decoder stack, addressed by index, with the model's forward arguments (``tower=`` for Nexus).

    ``forward_kwargs`` must be passed to every forward of ``model`` so the localised tower is the one that runs.
    """

    def __init__(self, model, tower=None):
        self.model = model
        self.is_nexus = getattr(model.config, "model_type", None) == "nexus"
        self.forward_kwargs = {}
        base = getattr(model, "model", None)
        if self.is_nexus:
            towers = base.towers
            index = base.tower_index_for(tower=tower) if tower is not None else 0
            if tower is None and len(towers) > 1:
                raise ValueError(
                    f"this Nexus model has {len(towers)} towers; say which to localise (tower: index or name)")
            self.tower_index = index
            self.tower_name = towers[index].name
            self.forward_kwargs = {"tower": index}
            layers = towers[index].layers
            self.hidden_size = towers[index].spec["hidden_size"]
        else:
            if tower is not None:
                raise ValueError(f"tower={tower!r} only applies to a Nexus model; this is {model.config.model_type!r}")
            layers = getattr(base, "layers", None)
            if layers is None:
                raise ValueError(
                    f"cannot find the decoder layers of a {type(model).__name__} (expected model.model.layers); "
                    "localisation supports HF Llama/Qwen/Gemma-3 decoders and NexusForCausalLM")
            self.tower_index, self.tower_name = None, None
            self.hidden_size = model.config.get_text_config().hidden_size
        self.layers = [self._describe(i, layer) for i, layer in enumerate(layers)]

    @staticmethod
    def _describe(i, layer):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        sandwich = getattr(layer, "post_feedforward_layernorm", None) is not None
        info = LayerUnits(i, layer, attn, mlp, None, None)
        if attn is not None:
            head_dim = getattr(attn, "head_dim", None)
            if not head_dim:
                raise ValueError(f"layer {i}: the attention module has no head_dim attribute")
            info.head_dim = int(head_dim)
            info.num_heads = attn.o_proj.in_features // info.head_dim
            info.num_kv_heads = attn.k_proj.out_features // info.head_dim
            info.attn_out = layer.post_attention_layernorm if sandwich else attn
        if mlp is not None:
            info.ffn_size = mlp.down_proj.in_features
            info.ffn_out = layer.post_feedforward_layernorm if sandwich else mlp
        return info

    def __len__(self):
        return len(self.layers)

    # --------------------------------------------------------------------------------------------- enumeration
    def units(self, kind, layers=None):
        """Every unit id of ``kind`` (optionally only in ``layers``), in layer order."""
        keep = set(range(len(self.layers))) if layers is None else set(layers)
        out = []
        for info in self.layers:
            if info.index not in keep:
                continue
            if kind == "layer" or kind == "attention" and info.attn is not None or kind == "ffn" and info.mlp is not None:
                out.append((info.index,))
            elif kind == "head":
                out.extend((info.index, h) for h in range(info.num_heads))
            elif kind == "kv_group":
                out.extend((info.index, g) for g in range(info.num_kv_heads))
            elif kind == "neuron":
                out.extend((info.index, n) for n in range(info.ffn_size))
            elif kind not in UNIT_KINDS:
                raise ValueError(f"unknown unit kind {kind!r}; kinds: {', '.join(UNIT_KINDS)}")
        return out

    def count(self, kind):
        return len(self.units(kind))

    def widths(self, kind):
        """Per layer, how many units of a fine kind it has (``head``/``neuron``/``kv_group``)."""
        attr = {"head": "num_heads", "neuron": "ffn_size", "kv_group": "num_kv_heads"}[kind]
        return [getattr(info, attr) for info in self.layers]

    def heads_of(self, kind, unit):
        """The query heads a ``head`` or ``kv_group`` unit covers: ``(layer, [heads])``."""
        layer, index = unit
        if kind == "head":
            return layer, [index]
        size = self.layers[layer].group_size
        return layer, list(range(index * size, (index + 1) * size))

    def validate(self, kind, unit):
        """Raise a ValueError naming the unit when it does not exist in this model."""
        if kind not in UNIT_KINDS:
            raise ValueError(f"unknown unit kind {kind!r}; kinds: {', '.join(UNIT_KINDS)}")
        unit = tuple(int(u) for u in unit)
        if not 0 <= unit[0] < len(self.layers):
            raise ValueError(f"{kind} {unit}: layer {unit[0]} out of range (the model has {len(self.layers)})")
        info = self.layers[unit[0]]
        limits = {"layer": None, "attention": None, "ffn": None, "head": info.num_heads,
                  "kv_group": info.num_kv_heads, "neuron": info.ffn_size}
        if kind == "attention" and info.attn is None or kind == "ffn" and info.mlp is None:
            raise ValueError(f"{kind} {unit}: layer {unit[0]} has no {kind} block")
        limit = limits[kind]
        if limit is not None and (len(unit) != 2 or not 0 <= unit[1] < limit):
            raise ValueError(f"{kind} {unit}: index out of range (layer {unit[0]} has {limit})")
        return unit

    # --------------------------------------------------------------------------------------------- weights
    def write_vectors(self, kind, unit):
        """The residual-space directions a fine unit writes along: (rows, hidden) float32.

        A neuron writes along its ``down_proj`` column; a head along the ``head_dim`` columns of its ``o_proj`` block.
        """
        layer, index = unit
        info = self.layers[layer]
        if kind == "neuron":
            return info.mlp.down_proj.weight[:, index].detach().float()[None, :]
        if kind == "head":
            hd = info.head_dim
            return info.attn.o_proj.weight[:, index * hd:(index + 1) * hd].detach().float().T
        raise ValueError(f"write vectors exist for heads and neurons, not {kind!r}")

    def read_vectors(self, kind, unit):
        """The residual-space directions a fine unit reads: a neuron's ``gate_proj`` (or ``up_proj``) row, a head's
        ``q_proj`` rows. (rows, hidden) float32."""
        layer, index = unit
        info = self.layers[layer]
        if kind == "neuron":
            proj = getattr(info.mlp, "gate_proj", None) or info.mlp.up_proj
            return proj.weight[index].detach().float()[None, :]
        if kind == "head":
            hd = info.head_dim
            return info.attn.q_proj.weight[index * hd:(index + 1) * hd].detach().float()
        raise ValueError(f"read vectors exist for heads and neurons, not {kind!r}")
