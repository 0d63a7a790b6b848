"""The manifold option's storage: projections kept as two factors (``ranks`` in a layer spec). A factored model has
exactly the parameters its config counts, computes what the dense rank-r reconstruction computes, saves and loads
through ``AutoModelForCausalLM`` (remote code), generates with a cache, and compress meets its budget with it."""

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_teacher
from test_compress import _capabilities
from test_distill_stage import two_teachers  # noqa: F401 (fixture)
from test_student_build_baselines import _build
from transformers import AutoModelForCausalLM

from nexus.conversion.budget import config_parameter_count
from nexus.conversion.compress import (
    CompressOptions,
    LowRankOptions,
    compress_model,
    write_compressed,
)
from nexus.conversion.low_rank import (
    fit_keep,
    input_covariances,
    low_rank_model,
    rank_for,
)
from nexus.conversion.structured_prune import parameter_count
from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.modeling_nexus import NexusConfig
from nexus.modeling_nexus.low_rank_linear import NexusLowRankLinear


def _ids():
    return torch.randint(6, 97, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_factored_model_matches_its_dense_reconstruction_and_its_config_count(family, tmp_path):
    model = nexus_from_teacher(tiny_teacher(family)).eval()
    covs = input_covariances(model, _ids(), autocast=False)
    dense, _ = low_rank_model(model, 0.4, "activation", covs, store="dense")
    factored, report = low_rank_model(model, 0.4, "activation", covs, store="factors")
    layer = factored.model.towers[0].layers[0]
    assert isinstance(layer.mlp.up_proj, NexusLowRankLinear) and isinstance(layer.self_attn.q_proj, NexusLowRankLinear)
    assert layer.mlp.up_proj.rank == rank_for(tuple(model.model.towers[0].layers[0].mlp.up_proj.weight.shape), 0.4)
    assert parameter_count(factored) == config_parameter_count(factored.config)["total"]
    saved = parameter_count(model) - parameter_count(factored)
    assert saved == report["dense_params"] - report["factored_params"] > 0
    assert "ranks" not in model.config.towers[0]["layers"][0]  # the input model is untouched
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(factored(ids).logits, dense(ids).logits, atol=1e-4)
    factored.save_pretrained(tmp_path / "f")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "f", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(loaded).__module__ != type(factored).__module__  # the checkpoint's own copy of the code
    assert parameter_count(loaded) == parameter_count(factored)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, factored(ids).logits, atol=1e-5)
        cached = loaded.generate(ids[:1], max_new_tokens=5, do_sample=False)
        uncached = loaded.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_bad_ranks_are_refused_with_the_field_named():
    base = nexus_from_teacher(tiny_teacher("llama")).config.to_dict()
    for ranks, needle in (({"w_proj": 3}, "unknown projection 'w_proj'"), ({"q_proj": 0}, "q_proj must be an integer"),
                          ({}, "non-empty dict")):
        cfg = {k: v for k, v in base.items() if k not in ("model_type", "transformers_version")}
        cfg["towers"][0]["layers"][1]["ranks"] = ranks
        with pytest.raises(ValueError, match="towers\\[0\\].layers\\[1\\].ranks") as err:
            NexusConfig(**cfg)
        assert needle in str(err.value)


def test_fit_keep_lands_within_the_target():
    model = nexus_from_teacher(tiny_teacher("llama"))
    total = parameter_count(model)
    target = total - 3000
    keep = fit_keep(model, target)
    factored, _ = low_rank_model(model, keep, "weight", store="factors")
    one_rank_everywhere = sum(m.in_features + m.out_features for m in factored.modules()
                              if isinstance(m, NexusLowRankLinear))  # the fit's granularity: one keep for all
    assert target - one_rank_everywhere < parameter_count(factored) <= target
    assert fit_keep(model, total) is None
    with pytest.raises(ValueError, match="rank 1"):
        fit_keep(model, 10)


def test_compress_with_factors_meets_the_budget_it_would_prune_to(tmp_path):
    model = nexus_from_teacher(tiny_teacher("llama"))
    kw = {"scorer": "capability", "allocation": "uniform", "budget": {"fraction": 0.5}, "calibration_tokens": 256,
          "window_tokens": 32}
    _, _, plain = compress_model(model, char_tokenizer(), _capabilities(), CompressOptions(**kw))
    student, tok, record = compress_model(model, char_tokenizer(), _capabilities(),
                                          CompressOptions(**kw, low_rank={"keep": 0.6, "method": "activation"}))
    budget = plain["budget"]["params"]
    assert record["budget"]["final"] == budget
    got = record["params"]["student"]["non_embedding"]
    assert budget - 400 < got <= budget and plain["params"]["student"]["non_embedding"] <= budget
    assert record["params"]["pruned"]["non_embedding"] > budget  # pruned less, then factorised down to the budget
    assert record["low_rank"]["store"] == "factors" and parameter_count(student) == record["params"]["student"]["total"]
    record = write_compressed(student, tok, record, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert parameter_count(loaded) == record["checkpoint"]["params"] == parameter_count(student)


def test_student_build_low_rank_keeps_the_budget_with_factored_towers(two_teachers, tmp_path):  # noqa: F811
    plain_model, plain = _build(two_teachers, tmp_path, "plain")
    model, record = _build(two_teachers, tmp_path, "manifold", low_rank=LowRankOptions(keep=0.7))
    assert record["budget"]["params"] == plain["budget"]["params"] and record["params"] <= record["budget"]["params"]
    assert parameter_count(model) == record["params"]
    factored = [t for t in record["towers"] if t.get("compress", {}).get("low_rank")]
    assert factored, "no tower was factorised"
    assert any(isinstance(m, NexusLowRankLinear) for m in model.modules())
    assert not any(isinstance(m, NexusLowRankLinear) for m in plain_model.modules())
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_lora_targets_the_factors_of_a_factored_model():
    peft = pytest.importorskip("peft")
    model = nexus_from_teacher(tiny_teacher("llama")).eval()
    factored, _ = low_rank_model(model, 0.5, "weight", store="factors")
    lora = peft.get_peft_model(factored, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["factor_a", "factor_b"],
                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".q_proj.factor_a.lora_A" in n for n in trainable) and any(".down_proj.factor_b.lora_B" in n
                                                                         for n in trainable)
    ids = _ids()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(8):
        loss = lora(input_ids=ids, labels=ids).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert lora(input_ids=ids, labels=ids).loss.item() < first


def test_lora_all_linear_reaches_every_factor_of_a_factored_model():
    """PEFT's ``target_modules="all-linear"`` finds the factors (they are nn.Linear); the router and head stay out."""
    peft = pytest.importorskip("peft")
    model = nexus_from_teacher(tiny_teacher("llama")).eval()
    factored, _ = low_rank_model(model, 0.5, "weight", store="factors")
    factors = {n for n, m in factored.named_modules() if n.endswith((".factor_a", ".factor_b"))}
    lora = peft.get_peft_model(factored, peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    wrapped = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for n, _ in lora.named_parameters() if ".lora_A." in n}
    assert factors and wrapped == factors


def test_standard_export_multiplies_the_factors_out(tmp_path):
    """A plain Llama has no factored layer: `nexus export --standard` writes B A as the dense weight, same logits."""
    from nexus.hub.standard_export import export_standard

    model = nexus_from_teacher(tiny_teacher("llama")).eval()
    factored, _ = low_rank_model(model, 0.5, "weight", store="factors")
    factored.save_pretrained(tmp_path / "s")
    char_tokenizer().save_pretrained(tmp_path / "s")
    export_standard(tmp_path / "s", tmp_path / "o")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, factored(ids).logits, atol=1e-5)
    notes = json.loads((tmp_path / "o" / "nexus_export.json").read_text())["notes"]
    assert any("21 factored projections" in n for n in notes)
