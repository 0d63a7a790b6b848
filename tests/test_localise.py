"""Localisation: a planted model whose capabilities live in known units, and the localiser must find them.

The planted model is a tiny random Llama (noise weights everywhere) with two capabilities wired in by construction:

- ``digits`` (exact match: ``...KLM3`` -> ``6``): ten FFN neurons, one per digit, spread over layers 1 and 2; each
  reads its digit's embedding (gate and up rows) and writes the unembedding of (digit + 3) % 10 (down column);
- ``markers`` (exact match: a marker such as ``?`` somewhere in the prompt -> its letter): one attention head in
  layer 1 that attends uniformly (zero queries), reads the four marker embeddings (value rows) and writes the
  letters' unembeddings (output columns). Marker embeddings are orthogonal to every other token's.

A third capability, ``general`` (random letters, lm), is the reference set, and the model is at chance on it.
The test first shows the capabilities demonstrably live in those units (ablating them destroys the capability;
ablating as many random units does not), then that localisation recovers them with precision and recall >= 0.8.
The control moves the planted neurons (a function-preserving permutation of the FFN): recall against the stale
indices collapses, so the metric can fail and the localiser follows the function, not the indices.
"""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import FAMILIES, tiny_teacher
from nexus.cli import app
from nexus.conversion.ablation import MeanRecorder, ablate
from nexus.conversion.decoder_units import DecoderUnits
from nexus.conversion.feature_map import (
    CONFIDENCE_KEYS,
    FeatureMapError,
    capabilities_of,
    load_feature_map,
    teachers_of,
    validate_feature_map,
)
from nexus.conversion.localise import (
    LocaliseError,
    LocaliseOptions,
    localise_model,
    plan_localise,
    run_localise,
)
from nexus.conversion.localise_items import ItemSet, run_rows
from nexus.conversion.recipe import load_recipe
from planted_model import FFN, planted_model, write_data
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

OPTIONS = {"max_items": 40, "max_neuron_fraction": 0.1,  # the planted set is 4% of this tiny model's neurons
           "autocast": False}  # bf16 pays off on real teachers, not on 64-wide matmuls


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls are ~20x slower with 2 OpenMP threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def capability_specs(folder):
    from nexus.conversion.recipe import CapabilitySpec

    return [CapabilitySpec(name="digits", probe="exact_match", data=str(folder / "digits.jsonl")),
            CapabilitySpec(name="markers", probe="exact_match", data=str(folder / "markers.jsonl")),
            CapabilitySpec(name="general", probe="lm", data=str(folder / "general.txt"), reference=True,
                           options={"chunk_chars": 64})]


REFERENCES = {"digits": ["markers", "general"], "markers": ["digits", "general"], "general": ["digits", "markers"]}


def _units(selection):
    return {(kind, tuple(u)) for kind, members in selection.items() for u in members}


def precision_recall(selected, planted):
    found, truth = _units(selected), _units(planted)
    hits = len(found & truth)
    return (hits / len(found) if found else 0.0), hits / len(truth)


RESIDENT = []  # (teacher name, weak reference to the previous teacher's model, alive?) at each load


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, llama_dir):
    """The planted model saved as an HF teacher, its data, a recipe, and `run_localise` on it (plus a random
    teacher, which has none of the capabilities)."""
    import gc
    import weakref

    root = tmp_path_factory.mktemp("planted")
    model, tok, planted = planted_model()
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    write_data(root)
    recipe = {
        "name": "planted", "run_dir": str(root / "runs"),
        "teachers": [{"name": "tiny", "source": "teacher", "dtype": "fp32"},
                     {"name": "random", "source": str(llama_dir), "dtype": "fp32"}],
        "capabilities": [
            {"name": "digits", "probe": "exact_match", "data": "digits.jsonl", "reference": ["markers", "general"]},
            {"name": "markers", "probe": "exact_match", "data": "markers.jsonl", "reference": ["digits", "general"]},
            {"name": "general", "probe": "lm", "data": "general.txt", "reference": True,
             "options": {"chunk_chars": 64}},
        ],
        "stages": {"localise": OPTIONS},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    previous = {"ref": None}

    def on_loaded(name, teacher):
        gc.collect()
        before = previous["ref"]
        RESIDENT.append((name, before is not None and before() is not None))
        previous["ref"] = weakref.ref(teacher)

    result = run_localise(load_recipe(root / "recipe.yaml"), show_progress=False, on_teacher_loaded=on_loaded)
    return root, model, tok, planted, result


# ---------------------------------------------------------------------------------------------- the planted test


def test_capabilities_demonstrably_live_in_the_planted_units(planted_run):
    root, model, tok, planted, _ = planted_run
    items = ItemSet(tok)
    for spec in capability_specs(root):
        items.add(spec.name, spec.probe, spec.data, spec.options, max_items=40)
    units = DecoderUnits(model)

    def scores(selection=None):
        with ablate(units, selection or {}, mode="zero"):
            return items.item_scores(*run_rows(model, items, autocast=False))

    base = scores()
    d, m = items.capabilities["digits"].items, items.capabilities["markers"].items
    chance = items.chance()
    assert base[d].mean() - chance[d].mean() > 1.0 and base[m].mean() - chance[m].mean() > 0.5  # both present
    rng = np.random.default_rng(0)
    all_neurons = units.units("neuron")
    for cap, own, other in (("digits", d, m), ("markers", m, d)):
        hit = scores(planted[cap])
        margin = base[own].mean() - chance[own].mean()
        assert base[own].mean() - hit[own].mean() > 0.8 * margin, f"ablating {cap}'s units must destroy it"
        assert abs(base[other].mean() - hit[other].mean()) < 0.1 * margin, "and leave the other capability"
        size = len(planted[cap]["neuron"]) + len(planted[cap]["head"])
        random_set = {"neuron": [all_neurons[i] for i in rng.choice(len(all_neurons), size, replace=False)]}
        assert base[own].mean() - scores(random_set)[own].mean() < 0.2 * margin


def test_localisation_recovers_the_planted_units(planted_run):
    *_, planted, fm = planted_run
    for cap in ("digits", "markers"):
        entry = fm["tiny"][cap]
        assert entry["present"]
        precision, recall = precision_recall(entry["activation"]["selected"], planted[cap])
        print(f"{cap}: precision {precision:.2f} recall {recall:.2f}")
        assert precision >= 0.8 and recall >= 0.8, (cap, entry["activation"]["selected"], planted[cap])
        causal = entry["causal"]
        assert causal["drop"] > 3 * max(causal["random_drop"], 0.0) and causal["confidence"] > 0.95
        assert {l for l, _ in planted[cap]["neuron"] + planted[cap]["head"]} <= \
            set(entry["perturbation"]["flagged_layers"])
        assert entry["confidence"]["agreement"] == 1.0


def test_a_random_selection_would_fail_the_metric(planted_run):
    """The precision/recall bar is not trivially met: random sets of the same size score far below it."""
    _, model, _, planted, _ = planted_run
    units = DecoderUnits(model)
    rng = np.random.default_rng(1)
    pool = units.units("neuron")
    recalls = [precision_recall({"neuron": [pool[i] for i in rng.choice(len(pool), 10, replace=False)]},
                                planted["digits"])[1] for _ in range(50)]
    assert np.mean(recalls) < 0.2


def test_moved_units_are_followed_and_stale_indices_fail(planted_run):
    """Control: permute the FFN neurons of layers 1-2 (the model computes exactly the same function). The localiser
    must find the neurons at their new indices; scored against the old indices, recall collapses."""
    root, model, tok, planted, _ = planted_run
    moved = LlamaForCausalLM(model.config).eval()
    moved.load_state_dict(model.state_dict())
    perms = {}
    with torch.no_grad():
        for l in (1, 2):
            perm = torch.randperm(FFN, generator=torch.Generator().manual_seed(l))
            mlp = moved.model.layers[l].mlp
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
            perms[l] = perm.argsort()  # old index -> new index
        x = torch.tensor([tok("KLM3?N")["input_ids"]])
        assert torch.allclose(model(x).logits, moved(x).logits, atol=1e-5)
    truth = {"neuron": [(l, int(perms[l][n])) for l, n in planted["digits"]["neuron"]], "head": []}
    entry = localise_model(moved, tok, capability_specs(root), {"digits": REFERENCES["digits"]},
                           LocaliseOptions(**OPTIONS), localise=["digits"])
    selected = entry["digits"]["activation"]["selected"]
    precision, recall = precision_recall(selected, truth)
    stale_precision, stale_recall = precision_recall(selected, planted["digits"])
    print(f"moved: precision {precision:.2f} recall {recall:.2f}; stale: {stale_precision:.2f} {stale_recall:.2f}")
    assert precision >= 0.8 and recall >= 0.8
    assert stale_recall <= 0.3 and stale_precision <= 0.3


def test_a_nexus_copy_localises_to_the_same_units(planted_run):
    from nexus.conversion.teacher_import import nexus_from_teacher

    root, model, tok, planted, fm = planted_run
    nexus = nexus_from_teacher(model)
    entry = localise_model(nexus, tok, capability_specs(root), {"markers": REFERENCES["markers"]},
                           LocaliseOptions(**OPTIONS), localise=["markers"])
    assert entry["_model"]["model_type"] == "nexus"
    assert _units(entry["markers"]["activation"]["selected"]) == _units(fm["tiny"]["markers"]["activation"]["selected"])
    assert precision_recall(entry["markers"]["activation"]["selected"], planted["markers"]) == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------- bad input


def test_one_teacher_resident_at_a_time(planted_run):
    assert RESIDENT == [("tiny", False), ("random", False)]


def test_capability_at_chance_is_not_present(planted_run):
    *_, fm = planted_run
    for cap in ("digits", "markers", "general"):  # a random teacher has none of them
        assert fm["random"][cap]["present"] is False and fm["random"][cap]["causal"] is None
    general = fm["tiny"]["general"]
    assert general["present"] is False and general["causal"] is None
    assert "not present" in general["reason"] and "chance" in general["reason"]
    assert general["presence"]["margin_ci"][1] < 0
    assert general["confidence"]["presence"] < 0.5 and general["confidence"]["causal"] is None
    assert "perturbation" not in general  # not localised into noise


def test_profile_saying_chance_overrides(planted_run):
    root, model, tok, *_ = planted_run
    entry = localise_model(model, tok, capability_specs(root), {"markers": REFERENCES["markers"]},
                           LocaliseOptions(**OPTIONS), localise=["markers"],
                           competent={"markers": False})
    assert entry["markers"]["present"] is False and "profile" in entry["markers"]["reason"]


def test_recipe_without_reference_set_is_a_clear_error(planted_run, tmp_path):
    root = planted_run[0]
    recipe = {
        "name": "noref", "run_dir": str(tmp_path / "runs"),
        "teachers": [{"name": "tiny", "source": str(root / "teacher")}],
        "capabilities": [{"name": "digits", "probe": "exact_match", "data": str(root / "digits.jsonl")},
                         {"name": "markers", "probe": "exact_match", "data": str(root / "markers.jsonl")}],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(LocaliseError, match=r"capabilities\[0\]\.reference.*reference: true"):
        run_localise(load_recipe(tmp_path / "recipe.yaml"), show_progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    out = CliRunner().invoke(app, ["localise", str(tmp_path / "recipe.yaml"), "--quiet"])
    assert out.exit_code == 2 and "no reference set" in out.output


def test_pinned_teachers_still_use_the_other_capabilities_text_as_reference(planted_run, tmp_path, llama_dir):
    """A capability pinned to one teacher (``teachers:``) is localised in that teacher only, but every capability whose
    text the teacher can encode is its contrast set: pinning says who is scored, not what text exists."""
    root = planted_run[0]
    recipe = {
        "name": "pinned", "run_dir": str(tmp_path / "runs"),
        "teachers": [{"name": "tiny", "source": str(root / "teacher")}, {"name": "random", "source": str(llama_dir)}],
        "capabilities": [
            {"name": "digits", "probe": "exact_match", "data": str(root / "digits.jsonl"), "teachers": ["tiny"],
             "reference": True},
            {"name": "markers", "probe": "exact_match", "data": str(root / "markers.jsonl"), "teachers": ["random"],
             "reference": True},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    references, plan = plan_localise(load_recipe(tmp_path / "recipe.yaml"))
    assert plan["tiny"] == (["digits"], ["digits", "markers"], {})
    assert plan["random"] == (["markers"], ["digits", "markers"], {})


def test_unsupported_probe_and_too_few_random_sets_are_errors(planted_run, tmp_path):
    from nexus.conversion.recipe import RecipeError

    root = planted_run[0]
    recipe = {
        "name": "bad", "run_dir": str(tmp_path / "runs"),
        "teachers": [{"name": "tiny", "source": str(root / "teacher")}],
        "capabilities": [{"name": "general", "probe": "lm", "data": str(root / "general.txt"), "reference": True},
                         {"name": "digits", "probe": "exact_match", "data": str(root / "digits.jsonl")}],
        "stages": {"localise": {"random_sets": 3}},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"stages\.localise\.random_sets"):
        load_recipe(tmp_path / "recipe.yaml")


# ---------------------------------------------------------------------------------------------- the artefacts


def test_feature_map_schema_and_files(planted_run):
    root = planted_run[0]
    out = root / "runs" / "planted" / "localise"
    loaded = load_feature_map(out / "feature_map.json")
    assert teachers_of(loaded) == ["tiny", "random"]
    assert capabilities_of(loaded, "tiny") == ["digits", "markers", "general"]
    model = loaded["tiny"]["_model"]
    assert model["num_layers"] == 4 and model["heads"] == [4] * 4 and model["ffn"] == [FFN] * 4
    for cap in ("digits", "markers"):
        entry = loaded["tiny"][cap]
        assert {"drop", "random_drop", "ratio"} <= set(entry["causal"])
        assert set(entry["confidence"]) == set(CONFIDENCE_KEYS)
        assert all(0.0 <= v <= 1.0 for v in entry["confidence"].values())
        assert len(entry["perturbation"]["layer"]["drop"]) == 4
        assert [len(v) for v in entry["activation"]["neuron"]["importance"]] == [FFN] * 4
        assert [len(v) for v in entry["activation"]["head"]["specificity"]] == [4] * 4
        assert len(entry["causal"]["random_drops"]) >= 5
    assert set(loaded["tiny"]["_seconds"]) >= {"perturbation", "activation", "spectral", "causal"}
    assert (out / "heatmap-tiny.png").stat().st_size > 1000 and (out / "heatmap-random.png").is_file()
    broken = json.loads((out / "feature_map.json").read_text())
    del broken["tiny"]["digits"]["causal"]["ratio"]
    with pytest.raises(FeatureMapError, match="tiny.digits.causal.ratio"):
        validate_feature_map(broken)
    again = run_localise(load_recipe(root / "recipe.yaml"), show_progress=False)
    assert again["_reused"] is True

    out = CliRunner().invoke(app, ["localise", str(root / "recipe.yaml"), "--quiet"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "reused" in out.output and "digits" in out.output and "not present" in out.output


# ---------------------------------------------------------------------------------------------- ablation mechanics


def _zeroed_copy(model, edit):
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        edit(DecoderUnits(copy))
    return copy


@pytest.mark.parametrize("family", [*FAMILIES, "nexus"])
def test_hook_ablation_equals_weight_surgery(family):
    """Zero-ablating a head / neuron / FFN block / layer through hooks equals zeroing the matching weights."""
    if family == "nexus":
        from nexus.conversion.teacher_import import nexus_from_teacher

        model = nexus_from_teacher(tiny_teacher("gemma3"))
    else:
        model = tiny_teacher(family)
    units = DecoderUnits(model)
    info = units.layers[1]
    hd = info.head_dim
    x = torch.randint(0, 97, (2, 9))

    def zero_head(u):
        u.layers[1].attn.o_proj.weight[:, hd:2 * hd] = 0

    def zero_neuron(u):
        u.layers[2].mlp.down_proj.weight[:, 5] = 0

    def zero_ffn(u):
        u.layers[0].mlp.down_proj.weight.zero_()

    def zero_layer(u):
        u.layers[1].attn.o_proj.weight.zero_()
        u.layers[1].mlp.down_proj.weight.zero_()
        if u.layers[1].attn.o_proj.bias is not None:
            u.layers[1].attn.o_proj.bias.zero_()

    cases = [({"head": [(1, 1)]}, zero_head), ({"neuron": [(2, 5)]}, zero_neuron), ({"ffn": [(0,)]}, zero_ffn),
             ({"layer": [(1,)]}, zero_layer)]
    with torch.no_grad():
        clean = model(x).logits
        for selection, edit in cases:
            with ablate(units, selection, mode="zero"):
                hooked = model(x).logits
            expected = _zeroed_copy(model, edit)(x).logits
            assert torch.allclose(hooked, expected, atol=1e-5), (family, selection)
            assert not torch.allclose(hooked, clean, atol=1e-4), (family, selection)
        assert torch.allclose(model(x).logits, clean)  # hooks are gone


def test_mean_ablation_at_the_mean_is_a_no_op():
    """With means recorded on a single token, every unit already sits at its mean: mean-ablating all of them
    changes nothing, while zero-ablating them does."""
    model = tiny_teacher("llama")
    units = DecoderUnits(model)
    x = torch.tensor([[7]])
    everything = {"neuron": units.units("neuron"), "head": units.units("head"), "layer": units.units("layer"),
                  "attention": units.units("attention"), "ffn": units.units("ffn")}
    with torch.no_grad():
        with MeanRecorder(units) as recorder:
            recorder.count(torch.ones_like(x, dtype=torch.bool))
            clean = model(x).logits
        means = recorder.means()
        with ablate(units, everything, mode="mean", means=means):
            assert torch.allclose(model(x).logits, clean, atol=1e-5)
        with ablate(units, {"neuron": units.units("neuron")}, mode="zero"):
            assert not torch.allclose(model(x).logits, clean, atol=1e-4)
    with pytest.raises(ValueError, match="neuron \\(0, 48\\).*out of range"), \
            ablate(units, {"neuron": [(0, 48)]}, mode="zero"):
        pass


def test_layer_replay_is_exact(planted_run):
    """Replaying the unablated layers before the first ablated one gives the same scores as recomputing them."""
    from nexus.conversion.localise_context import TeacherLocalisation

    root, model, tok, *_ = planted_run
    items = ItemSet(tok, tokens_per_batch=128)
    for spec in capability_specs(root):
        items.add(spec.name, spec.probe, spec.data, spec.options, max_items=12)
    units = DecoderUnits(model)
    ctx = TeacherLocalisation(model, units, items, LocaliseOptions(**OPTIONS))
    ctx.run_base()
    selection = {"neuron": [(2, 7), (3, 1)], "head": [(2, 0)]}
    replayed = ctx.evaluate(selection)
    with ablate(units, selection, "mean", ctx.means):
        recomputed = items.item_scores(*run_rows(model, items, autocast=False))
    assert np.allclose(replayed, recomputed, atol=1e-6)
    assert not np.allclose(replayed, ctx.base, atol=1e-4)


def test_multiple_choice_and_cheap_stage1_find_the_same_units(planted_run, tmp_path):
    """The digits capability as multiple choice, with blocks and heads ablated only inside one flagged layer."""
    from nexus.conversion.recipe import CapabilitySpec

    root, model, tok, planted, _ = planted_run
    items = [json.loads(line) for line in (root / "digits.jsonl").read_text().splitlines()]
    with (tmp_path / "digits_mc.jsonl").open("w") as fh:
        for k, item in enumerate(items):
            wrong = [str((int(item["answer"]) + s) % 10) for s in (4, 7)]
            choices = [item["answer"], *wrong]
            fh.write(json.dumps({"prompt": item["prompt"], "choices": choices[k % 3:] + choices[:k % 3],
                                 "answer": (3 - k % 3) % 3}) + "\n")
    caps = [*capability_specs(root), CapabilitySpec(name="digits_mc", probe="multiple_choice",
                                                    data=str(tmp_path / "digits_mc.jsonl"))]
    options = LocaliseOptions(**{**OPTIONS, "max_items": 24, "blocks": "flagged", "max_detail_layers": 1})
    entry = localise_model(model, tok, caps, {"digits_mc": ["markers", "general"]}, options, localise=["digits_mc"])
    mc = entry["digits_mc"]
    assert mc["present"] and mc["presence"]["chance"] == pytest.approx(-np.log(3))
    assert len(mc["perturbation"]["head_layers"]) <= 1
    assert sum(v is not None for v in mc["perturbation"]["ffn"]["drop"]) <= 1
    precision, recall = precision_recall(mc["activation"]["selected"], planted["digits"])
    assert precision >= 0.8 and recall >= 0.8, mc["activation"]["selected"]


def test_items_never_exceed_the_models_positions(planted_run):
    """A teacher with a short context (the arithmetic specialist has 32 positions) gets items cut to fit."""
    root, model, tok, *_ = planted_run
    short = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "max_position_embeddings": 24}))
    short.load_state_dict(model.state_dict())
    widths = []
    short.model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    entry = localise_model(short.eval(), tok, capability_specs(root), {"general": REFERENCES["general"]},
                           LocaliseOptions(**{**OPTIONS, "max_item_tokens": 64}), localise=["general"])
    assert entry["general"]["present"] is False and entry["_forwards"] == 1
    assert max(widths) == 24  # the 65-token general items were cut to the model's 24 positions


# ---------------------------------------------------------------------------------------------- compute on this CPU


class _Loaded(Exception):
    pass


def test_a_bf16_teacher_is_localised_in_fp32_where_bf16_matmuls_are_not_native(planted_run, tmp_path, monkeypatch):
    """On a CPU without native bf16 (NEXUS_NATIVE_BF16=0, as the suite pins) bf16 weights take torch's slow reference
    GEMM, so a bf16 teacher is held in fp32 for localisation (and planned so); with native bf16 it stays bf16 and
    autocast is on by default. An explicit ``autocast: true`` keeps the recipe's dtype."""
    from nexus.conversion.localise import localise_compute
    from nexus.conversion.stage_memory import plan_localise_ram

    root = planted_run[0]
    raw = yaml.safe_load((root / "recipe.yaml").read_text())
    raw["teachers"] = [{"name": "tiny", "source": str(root / "teacher"), "dtype": "bf16"}]
    raw["run_dir"] = str(tmp_path / "runs")
    for cap in raw["capabilities"]:
        cap["data"] = str(root / cap["data"])
    raw["stages"]["localise"] = {k: v for k, v in OPTIONS.items() if k != "autocast"}  # the default (None)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    for native, weights, autocast in (("0", torch.float32, False), ("1", torch.bfloat16, True)):
        monkeypatch.setenv("NEXUS_NATIVE_BF16", native)
        recipe = load_recipe(tmp_path / "recipe.yaml")
        loaded = {}

        def stop(name, model, loaded=loaded):
            loaded["dtype"] = next(model.parameters()).dtype
            raise _Loaded  # what was loaded is all this test needs

        with pytest.raises(_Loaded):
            run_localise(recipe, show_progress=False, on_teacher_loaded=stop)
        assert loaded["dtype"] == weights
        assert localise_compute("bf16", None) == ("fp32" if native == "0" else "bf16", autocast)
        params = sum(p.numel() for p in planted_run[1].parameters())
        plan = plan_localise_ram(recipe, 0)
        assert plan["components"]["teacher_weights"] == (4 if native == "0" else 2) * params
        assert not (tmp_path / "runs" / "planted" / "localise").exists()  # nothing half-written
    monkeypatch.setenv("NEXUS_NATIVE_BF16", "0")
    assert localise_compute("bf16", True) == ("bf16", True) and localise_compute("fp32", None) == ("fp32", False)
