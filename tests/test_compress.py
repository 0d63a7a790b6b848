"""Compression: budgets are met, scorers differ, every scorer yields a checkpoint that loads and matches compress.json,
dynamic vs uniform widths, capability weights, low-rank factorisation, bad budgets, and the `nexus compress` CLI."""

import json

import pytest
import torch
import yaml
from conftest import FAMILIES, char_tokenizer, tiny_teacher
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.budget import (AllocationOptions, Budget, BudgetError, allocate, config_parameter_count,
                                     layer_parameter_count, resolve_budget)
from nexus.conversion.compress import Capability, CompressOptions, compress_model, write_compressed
from nexus.conversion.corpora import corpus_text
from nexus.conversion.decoder_units import DecoderUnits
from nexus.conversion.importance import SCORERS, StructureScores, make_scorer
from nexus.conversion.low_rank import factorise, input_covariances, low_rank_model, output_error, rank_for
from nexus.conversion.structure_statistics import collect_structure_statistics
from nexus.conversion.structured_prune import PrunePlan, TowerPlan, apply_prune_plan, parameter_count
from nexus.conversion.teacher_import import nexus_from_teacher


def _capabilities():
    return [Capability("prose", corpus_text("prose", "train")[:2500], 1.0, "prose"),
            Capability("code", corpus_text("code", "train")[:2500], 2.0, "code")]


def _options(scorer, **kw):
    return CompressOptions(scorer=scorer, budget={"fraction": 0.5}, calibration_tokens=256, window_tokens=32, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_parameter_count_equals_the_built_model(family):
    model = nexus_from_teacher(tiny_teacher(family))
    assert config_parameter_count(model.config)["total"] == parameter_count(model)
    plan = PrunePlan(towers={0: TowerPlan(heads={0: [0, 1], 2: []}, neurons={1: [3, 4, 5]})}, hidden_channels=list(range(20)),
                     vocab=list(range(50)))
    pruned, _ = apply_prune_plan(model, plan)
    assert config_parameter_count(pruned.config)["total"] == parameter_count(pruned)


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_each_scorer_meets_the_budget_and_writes_a_checkpoint_matching_compress_json(scorer, tmp_path):
    model = nexus_from_teacher(tiny_teacher("llama"))
    teacher = config_parameter_count(model.config)
    student, tok, record = compress_model(model, char_tokenizer(), _capabilities(), _options(scorer))
    budget = record["budget"]["params"]
    assert budget == int(0.5 * teacher["non_embedding"])
    got = record["params"]["student"]["non_embedding"]
    per_unit = layer_parameter_count(model.config.towers[0], 32, 0, 0, 0, 1)  # one FFN unit with its norm
    assert got <= budget
    if "dynamic" in record["allocation"]:
        assert got > budget - per_unit  # dynamic allocation fills the budget to within one FFN unit
    assert record["vocab"]["kept"] < record["vocab"]["original_size"]  # the char vocabulary lost unused characters
    record = write_compressed(student, tok, record, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert on_disk["params"]["student"]["total"] == record["params"]["student"]["total"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert parameter_count(loaded) == on_disk["params"]["student"]["total"] == on_disk["checkpoint"]["params"]
    raw = on_disk["params"]["student"]["total"] * 4  # fp32
    assert raw <= on_disk["checkpoint"]["safetensors_bytes"] < raw + 64 * 1024  # plus the safetensors header
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "def f(x):\n    return x"
    ids = torch.tensor([loaded_tok(text)["input_ids"]])
    assert loaded_tok.decode(ids[0], skip_special_tokens=True) == text
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all() and loaded(ids).logits.shape[-1] == len(loaded_tok)


def test_scorers_keep_different_structures_and_allocations_differ():
    kept = {}
    for scorer in sorted(SCORERS):
        model = nexus_from_teacher(tiny_teacher("llama"))
        allocation = "dynamic" if scorer == "capability" else None
        _, _, record = compress_model(model, char_tokenizer(), _capabilities(), _options(scorer, allocation=allocation))
        kept[scorer] = record["kept"]["layers"]
    neuron_sets = {s: tuple(tuple(l["neurons"]) for l in layers) for s, layers in kept.items()}
    assert len(set(neuron_sets.values())) == len(neuron_sets)  # every scorer keeps a different set
    uniform = [l["ffn"] for l in kept["minitron"]]
    assert len(set(uniform)) == 1  # Minitron: the same width in every layer
    assert len({l["ffn"] for l in kept["capability"]}) > 1  # dynamic: widths follow importance


def test_auto_allocation_keeps_the_candidate_with_the_lowest_held_aside_loss():
    from nexus.conversion.compress import calibration_loss

    model = nexus_from_teacher(tiny_teacher("gemma3"))
    tok = char_tokenizer()
    student, _, record = compress_model(model, tok, _capabilities(),
                                        _options("capability", selection_tokens=128, select_mix=False))
    report = record["allocation_candidates"]
    losses = {c["allocation"]: c["loss"] for c in report["candidates"]}
    assert len(losses) == 4 and "uniform" in losses and report["chosen"] == min(losses, key=losses.get)
    assert record["allocation"] == f"auto -> {report['chosen']}" and "scorer_mix" not in record
    widths = {l["ffn"] for l in record["kept"]["layers"]}
    assert (len(widths) == 1) == (report["chosen"] == "uniform")
    caps = _capabilities()
    vocab = student.config.vocab_size
    windows = {c.name: torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(i))
               for i, c in enumerate(caps)}
    total, per_cap = calibration_loss(student, windows, {"prose": 1.0, "code": 3.0})
    assert total == pytest.approx((per_cap["prose"] + 3 * per_cap["code"]) / 4)


def test_capability_weights_select_which_statistics_count():
    model = nexus_from_teacher(tiny_teacher("gemma3"))
    units = DecoderUnits(model)
    windows = {"a": torch.randint(6, 40, (3, 20), generator=torch.Generator().manual_seed(0)),
               "b": torch.randint(40, 97, (3, 20), generator=torch.Generator().manual_seed(1))}
    stats = {c: collect_structure_statistics(model, w, autocast=False) for c, w in windows.items()}
    scorer = make_scorer("capability")
    only_a = scorer.score(units, {"a": stats["a"]})
    weighted_a = scorer.score(units, stats, {"a": 1.0, "b": 0.0})
    weighted_b = scorer.score(units, stats, {"a": 0.0, "b": 1.0})
    for l in range(3):
        assert torch.allclose(only_a.neurons[l], weighted_a.neurons[l])
        assert not torch.allclose(weighted_a.neurons[l], weighted_b.neurons[l])
    assert stats["a"].neuron_taylor[0].shape == (48,) and stats["a"].head_taylor[0].shape == (4,)
    with pytest.raises(ValueError, match="gradient statistics"):
        no_grad = {"a": collect_structure_statistics(model, windows["a"], gradients=False, autocast=False)}
        scorer.score(units, no_grad)


def test_a_layer_whose_heads_all_go_loses_its_attention_and_says_so():
    model = nexus_from_teacher(tiny_teacher("llama"))
    units = DecoderUnits(model)
    scores = StructureScores(heads=[torch.zeros(4), torch.ones(4), torch.ones(4)],
                             neurons=[torch.ones(48) for _ in range(3)], layers=torch.ones(3), hidden=torch.ones(32))
    total = config_parameter_count(model.config)["non_embedding"]
    alloc = allocate(model.config, scores.check(units), Budget(int(0.5 * total)))
    pruned, notes = apply_prune_plan(model, alloc.plan)
    assert alloc.widths[0]["heads"] == [] and any("layers[0]: every head pruned" in n for n in notes)
    assert pruned.model.towers[0].layers[0].self_attn is None
    assert parameter_count(pruned) == alloc.params["total"] <= total + alloc.params["embedding"]


def test_hidden_channels_and_layers_can_be_pruned_too():
    model = nexus_from_teacher(tiny_teacher("qwen3"))
    student, _, record = compress_model(model, char_tokenizer(), _capabilities(),
                                        _options("capability", hidden_keep=0.75, drop_layers=1))
    assert student.config.hidden_size == 24 and len(record["kept"]["hidden_channels"]) == 24
    assert sum(l["dropped"] for l in record["kept"]["layers"]) == 1
    assert len(student.model.towers[0].layers) == 2
    assert record["params"]["student"]["non_embedding"] <= record["budget"]["params"]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(params=10**9), "larger than the teacher"),
    (dict(params=50), "smaller than the smallest model"),
    (dict(fraction=0.5, params=10), "exactly one"),
    (dict(fraction=1.5), r"fraction must be in \(0, 1\]"),
])
def test_bad_budgets_are_clear_errors(kwargs, needle):
    model = nexus_from_teacher(tiny_teacher("llama"))
    counts = config_parameter_count(model.config)
    scores = make_scorer("random").score(DecoderUnits(model))
    with pytest.raises(BudgetError, match=needle):
        allocate(model.config, scores, resolve_budget(teacher_counts=counts, **kwargs))


def test_uniform_allocation_needs_one_head_and_unit_per_layer():
    model = nexus_from_teacher(tiny_teacher("llama"))
    scores = make_scorer("random").score(DecoderUnits(model))
    fixed = config_parameter_count(model.config)["non_embedding"] - sum(
        layer_parameter_count(model.config.towers[0], 32, 4, 2, 8, 48) for _ in range(3))
    budget = Budget(fixed + 3 * layer_parameter_count(model.config.towers[0], 32, 0, 0, 0, 2))  # two units per layer
    allocate(model.config, scores, budget)  # dynamic: fine
    with pytest.raises(BudgetError, match="one head group and one FFN unit per layer"):
        allocate(model.config, scores, budget, AllocationOptions(allocation="uniform"))


def test_activation_aware_factorisation_beats_plain_svd_on_the_calibration_inputs():
    torch.manual_seed(0)
    w = torch.randn(24, 32)
    x = torch.randn(500, 32) @ torch.diag(torch.logspace(0, -2, 32))  # anisotropic inputs
    cov = x.T.double() @ x.double() / 500
    r = rank_for(w.shape, 0.4)
    b_w, a_w = factorise(w, r)
    b_a, a_a = factorise(w, r, cov, damping=1e-6)
    assert output_error(w, b_a @ a_a, cov) < output_error(w, b_w @ a_w, cov)
    b, a = factorise(w, 24, cov)  # full rank: exact
    assert torch.allclose(b @ a, w, atol=1e-4)


def test_low_rank_model_keeps_shapes_and_reports_factored_size():
    model = nexus_from_teacher(tiny_teacher("llama"))
    windows = torch.randint(6, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    covs = input_covariances(model, windows, autocast=False)
    errors = {}
    for method in ("weight", "activation"):
        low, report = low_rank_model(model, 0.5, method, covs)
        assert parameter_count(low) == parameter_count(model) and report["factored_params"] < report["dense_params"]
        errors[method] = report["mean_relative_output_error"]
        w = low.model.towers[0].layers[0].mlp.up_proj.weight
        assert torch.linalg.matrix_rank(w.detach(), rtol=1e-4) == rank_for(w.shape, 0.5)
    assert errors["activation"] < errors["weight"]


def _recipe(tmp_path, teacher_dir, budget):
    recipe = {"name": "c", "run_dir": str(tmp_path / "runs"), "teachers": [{"name": "t", "source": str(teacher_dir),
                                                                            "dtype": "fp32"}],
              "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose"},
                               {"name": "arith", "probe": "exact_match", "data": "bundled:arithmetic", "weight": 2}],
              "stages": {"compress": {"budget": budget, "calibration_tokens": 128, "window_tokens": 32}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_compress_writes_a_loadable_tower_and_reuses_it(tmp_path, llama_dir):
    path = _recipe(tmp_path, llama_dir, {"fraction": 0.6})
    result = CliRunner().invoke(app, ["compress", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "c" / "compress"
    record = json.loads((out / "compress.json").read_text())
    assert set(record["capabilities"]) == {"prose", "arith"} and record["teacher"]["name"] == "t"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert parameter_count(model) == record["params"]["student"]["total"]
    again = CliRunner().invoke(app, ["compress", str(path), "--quiet"])
    assert again.exit_code == 0 and "reused" in again.output


def test_cli_bad_budget_is_one_line_and_leaves_nothing(tmp_path, llama_dir):
    path = _recipe(tmp_path, llama_dir, {"params": 10**9})
    result = CliRunner().invoke(app, ["compress", str(path), "--quiet"])
    assert result.exit_code == 2 and "larger than the teacher" in result.output
    assert not (tmp_path / "runs" / "c").exists()


def test_feature_map_scores_steer_the_capability_scorer_and_must_match_the_model():
    from nexus.conversion.compress import CompressError, feature_map_scores

    model = nexus_from_teacher(tiny_teacher("llama"))
    units = DecoderUnits(model)
    planted = [3, 7, 11, 19, 23, 31, 37, 41]
    neurons = [[0.0] * 48 for _ in range(3)]
    for j in planted:
        neurons[1][j] = 5.0
    fm = {"t": {"_model": {"num_layers": 3, "heads": [4, 4, 4], "ffn": [48, 48, 48]},
                "prose": {"present": True, "confidence": {"overall": 1.0},
                          "activation": {"head": {"importance": [[0.1] * 4] * 3}, "neuron": {"importance": neurons}},
                          "perturbation": {"layer": {"drop": [0.1, 0.5, 0.1]}}}}}
    scores_fm = feature_map_scores(fm, "t", units)
    windows = torch.randint(6, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = {"prose": collect_structure_statistics(model, windows, autocast=False)}
    scorer = make_scorer("capability", feature_map=10.0)
    with_map = scorer.score(units, stats, feature_map=scores_fm)
    without = scorer.score(units, stats)
    top = set(torch.argsort(with_map.neurons[1], descending=True)[:8].tolist())
    assert top == set(planted) and set(torch.argsort(without.neurons[1], descending=True)[:8].tolist()) != top
    fm["t"]["_model"]["ffn"] = [48, 48, 40]
    with pytest.raises(CompressError, match="another architecture"):
        feature_map_scores(fm, "t", units)


def test_auto_also_picks_the_scorer_mix_and_keeps_what_that_mix_alone_keeps():
    """allocation auto with select_mix: every (mix, allocation) pair is a candidate; the chosen pair's pruned model is
    the one a run pinned to that mix and allocation builds."""
    from nexus.conversion.importance import CapabilityScorer

    caps = _capabilities()
    _, _, record = compress_model(nexus_from_teacher(tiny_teacher("gemma3")), char_tokenizer(), caps,
                                  _options("capability", selection_tokens=128))
    report = record["allocation_candidates"]
    pairs = {(c["scores"], c["allocation"]): c["loss"] for c in report["candidates"]}
    assert {m for m, _ in pairs} == set(CapabilityScorer().variants()) == {"taylor+activation", "activation", "taylor"}
    assert len(pairs) == 12
    best = min(pairs, key=pairs.get)
    assert (report["chosen_scores"], report["chosen"]) == best and record["scorer_mix"] == best[0]
    mix = {"taylor+activation": {}, "activation": {"taylor": 0.0}, "taylor": {"activation": 0.0}}[best[0]]
    kind, _, dev = best[1].partition(" (max_deviation ")
    pinned = _options("capability", scorer_options=mix, allocation=kind,
                      **({"max_deviation": float(dev.rstrip(")"))} if dev else {}))
    _, _, again = compress_model(nexus_from_teacher(tiny_teacher("gemma3")), char_tokenizer(), caps, pinned)
    assert again["kept"] == record["kept"]


def test_capability_scorer_variants_name_their_mix():
    from nexus.conversion.importance import CapabilityScorer

    assert list(CapabilityScorer(taylor=2.0, activation=1.0).variants()) == ["2*taylor+activation", "activation",
                                                                               "taylor"]
    assert list(CapabilityScorer(taylor=0.0).variants()) == ["activation", "taylor"]
    assert list(make_scorer("minitron").variants()) == [""]
