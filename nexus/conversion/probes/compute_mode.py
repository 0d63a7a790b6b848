"""How a resident teacher computes while it is scored: bf16 autocast, or fp32 matmuls over bf16-stored weights.

Teachers stay resident in bf16 (the memory rule), but bf16 matmuls are only fast on CPUs with native bf16 (AVX512-BF16
or AMX). On an AVX2-only CPU torch falls back to a slow path: measured on this project's 2-core AMD EPYC (AVX2), a
256x640 @ 640x2048 matmul took 175 ms in bf16 and 23 ms in fp32, and a Gemma-3-270M forward of 256 tokens took 19-23 s
in bf16 and 8 s with fp32 matmuls (under load from other jobs; see bench/profile_real.py).

Modes:
- ``bf16``: torch.autocast(bf16);
- ``fp32``: every ``nn.Linear`` casts its weight to fp32 for the matmul, one layer at a time (a very large layer, such
  as a 262k-token head, in slices of rows), so no full fp32 copy of the model ever exists;
- ``native``: the weights' own dtype, no autocast;
- ``auto``: ``bf16`` where the CPU multiplies bf16 natively, else ``fp32`` for bf16 weights, else ``native``.
"""

import contextlib
import os
import types

import torch
import torch.nn.functional as F

COMPUTE_MODES = ("auto", "bf16", "fp32", "native")
FORCE_ENV = "NEXUS_NATIVE_BF16"
ROW_SLICE_ELEMENTS = 16 * 1024 * 1024  # a weight bigger than this is cast (and multiplied) in slices of rows


def native_bf16_matmul() -> bool:
    """True when this CPU has native bf16 matmuls (oneDNN reports AVX512-BF16 / AMX support).

    ``NEXUS_NATIVE_BF16=0`` or ``1`` overrides the detection (everything ``auto`` then follows it: the probes'
    compute mode, the teacher cache, distillation's autocast, the memory plans), e.g. to get fp32 numbers on a bf16
    CPU; the test suite sets 0 so its tolerances do not depend on the machine it runs on.
    """
    forced = os.environ.get(FORCE_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{FORCE_ENV}={forced!r}: use 0 (no native bf16) or 1 (native bf16), or unset it")
        return forced == "1"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _low_precision(model) -> bool:
    return any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())


def resolve_compute(mode, model) -> str:
    """The concrete mode (``bf16``, ``fp32`` or ``native``) that ``mode`` means for ``model`` on this CPU."""
    if mode not in COMPUTE_MODES:
        raise ValueError(f"unknown compute mode {mode!r}; choose one of {', '.join(COMPUTE_MODES)}")
    if mode == "auto":
        if native_bf16_matmul():
            return "bf16"
        return "fp32" if _low_precision(model) else "native"
    if mode == "fp32" and not _low_precision(model):
        return "native"
    return mode


def _fp32_linear(self, x):
    """``nn.Linear.forward`` with the matmul in fp32 over the stored (bf16) weight."""
    x = x.float()
    weight, bias = self.weight, self.bias
    rows = max(1, ROW_SLICE_ELEMENTS // max(1, weight.shape[1]))
    if weight.shape[0] <= rows:
        return F.linear(x, weight.float(), None if bias is None else bias.float())
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, weight.shape[0], rows):
        end = min(start + rows, weight.shape[0])
        out[..., start:end] = F.linear(x, weight[start:end].float(), None if bias is None else bias[start:end].float())
    return out


@contextlib.contextmanager
def compute_context(model, mode="auto"):
    """Inference mode plus the compute ``mode``; yields the resolved mode. Patched layers are restored on exit."""
    resolved = resolve_compute(mode, model)
    patched = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if resolved == "bf16":
            device = next(model.parameters()).device.type
            stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
        elif resolved == "fp32":
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    patched.append((module, module.__dict__.get("forward")))
                    module.forward = types.MethodType(_fp32_linear, module)
        try:
            yield resolved
        finally:
            for module, previous in patched:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
