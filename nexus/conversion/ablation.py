"""Ablate units of a loaded model with forward hooks: nothing is written to the weights, and leaving the context
restores the model exactly.

Two modes:

- ``"mean"`` (the default in NEXUS): the unit's output is replaced by its mean over a reference set of tokens
  (`record_means`: every real token of every capability's items). The rest of the network then sees a typical value
  instead of an out-of-distribution zero, so a drop measures the information the unit carries, not the shock of
  removing its average contribution (Wang et al. 2022, "Interpretability in the Wild", mean-ablation).
- ``"zero"``: the unit's output is set to zero (a skipped layer, a removed head or neuron): what structured pruning does.

Where each unit is cut is documented in `decoder_units` (heads at ``o_proj``'s input, neurons at ``down_proj``'s input,
blocks where they enter the residual stream, a layer by replacing its output with its input).
"""

import contextlib
from dataclasses import dataclass, field

import torch

ABLATION_MODES = ("mean", "zero")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _layer_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


# -------------------------------------------------------------------------------------------------------- means


@dataclass
class UnitMeans:
    """Per layer, the mean (float32) at every cut point, over the tokens `record_means` saw."""

    layer_delta: dict = field(default_factory=dict)  # l -> (hidden,) mean of (layer output - layer input)
    attn_out: dict = field(default_factory=dict)  # l -> (hidden,)
    ffn_out: dict = field(default_factory=dict)  # l -> (hidden,)
    head_in: dict = field(default_factory=dict)  # l -> (num_heads * head_dim,) mean of o_proj's input
    neuron_in: dict = field(default_factory=dict)  # l -> (ffn_size,) mean of down_proj's input
    tokens: int = 0


class MeanRecorder:
    """Hooks that sum every cut point's value over the real tokens of each forward; `means()` divides.

    Set ``recorder.mask`` ((B, T) bool, True on real tokens) before each forward.
    """

    def __init__(self, units):
        self.units = units
        self.mask = None
        self._sums = {}
        self._tokens = 0
        self._handles = []

    def _add(self, key, value):
        x = value[self.mask].float().sum(0)  # (D,)
        self._sums[key] = self._sums.get(key, 0) + x

    def __enter__(self):
        for info in self.units.layers:
            l = info.index

            def layer_hook(module, args, kwargs, output, l=l):
                self._add(("layer_delta", l), _first(output) - _layer_input(args, kwargs))

            self._handles.append(info.layer.register_forward_hook(layer_hook, with_kwargs=True))
            if info.attn is not None:
                self._handles.append(info.attn_out.register_forward_hook(
                    lambda m, a, out, l=l: self._add(("attn_out", l), _first(out))))
                self._handles.append(info.attn.o_proj.register_forward_pre_hook(
                    lambda m, a, l=l: self._add(("head_in", l), a[0])))
            if info.mlp is not None:
                self._handles.append(info.ffn_out.register_forward_hook(
                    lambda m, a, out, l=l: self._add(("ffn_out", l), _first(out))))
                self._handles.append(info.mlp.down_proj.register_forward_pre_hook(
                    lambda m, a, l=l: self._add(("neuron_in", l), a[0])))
        return self

    def count(self, mask):
        self.mask = mask
        self._tokens += int(mask.sum())

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def means(self):
        if not self._tokens:
            raise ValueError("record_means saw no tokens: nothing to average")
        out = UnitMeans(tokens=self._tokens)
        for (name, l), total in self._sums.items():
            getattr(out, name)[l] = total / self._tokens
        return out


# ------------------------------------------------------------------------------------------------------ ablation


def _column_hook(columns, values):
    """A forward pre-hook that overwrites ``columns`` of the module's input with ``values`` (zeros or means)."""
    columns = torch.as_tensor(sorted(columns), dtype=torch.long)

    def hook(module, args):
        x = args[0].clone()
        x[..., columns] = values.to(x.dtype) if values is not None else 0
        return (x, *args[1:])

    return hook


def _output_hook(mean):
    def hook(module, args, output):
        out = _first(output)
        value = torch.zeros_like(out) if mean is None else mean.to(out.dtype).expand_as(out)
        return _replace_first(output, value)

    return hook


def _skip_hook(mean):
    def hook(module, args, kwargs, output):
        x = _layer_input(args, kwargs)
        value = x if mean is None else x + mean.to(x.dtype)
        return _replace_first(output, value)

    return hook


def normalise_selection(units, selection):
    """``{kind: [unit, ...]}`` with every unit validated against the model and turned into a tuple of ints."""
    out = {}
    for kind, members in (selection or {}).items():
        out[kind] = [units.validate(kind, u) for u in members]
    return out


@contextlib.contextmanager
def ablate(units, selection, mode="mean", means=None):
    """Inside the context, every unit in ``selection`` (``{kind: [unit ids]}``, see `decoder_units`) is ablated.

    ``mode="mean"`` needs the `UnitMeans` from `record_means`. Hooks are removed on exit, even on an error.
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"ablation mode {mode!r} is not one of {', '.join(ABLATION_MODES)}")
    if mode == "mean" and means is None:
        raise ValueError("mean ablation needs the unit means (record them first with MeanRecorder)")
    selection = normalise_selection(units, selection)
    head_cols, neuron_cols = {}, {}
    handles = []
    try:
        for kind, members in selection.items():
            for unit in members:
                l = unit[0]
                info = units.layers[l]
                if kind == "layer":
                    mean = means.layer_delta[l] if mode == "mean" else None
                    handles.append(info.layer.register_forward_hook(_skip_hook(mean), with_kwargs=True))
                elif kind == "attention":
                    mean = means.attn_out[l] if mode == "mean" else None
                    handles.append(info.attn_out.register_forward_hook(_output_hook(mean)))
                elif kind == "ffn":
                    mean = means.ffn_out[l] if mode == "mean" else None
                    handles.append(info.ffn_out.register_forward_hook(_output_hook(mean)))
                elif kind in ("head", "kv_group"):
                    _, heads = units.heads_of(kind, unit)
                    hd = info.head_dim
                    head_cols.setdefault(l, set()).update(c for h in heads for c in range(h * hd, (h + 1) * hd))
                elif kind == "neuron":
                    neuron_cols.setdefault(l, set()).add(unit[1])
        for l, cols in head_cols.items():
            values = means.head_in[l][sorted(cols)] if mode == "mean" else None
            handles.append(units.layers[l].attn.o_proj.register_forward_pre_hook(_column_hook(cols, values)))
        for l, cols in neuron_cols.items():
            values = means.neuron_in[l][sorted(cols)] if mode == "mean" else None
            handles.append(units.layers[l].mlp.down_proj.register_forward_pre_hook(_column_hook(cols, values)))
        yield
    finally:
        for h in handles:
            h.remove()
