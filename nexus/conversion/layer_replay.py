"""Replay the unablated residual stream up to the first ablated layer, so an ablation pass computes only the layers
at and after it.

Ablating a unit in layer ``l`` cannot change what layers ``0..l-1`` compute, so during the unablated pass every layer's
output is kept per micro-batch, and during an ablation pass the layers before ``l`` return their kept output without
computing (their ``forward`` is swapped for a lookup; embedding, masks and the head still run). The result is exact,
and a sweep over every layer costs about half the decoder compute of plain re-running.
"""

import contextlib


class LayerReplay:
    def __init__(self, units):
        self.units = units
        self.outputs = {}  # (batch key, layer) -> the layer's output
        self.key = None

    def before_batch(self, batch, mask):
        self.key = tuple(batch)

    @contextlib.contextmanager
    def recording(self):
        """Keep every layer's output (detached) for the current micro-batch (set by `before_batch`)."""
        handles = []
        for info in self.units.layers:
            def hook(module, args, output, l=info.index):
                out = output[0] if isinstance(output, tuple) else output
                self.outputs[(self.key, l)] = out.detach()
            handles.append(info.layer.register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def replaying(self, first_layer):
        """Layers ``< first_layer`` return their recorded outputs instead of computing."""
        if first_layer <= 0 or not self.outputs:
            yield self
            return
        swapped = []
        try:
            for info in self.units.layers[:first_layer]:
                layer = info.layer

                def lookup(*args, l=info.index, **kwargs):
                    return self.outputs[(self.key, l)]

                layer.forward = lookup
                swapped.append(layer)
            yield self
        finally:
            for layer in swapped:
                del layer.forward  # back to the class's forward
