"""The memory planner: analytic counts equal built models, the planned KV cache equals a measured one, the plan needs
no weights, and a plan over budget is refused with its numbers."""

import shutil

import pytest
import torch
from conftest import FAMILIES, _COMMON, char_tokenizer, tiny_teacher
from transformers import (AutoConfig, DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from nexus.conversion.memory_plan import (DEFAULT_FINAL_BUDGET_BYTES, MemoryPlanError, check_plan, dtype_bytes,
                                          forward_activation_bytes, hf_parameter_count, kv_cache_bytes,
                                          meta_parameter_count, plan_final_model, plan_stage, teacher_weight_bytes)
from nexus.conversion.structured_prune import PrunePlan, TowerPlan, apply_prune_plan
from nexus.modeling_nexus.modeling_nexus import CACHE_FIELD
from nexus.conversion.teacher_import import nexus_from_teacher


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _built_count(model):
    return sum(p.numel() for p in model.parameters())


def _variants():
    yield from ((f, tiny_teacher(f)) for f in FAMILIES)
    yield "llama+biases", LlamaForCausalLM(LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True,
                                                       tie_word_embeddings=True))
    yield "qwen3+bias+untied", Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=12, attention_bias=True,
                                                            tie_word_embeddings=False))


@pytest.mark.parametrize("name,model", list(_variants()), ids=lambda v: v if isinstance(v, str) else "")
def test_analytic_parameter_count_equals_the_built_model(name, model):
    counts = hf_parameter_count(model.config)
    assert counts["total"] == _built_count(model), name
    assert counts["embedding"] == model.config.vocab_size * model.config.hidden_size * (
        1 if model.config.tie_word_embeddings else 2)
    assert teacher_weight_bytes(model.config, "bf16") == sum(
        p.numel() * p.element_size() for p in model.to(torch.bfloat16).parameters())


def test_other_architectures_are_counted_on_the_meta_device():
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=97)
    assert hf_parameter_count(config)["total"] == meta_parameter_count(config)["total"] == _built_count(
        GPT2LMHeadModel(config))


def _cache_bytes(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def _pruned_irregular(model):
    """Irregular per-layer widths: layer 0 keeps 1 kv group (2 heads), layer 1 loses its attention entirely."""
    plan = PrunePlan(towers={0: TowerPlan(heads={0: [0, 1], 1: []}, neurons={})})
    pruned, _ = apply_prune_plan(model, plan)
    return pruned


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prune", [False, True], ids=["full", "pruned"])
def test_planned_kv_cache_equals_the_measured_dynamic_cache(family, prune):
    model = nexus_from_teacher(tiny_teacher(family))
    if prune:
        model = _pruned_irregular(model)
        assert model.config.towers[0]["layers"][1]["num_attention_heads"] == 0
    prompt, new = 7, 6
    ids = torch.randint(6, 97, (2, prompt), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    context = prompt + new - 1  # the last generated token is never fed back
    cache = getattr(out, CACHE_FIELD)  # (``cache`` or ``past_key_values``, by the installed transformers)
    assert cache.get_seq_length() == context
    planned = kv_cache_bytes(model.config, context, batch=2, dtype=torch.float32)
    assert planned == _cache_bytes(cache)


def test_sliding_windows_are_respected_when_the_cache_trims_them():
    """HF's own Gemma 3 cache keeps only the window on sliding layers; the plan with sliding_cache=True matches it
    (minus the Nexus routing record), and is smaller than the untrimmed plan once the context exceeds the window."""
    teacher = tiny_teacher("gemma3")
    nexus = nexus_from_teacher(teacher)
    ids = torch.randint(6, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = getattr(teacher(ids, use_cache=True, **{CACHE_FIELD: DynamicCache(config=teacher.config)}), CACHE_FIELD)
    record = 2 * 1 * 9 * 4
    trimmed = kv_cache_bytes(nexus.config, 9, batch=1, dtype="fp32", sliding_cache=True)
    assert trimmed - record == _cache_bytes(cache)
    full = kv_cache_bytes(nexus.config, 9, batch=1, dtype="fp32", sliding_cache=False)
    per_token_layer = 2 * 2 * 8 * 4  # k and v, 2 kv heads, head_dim 8, fp32
    assert full - trimmed == 2 * (9 - 3) * per_token_layer  # two sliding layers keep 3 tokens instead of 9


def test_forward_activation_logits_equal_the_measured_logits_tensor(llama_dir):
    model = tiny_teacher("llama").to(torch.bfloat16)
    ids = torch.randint(6, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    planned = forward_activation_bytes(model.config, 3, 11, torch.bfloat16)
    assert planned["logits"] == logits.numel() * logits.element_size()
    assert planned["total"] >= planned["logits"]


def test_plan_stage_needs_only_config_and_tokenizer_files(llama_dir, teacher_dir, tmp_path):
    family, folder = teacher_dir
    light = tmp_path / "no-weights"
    light.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(folder / name, light / name)
    assert not any(light.glob("*.safetensors"))
    plan = plan_stage([("big", light, "fp32", light)], batch=4, seq_len=32, runtime_bytes=100 * 2**20)
    config = AutoConfig.from_pretrained(light)
    c = plan["components"]
    assert plan["total_bytes"] == sum(c.values()) and plan["peak_teacher"] == "big"
    assert c["runtime"] == 100 * 2**20 and c["teacher_weights"] == hf_parameter_count(config)["total"] * 4
    assert c["tokenizer"] == int((light / "tokenizer.json").stat().st_size * 10.2)
    assert c["activations"] == forward_activation_bytes(config, 4, 32, "fp32")["total"]


def test_plan_stage_peak_is_the_largest_teacher_alone(llama_dir, tmp_path):
    wide = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(**{**_COMMON, "intermediate_size": 512})).save_pretrained(wide)
    char_tokenizer().save_pretrained(wide)
    plan = plan_stage([("small", llama_dir, "bf16", llama_dir), ("wide", wide, "bf16", wide)], batch=2,
                      seq_len=16, runtime_bytes=0)
    small, big = (plan["per_teacher"][n]["total_bytes"] for n in ("small", "wide"))
    assert plan["peak_teacher"] == "wide" and plan["total_bytes"] == big > small
    assert plan["total_bytes"] < small + big  # one teacher resident at a time: the peaks do not add up


def test_plan_refuses_a_folder_without_config_or_tokenizer(llama_dir, tmp_path):
    with pytest.raises(MemoryPlanError, match=f"{tmp_path}: no config.json"):
        plan_stage([("t", tmp_path, "bf16", None)])
    with pytest.raises(MemoryPlanError, match=f"no tokenizer.json, tokenizer.model or vocab.json in {tmp_path}"):
        plan_stage([("t", llama_dir, "bf16", tmp_path)])
    with pytest.raises(MemoryPlanError, match="unknown dtype 'fp8'"):
        dtype_bytes("fp8")


def test_final_model_plan_components_and_over_budget_refusal_carries_the_numbers():
    model = nexus_from_teacher(tiny_teacher("gemma3"))
    plan = plan_final_model(model.config, context=64)
    c = plan["components"]
    assert c["weights"] == sum(p.numel() for p in model.parameters()) * dtype_bytes("bf16")
    assert c["kv_cache"] == kv_cache_bytes(model.config, 64, 1, "bf16")
    assert c["prefill_attention_mask"] == 64 * 64 * 3  # windowed layers (4 < 64): bool mask + its bf16 copy
    assert plan["total_bytes"] == sum(c.values())
    assert check_plan(plan) is plan and DEFAULT_FINAL_BUDGET_BYTES == 16 * 2**30
    budget = plan["total_bytes"] - 1
    with pytest.raises(MemoryPlanError) as info:
        check_plan(plan, budget)
    message = str(info.value)
    assert f"({plan['total_bytes']:,} bytes) exceeds the budget" in message
    assert f"({budget:,} bytes)" in message and "GPU memory" in message and "stage final_model" in message
    for name in c:
        assert name in message
    with pytest.raises(MemoryPlanError, match="budget must be positive"):
        check_plan(plan, 0)


def test_a_long_context_on_a_gemma_sized_student_is_dominated_by_kv_and_mask():
    """Gemma-3-270M's shapes (config only, nothing built): at 32k tokens the plan still fits 16 GiB, at 128k it does
    not, and the refusal names the kv cache and the mask."""
    from transformers import Gemma3TextConfig

    from nexus.conversion.teacher_families import nexus_config_kwargs
    from nexus.modeling_nexus import NexusConfig

    hf = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                          query_pre_attn_scalar=256)
    config = NexusConfig(**nexus_config_kwargs(hf, name="gemma"))
    ok = check_plan(plan_final_model(config, context=32768))
    assert ok["components"]["weights"] == hf_parameter_count(hf)["total"] * 2
    with pytest.raises(MemoryPlanError, match=r"kv_cache .*MiB.*prefill_attention_mask|prefill_attention_mask .*kv_cache"):
        check_plan(plan_final_model(config, context=131072))


def test_the_teacher_cache_head_is_planned_over_position_slices(monkeypatch):
    """The teacher cache runs the head over full-vocabulary rows, FULL_LOGIT_BUDGET // V positions at a time: the plan
    counts those rows (the head's output, its fp32 copy and two temporaries), not the probes' vocabulary slices, and
    never more rows than the batch has positions."""
    from nexus.conversion.probes import token_scores

    config = LlamaConfig(**{**_COMMON, "vocab_size": 1000})
    monkeypatch.setattr(token_scores, "FULL_LOGIT_BUDGET", 10 * 1000)  # 10 positions per slice
    sliced = forward_activation_bytes(config, 4, 50, "bf16", sliced_head=True, position_slices=True)
    assert sliced["logits"] == 3 * 10 * 1000 * 4 + 10 * 1000 * 2
    few = forward_activation_bytes(config, 1, 3, "fp32", sliced_head=True, position_slices=True)
    assert few["logits"] == 3 * 3 * 1000 * 4 + 3 * 1000 * 4
    vocab_slices = forward_activation_bytes(config, 4, 50, "bf16", sliced_head=True)
    assert vocab_slices["logits"] != sliced["logits"]
