"""Localisation drives the student (issue 17, item 2): the units the localiser found causally necessary are kept by
compression, renumbered for the pruned tower, and protected during distillation; a selection that failed the causal
check protects nothing."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_teacher
from test_distill_stage import consolidate_recipe_file, two_teachers  # noqa: F401  (fixture)

from nexus.conversion.compress import Capability, CompressOptions, compress_model
from nexus.conversion.corpora import corpus_text
from nexus.conversion.critical_units import critical_importance, critical_units, protect_scores
from nexus.conversion.decoder_units import DecoderUnits
from nexus.conversion.feature_map import CONFIDENCE_KEYS
from nexus.conversion.importance import make_scorer
from nexus.conversion.structure_statistics import collect_structure_statistics
from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.training.distill_options import PreservationOptions
from nexus.training.preservation import Preservation


def _entry(confidence, heads, neurons, present=True):
    return {"present": present, "causal": {"confidence": confidence},
            "activation": {"selected": {"head": heads, "neuron": neurons}}}


def test_only_causally_confirmed_selections_of_served_capabilities_count():
    fm = {"t": {"prose": _entry(0.99, [[0, 1]], [[1, 5], [2, 7]]),
                "code": _entry(0.60, [[1, 2]], [[0, 3]]),  # did not beat random units: not trusted
                "math": _entry(0.99, [[2, 0]], [[2, 9]], present=False)}}
    units, report = critical_units(fm, "t", ["prose", "code", "math", "poetry"])
    assert units == {"head": {(0, 1)}, "neuron": {(1, 5), (2, 7)}}
    assert report["prose"] == {"used": True, "causal_confidence": 0.99, "heads": 1, "neurons": 2}
    assert not report["code"]["used"] and "0.6 < 0.95" in report["code"]["reason"]
    assert not report["math"]["used"] and not report["poetry"]["used"]
    assert critical_units(fm, "t", ["code"], min_confidence=0.5)[0] == {"head": {(1, 2)}, "neuron": {(0, 3)}}


def _teacher_and_scores():
    model = nexus_from_teacher(tiny_teacher("llama"))
    text = corpus_text("prose", "train")[:2500]
    return model, [Capability("prose", text, 1.0, "prose")]


def _lowest_units(model, caps):
    """The units the capability scorer ranks lowest: what compression drops first without protection."""
    from conftest import char_tokenizer
    from nexus.conversion.calibration import token_windows

    units = DecoderUnits(model)
    windows = token_windows(char_tokenizer(), caps[0].text, 256, 32)
    stats = {"prose": collect_structure_statistics(model, windows, gradients=True, autocast=False)}
    scores = make_scorer("capability").score(units, stats, {"prose": 1.0})
    neurons = {(1, int(j)) for j in torch.argsort(scores.neurons[1])[:3]}
    heads = {(2, int(torch.argmin(scores.heads[2])))}
    return {"head": heads, "neuron": neurons}, scores


def test_compression_keeps_critical_units_it_would_otherwise_drop_and_copies_them_exactly():
    from conftest import char_tokenizer

    model, caps = _teacher_and_scores()
    critical, _ = _lowest_units(model, caps)
    options = CompressOptions(scorer="capability", budget={"fraction": 0.5}, calibration_tokens=256, window_tokens=32,
                              vocab={"trim": False})
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    plain, _, plain_record = compress_model(nexus_from_teacher(tiny_teacher("llama")), char_tokenizer(), caps,
                                            options)
    kept_plain = {(w["layer"], n) for w in plain_record["kept"]["layers"] for n in w["neurons"]}
    assert not critical["neuron"] <= kept_plain  # without protection the lowest-scored units go (the test can fail)
    student, _, record = compress_model(model, char_tokenizer(), caps, options, critical=critical)
    kept = {(w["layer"], n) for w in record["kept"]["layers"] for n in w["neurons"]}
    kept_heads = {(w["layer"], h) for w in record["kept"]["layers"] for h in w["heads"]}
    assert critical["neuron"] <= kept and critical["head"] <= kept_heads
    assert record["critical"]["lost"] == {"head": 0, "neuron": 0}
    assert len(record["critical"]["neuron"]) == 3 and len(record["critical"]["head"]) == 1
    # the renumbered units hold the teacher's own weights
    teacher_of = {}
    for w in record["kept"]["layers"]:
        for i, n in enumerate(w["neurons"]):
            teacher_of[(w["layer"], i)] = n
    layers = [w["layer"] for w in record["kept"]["layers"] if not w["dropped"] and (w["heads"] or w["ffn"])]
    for sl, i in record["critical"]["neuron"]:
        tl = layers[sl]
        mine = student.model.towers[0].layers[sl].mlp.gate_proj.weight[i]
        theirs = teacher[f"model.towers.0.layers.{tl}.mlp.gate_proj.weight"][teacher_of[(tl, i)]]
        assert torch.equal(mine, theirs) and (tl, teacher_of[(tl, i)]) in critical["neuron"]


def test_protected_scores_rank_first_and_units_outside_the_model_are_refused():
    model, caps = _teacher_and_scores()
    critical, scores = _lowest_units(model, caps)
    protect_scores(scores, critical)
    (layer, head), = critical["head"]
    assert float(scores.heads[layer][head]) > max(float(t.max()) for t in scores.heads if t is not None) - 1e-6
    with pytest.raises(ValueError, match="outside the model"):
        protect_scores(scores, {"neuron": {(1, 999)}})


def test_preservation_freezes_exactly_the_critical_rows_and_columns():
    model = nexus_from_teacher(tiny_teacher("llama"))
    units = {"head": [[1, 2]], "neuron": [[0, 4], [2, 10]]}
    importance = critical_importance(model, 0, units)
    q = importance["model.towers.0.layers.1.self_attn.q_proj.weight"]
    d = model.model.towers[0].layers[1].self_attn.head_dim
    assert q[2 * d:3 * d].eq(1).all() and q.sum() == d * q.shape[1]
    down = importance["model.towers.0.layers.2.mlp.down_proj.weight"]
    assert down[:, 10].eq(1).all() and down.sum() == down.shape[0]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    preservation = Preservation(PreservationOptions(mode="lr_scale", strength=1.0, normalise="max",
                                                    importance="critical"), importance).attach(model, optimizer)
    ids = torch.randint(6, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    preservation.detach()
    after = dict(model.named_parameters())
    for name, mask in importance.items():
        moved = (after[name].detach() != before[name])
        assert not moved[mask.bool()].any(), name  # every critical element frozen (strength 1)
        assert moved[~mask.bool()].any(), name  # the rest of the matrix trained


def _feature_map(teachers, capabilities):
    """A feature map that marks head 1 of layer 0 and neurons 2, 5 of layer 1 critical in every teacher, for every
    capability (causally confirmed), with flat importance terms."""
    from nexus.conversion.teacher_source import load_teacher

    fm = {"_schema": "nexus.feature_map/1"}
    for name, folder in teachers.items():
        units = DecoderUnits(nexus_from_teacher(load_teacher(folder, dtype=torch.float32)[0]))
        heads, ffn = units.widths("head"), units.widths("neuron")
        entry = {"_model": {"num_layers": len(units.layers), "heads": heads, "ffn": ffn}}
        for cap in capabilities:
            flat = [0.0] * len(units.layers)
            entry[cap] = {
                "present": True, "presence": {"present": True},
                "confidence": {**dict.fromkeys(CONFIDENCE_KEYS, 0.5), "causal": 1.0},
                "causal": {"confidence": 1.0, "drop": 0.5, "random_drop": 0.1, "ratio": 5.0},
                "activation": {"head": {"importance": [[0.0] * h for h in heads], "specificity": [[0.0] * h for h in heads]},
                               "neuron": {"importance": [[0.0] * f for f in ffn], "specificity": [[0.0] * f for f in ffn]},
                               "selected": {"head": [[0, 1]], "neuron": [[1, 2], [1, 5]]}},
                "perturbation": {"layer": {"drop": flat}, "attention": {"drop": flat}, "ffn": {"drop": flat}}}
        fm[name] = entry
    return fm


def test_student_build_keeps_and_distill_protects_the_feature_maps_critical_units(two_teachers, tmp_path):  # noqa: F811
    import json

    import yaml
    from safetensors.torch import load_file

    from nexus.conversion.distill import run_distill
    from nexus.conversion.profile import run_profile
    from nexus.conversion.recipe import load_recipe
    from nexus.conversion.student_build import run_student_build

    path = consolidate_recipe_file(two_teachers, tmp_path, steps=3)
    raw = yaml.safe_load(path.read_text())
    raw["stages"]["distill"].update(lmc=False, lr=0.01,
                                    preservation={"mode": "lr_scale", "strength": 1.0, "importance": "critical"})
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    profile = run_profile(recipe, show_progress=False)
    fm_path = tmp_path / "feature_map.json"
    fm_path.write_text(json.dumps(_feature_map(two_teachers, ["prose", "code"])))
    init, build = run_student_build(recipe, profile, show_progress=False, feature_map=fm_path)
    towers = [t for t in build["towers"] if t["compress"].get("critical")]
    assert towers, build["towers"]
    for t in towers:
        crit = t["compress"]["critical"]
        assert crit["lost"] == {"head": 0, "neuron": 0} and len(crit["neuron"]) == 2 and len(crit["head"]) == 1
        assert all(r["used"] for r in t["compress"]["localisation"]["critical"].values())
    # localisation off ignores the map: a different build (its own cache key), with nothing marked critical
    off = recipe.model_copy(deep=True)
    off.stages["student_build"] = off.stage("student_build").model_copy(update={"localisation": "off"})
    _, plain = run_student_build(off, profile, out=tmp_path / "plain", show_progress=False, feature_map=fm_path)
    assert not any(t["compress"].get("critical") for t in plain["towers"])
    summary = run_distill(recipe, init, profile=profile, show_progress=False)
    before, after = load_file(init / "model.safetensors"), load_file(Path(summary["student"]) / "model.safetensors")
    from nexus.modeling_nexus import NexusForCausalLM

    student = NexusForCausalLM.from_pretrained(init)
    for t in towers:
        for name, mask in critical_importance(student, t["index"], t["compress"]["critical"]).items():
            moved = after[name] != before[name]
            assert not moved[mask.bool()].any(), name  # frozen: strength 1 on exactly these rows/columns
            assert moved[~mask.bool()].any(), name  # the rest trained
