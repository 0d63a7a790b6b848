"""Load an exported Nexus student quantised, by one of three paths, each with no extra arguments from the user.

| method | needs | what is quantised |
|---|---|---|
| ``bnb_int8`` | bitsandbytes | LLM.int8 (8-bit weights, fp16 activations with fp16 outliers) |
| ``bnb_nf4`` | bitsandbytes | NF4 4-bit weights, fp32 compute (bf16 packed kernel on an AVX512-BF16 CPU) |
| ``torchao_int8`` | torchao | int8 weight-only, per output channel (``Int8WeightOnlyConfig``) |

Every path goes through ``from_pretrained(..., quantization_config=...)``; the model's own ``_keep_in_fp32_modules``
keeps the router and the own-vocabulary towers' LM heads out of quantisation, and transformers' default skip keeps the
shared LM head out (see ``modeling_nexus.py``). torchao installs from PyPI without a GPU (``pip install torchao``), for
users without bitsandbytes. torchao's int4 weight-only path is not offered: with torchao 0.18 and torch 2.13 on a CPU
it failed to convert the weights here (its packed formats need bf16 weights and a CUDA or specific CPU kernel).

Example::

    from nexus.hub.quantised_load import load_quantised
    model = load_quantised("out/nexus-demo", "torchao_int8")
"""

METHODS = ("bnb_int8", "bnb_nf4", "torchao_int8")


def int8_weight_only_config():
    """transformers' ``TorchAoConfig`` for int8 weight-only quantisation (per output channel)."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def quantisation_config(method):
    """The ``quantization_config`` for ``method`` (one of `METHODS`); an unknown method lists the choices."""
    if method == "bnb_int8":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "bnb_nf4":
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.float32)
    if method == "torchao_int8":
        return int8_weight_only_config()
    raise ValueError(f"unknown quantisation method {method!r}; choose one of {', '.join(METHODS)}")


def load_quantised(folder, method, device_map="cpu", **kwargs):
    """``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` quantised by ``method``, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map=device_map,
                                                 quantization_config=quantisation_config(method), **kwargs)
    return model.eval()
