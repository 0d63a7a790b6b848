"""Quantised loading of a two-tower student with irregular widths: bitsandbytes 8-bit and 4-bit and torchao int8
weight-only load with no extra arguments, keep the router (and the LM heads) out of quantisation, and route exactly as
the fp32 model does, in a forward and through ``generate``.

The tiny student has a shared-vocabulary tower and an own-vocabulary tower, a 16-wide k/v projection and a 40-wide MLP
(not multiples of the 32-wide block of bitsandbytes' packed bf16 CPU kernel), and a router whose weights are scaled up
so that a prompt set splits between the towers.
"""

import warnings

import pytest
import torch

from nexus.modeling_nexus import NexusConfig, NexusForCausalLM

VOCAB, HIDDEN = 128, 64
IRREGULAR = [
    {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 40},
    {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 24, "intermediate_size": 96},
]


def two_tower_student(seed=0):
    torch.manual_seed(seed)
    config = NexusConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN,
        towers=[
            {"type": "decoder", "name": "prose", "capabilities": ["prose"], "layers": IRREGULAR},
            {"type": "decoder", "name": "arith", "capabilities": ["arithmetic"], "hidden_size": 48,
             "vocabulary": "own", "layers": IRREGULAR[::-1]},
        ],
    )
    model = NexusForCausalLM(config)
    with torch.no_grad():
        model.model.router.proj.weight.mul_(200.0)  # a decisive router: quantising it would flip close calls
    return model.eval()


PROMPTS = torch.randint(0, VOCAB, (12, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_tower")
    model = two_tower_student()
    model.save_pretrained(folder)
    with torch.no_grad():
        routes = model(PROMPTS).tower_index
    assert 0 < routes.sum() < len(routes), f"the prompts must use both towers, got {routes.tolist()}"
    return folder, routes


def _generate_routes(model, ids):
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
    cache = out.get("past_key_values") or out.get("cache")
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + 4)
    return cache.layers[0].keys[:, 0, 0, 0].round().long()  # the routing record in cache slot 0


def _bnb_config(kind):
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_bitsandbytes_loads_generates_and_routes_as_fp32(student_dir, kind):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    folder, fp32_routes = student_dir
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map="cpu",
                                                 quantization_config=_bnb_config(kind))
    quantised_cls = bnb.nn.Linear8bitLt if kind == "8bit" else bnb.nn.Linear4bit
    quantised = {n for n, m in model.named_modules() if isinstance(m, quantised_cls)}
    assert "model.towers.0.layers.0.self_attn.k_proj" in quantised and len(quantised) > 10, sorted(quantised)
    for kept in ("model.router.proj", "lm_head", "model.towers.1.lm_head"):
        module = model.get_submodule(kept)
        assert type(module) is torch.nn.Linear and module.weight.dtype.is_floating_point, (kept, type(module))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", UserWarning)  # LLM.int8's "inputs will be cast from float32 to float16"
        out = model(PROMPTS)
        assert torch.isfinite(out.logits).all()
        assert torch.equal(out.tower_index, fp32_routes), (out.tower_index.tolist(), fp32_routes.tolist())
        assert torch.equal(_generate_routes(model, PROMPTS), fp32_routes)


def test_4bit_irregular_widths_do_not_reach_the_packed_kernel(student_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    folder, _ = student_dir
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map="cpu",
                                                 quantization_config=_bnb_config("4bit"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    irregular = {n for n, m in linears.items() if m.out_features % 32 or m.in_features % 64}
    assert "model.towers.0.layers.0.self_attn.k_proj" in irregular  # 16 wide
    assert all(not linears[n].support_avx512bf16_for_cpu for n in irregular)
    with torch.no_grad():
        model(PROMPTS)  # the packed kernel would raise "N must be divisible by block_n" here
    assert not any(getattr(linears[n].weight.quant_state, "packing_format_for_cpu", False) for n in irregular)


def test_torchao_int8_weight_only_routes_as_fp32(student_dir):
    pytest.importorskip("torchao")
    from nexus.hub.quantised_load import int8_weight_only_config
    from transformers import AutoModelForCausalLM

    folder, fp32_routes = student_dir
    reference = NexusForCausalLM.from_pretrained(folder).eval()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map="cpu",
                                                 quantization_config=int8_weight_only_config())
    q_proj = model.get_submodule("model.towers.0.layers.0.self_attn.q_proj").weight
    assert getattr(q_proj, "qdata", torch.empty(0)).dtype == torch.int8, type(q_proj)  # torchao's Int8Tensor
    for kept in ("model.router.proj", "lm_head", "model.towers.1.lm_head"):
        assert type(model.get_submodule(kept).weight) is torch.nn.Parameter, kept
    with torch.no_grad():
        out, expected = model(PROMPTS), reference(PROMPTS)
    assert torch.equal(out.tower_index, fp32_routes)
    err = ((out.logits - expected.logits).norm() / expected.logits.norm()).item()
    assert err < 0.05, f"int8 weight-only logits are {err:.3f} (relative L2) from fp32"
    assert torch.equal(_generate_routes(model, PROMPTS), fp32_routes)
