"""The validate stage on tiny teachers: retention with paired CIs, CKA, interference, the gate, the report and card."""

import gc
import json
import math
import re
import shutil
import weakref

import pytest
import torch
import typer
import yaml
from nexus.conversion.profile import run_profile
from nexus.conversion.recipe import load_recipe
from nexus.conversion.report_render import MODEL_CARD_TEMPLATE, render_model_card
from nexus.conversion.teacher_import import import_teacher
from nexus.conversion.validate import run_validate
from nexus.validate_command import GATE_FAILED, validate
from typer.testing import CliRunner

FAST = {"max_items": 4, "n_bootstrap": 200, "window_tokens": 64, "batch_size": 8, "compute": "native"}
# the teachers are random (no one is competent): these capabilities keep their retention anyway, flagged
KEEP = {"require_competent_teacher": False}
CAPS = [
    {"name": "prose", "probe": "lm", "data": "bundled:prose", **KEEP},
    {"name": "code", "probe": "lm", "data": "bundled:code", **KEEP},
    {"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl", "teachers": ["llama_char"], **KEEP},
]

app = typer.Typer(add_completion=False)
app.command()(validate)  # the lead registers it as `nexus validate`; here it is the only command


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_recipe(folder, teachers, validate_options=None, capabilities=None, name="tiny"):
    (folder / "quiz.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1)], "answer": 0}) + "\n"
        for a in range(6)))
    stages = {"profile": FAST}
    if validate_options is not None:
        stages["validate"] = validate_options
    raw = {"name": name, "teachers": [{"name": n, "source": str(p), "dtype": "fp32"} for n, p in teachers.items()],
           "capabilities": capabilities or CAPS, "stages": stages}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def students(profile_teachers, tmp_path_factory):
    """``same``: the llama_char teacher imported into a Nexus checkpoint (identical weights); ``noisy``: the same
    with Gaussian noise on every weight (a run made to regress)."""
    from nexus.modeling_nexus import NexusForCausalLM

    root = tmp_path_factory.mktemp("students")
    same = import_teacher(profile_teachers["llama_char"], root / "same")
    model = NexusForCausalLM.from_pretrained(same, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(root / "noisy")
    for f in same.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, root / "noisy" / f.name)
    return {"same": same, "noisy": root / "noisy"}


def tiny_feature_map(layers=3):
    """A schema-valid feature map (as `nexus localise` writes it) with one present and one absent capability."""
    conf = {k: 0.5 for k in ("presence", "perturbation", "activation", "spectral", "causal", "agreement")}
    per_layer = {"drop": [0.1 * i for i in range(layers)], "specific": [0.05 * i for i in range(layers)]}
    present = {
        "present": True, "presence": {"score": 1.0}, "confidence": {**conf, "overall": 0.7},
        "causal": {"drop": 0.4, "random_drop": 0.1, "ratio": 4.0},
        "perturbation": {"layer": per_layer, "attention": per_layer, "ffn": per_layer, "flagged_layers": [1]},
        "activation": {"neuron": {"specificity": [[0.0]] * layers}, "head": {"specificity": [[0.0]] * layers}},
    }
    absent = {"present": False, "presence": {"score": 0.0}, "causal": None, "reason": "at chance",
              "confidence": {**{k: None for k in conf}, "presence": 0.9, "overall": None}}
    return {"_schema": "nexus.feature_map/1", "_recipe": "tiny",
            "llama_char": {"_model": {"num_layers": layers}, "prose": present, "quiz": absent}}


@pytest.fixture(scope="module")
def validated(profile_teachers, students, tmp_path_factory):
    """One validation of the identical student against two teachers (after a profile, whose items it reuses), with
    two phase checkpoints (noisy -> same), a feature map and an LMC path; records which models were alive."""
    folder = tmp_path_factory.mktemp("validated")
    teachers = {k: profile_teachers[k] for k in ("llama_char", "qwen_bpe")}
    recipe = load_recipe(make_recipe(folder, teachers, {"lm_metric": "auto", "student_dtype": "fp32"}))
    run_profile(recipe, show_progress=False)
    (folder / "fm.json").write_text(json.dumps(tiny_feature_map()))
    (folder / "lmc.json").write_text(json.dumps({"alphas": [0.0, 0.5, 1.0], "scores": {"prose": [0.9, 0.8, 1.0]},
                                                 "chosen_alpha": 1.0}))
    alive, previous = [], []

    def check_alone(label, model):
        gc.collect()
        alive.append((label, [ref() is not None for ref in previous]))
        previous.append(weakref.ref(model))

    report = run_validate(recipe, students["same"], checkpoints=[f"noisy={students['noisy']}",
                                                                  f"same={students['same']}"],
                          feature_map=folder / "fm.json", lmc=folder / "lmc.json", show_progress=False,
                          on_model_loaded=check_alone)
    return recipe, report, alive


def test_report_json_matches_the_schema(validated):
    recipe, report, _ = validated
    on_disk = json.loads((recipe.run_path / "validate" / "report.json").read_text())
    assert on_disk["retention"] == report["retention"]
    assert set(on_disk["retention"]) == {"prose", "code", "quiz"}
    for cap, entry in on_disk["retention"].items():
        assert {"value", "ci", "teacher", "metric", "lower_is_better", "student_score", "teacher_score", "n"} \
            <= set(entry)
        lo, hi = entry["ci"]
        assert lo <= entry["value"] <= hi
        assert entry["teacher"] == on_disk["best"][cap]
        assert entry == {**on_disk["per_teacher"][cap][entry["teacher"]], "teacher": entry["teacher"],
                         "best_separated": entry["best_separated"]}
    assert set(on_disk["per_teacher"]["quiz"]) == {"llama_char"}
    assert set(on_disk["per_teacher"]["prose"]) == {"llama_char", "qwen_bpe"}
    values = [e["value"] for e in on_disk["retention"].values()]
    assert on_disk["min"]["value"] == pytest.approx(min(values))
    assert on_disk["mean"]["value"] == pytest.approx(sum(values) / len(values))
    assert on_disk["min"]["capability"] == min(on_disk["retention"], key=lambda c: on_disk["retention"][c]["value"])
    for key in ("min", "mean"):
        lo, hi = on_disk[key]["ci"]
        assert lo <= on_disk[key]["value"] <= hi
    from nexus.modeling_nexus import NexusForCausalLM

    student = NexusForCausalLM.from_pretrained(report["student"]["path"])
    assert on_disk["student_params"] == sum(p.numel() for p in student.parameters())
    assert set(on_disk["teacher_params"]) == {"llama_char", "qwen_bpe"}
    assert on_disk["teacher_params"]["llama_char"] == on_disk["student_params"]  # a lossless import
    assert on_disk["gate"]["requested"] is False and on_disk["gate"]["passed"] is None


def test_a_student_identical_to_its_teacher_retains_everything(validated):
    _, report, _ = validated
    for cap in ("prose", "code", "quiz"):
        entry = report["per_teacher"][cap]["llama_char"]
        assert entry["value"] == pytest.approx(1.0, abs=1e-6)
        lo, hi = entry["ci"]
        assert lo <= 1.0 <= hi
    prose = report["per_teacher"]["prose"]
    # same tokenisation: top-1 accuracy, bits per byte beside; a different tokenizer: bits per byte
    assert prose["llama_char"]["metric"] == "accuracy" and prose["llama_char"]["same_tokenization"] is True
    assert prose["llama_char"]["bpb_value"] == pytest.approx(1.0, abs=1e-6)
    assert prose["qwen_bpe"]["metric"] == "bpb" and prose["qwen_bpe"]["same_tokenization"] is False
    assert prose["qwen_bpe"]["value"] == pytest.approx(prose["qwen_bpe"]["teacher_score"]
                                                       / prose["qwen_bpe"]["student_score"])
    assert report["per_teacher"]["quiz"]["llama_char"]["metric"] == "accuracy"


def test_cka_is_one_against_the_same_teacher_and_skipped_across_tokenizers(validated):
    _, report, _ = validated
    for cap in ("prose", "code", "quiz"):
        entry = report["cka"]["llama_char"][cap]
        assert len(entry["per_layer"]) == 4  # embeddings + 3 layers
        assert min(entry["per_layer"]) > 0.999
        assert entry["tokens"] > 8
        assert len(entry["matrix"]) == 4 and len(entry["matrix"][0]) == 4
    for cap in ("prose", "code"):
        assert report["cka"]["qwen_bpe"][cap] == {"skipped": "skipped: tokenizers differ"}


def test_interference_matrix_shows_the_change_after_each_phase(validated):
    _, report, _ = validated
    inter = report["interference"]
    assert inter["phases"] == ["noisy", "same"] and inter["delta_rows"] == ["same"]
    assert inter["capabilities"] == ["prose", "code", "quiz"]
    assert len(inter["delta"]) == 1 and len(inter["delta"][0]) == 3
    j = inter["capabilities"].index("prose")
    noisy, same = inter["retention"][0][j], inter["retention"][1][j]
    assert same == pytest.approx(report["retention"]["prose"]["value"])  # the same model, the same items
    assert inter["delta"][0][j] == pytest.approx(same - noisy)
    assert inter["metrics"]["prose"]["metric"] == "bpb"  # the noisy checkpoint tokenises like its teacher ...
    assert inter["delta_ci"][0][j][0] > 0  # ... and removing the noise clearly helps


def test_one_model_is_resident_at_a_time(validated):
    _, _, alive = validated
    assert [label for label, _ in alive] == ["student", "llama_char", "checkpoint noisy", "checkpoint same"]
    assert all(not any(prev) for _, prev in alive)  # every earlier model was freed before the next loaded


def test_teacher_scores_are_reused_from_a_matching_profile(validated, profile_teachers, students, tmp_path):
    _, report, alive = validated
    assert report["teachers"]["qwen_bpe"]["reused_profile_items"] == ["code", "prose"]
    assert "qwen_bpe" not in [label for label, _ in alive]  # nothing left to compute with it: never loaded
    fresh = load_recipe(make_recipe(tmp_path, {k: profile_teachers[k] for k in ("llama_char", "qwen_bpe")},
                                    {"reuse_profile": False, "cka": False, "student_dtype": "fp32"},
                                    capabilities=CAPS[:1]))
    rescored = run_validate(fresh, students["same"], show_progress=False)
    assert rescored["teachers"]["qwen_bpe"]["reused_profile_items"] == []
    for teacher in ("llama_char", "qwen_bpe"):
        assert rescored["per_teacher"]["prose"][teacher]["value"] == pytest.approx(
            report["per_teacher"]["prose"][teacher]["value"], rel=1e-6)


def test_every_artefact_is_written(validated):
    recipe, _, _ = validated
    out = recipe.run_path / "validate"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["report.json", "report.md", "retention.png", "feature_map.png", "heatmap-llama_char.png",
                            "lmc.png", "interference.png", "model_card.md", "manifest.json",
                            "recipe.resolved.yaml", "items.json"])
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "![retention](retention.png)" in md and "![lmc](lmc.png)" in md and "skipped: tokenizers differ" in md
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["stages"]["validate"]["lm_metric"] == "auto"


def _numbers(obj):
    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)] + [x for k in obj for x in _numbers(k)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def _strings(obj):
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)] + list(obj)
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def test_every_number_in_the_model_card_comes_from_the_report(validated):
    recipe, _, _ = validated
    out = recipe.run_path / "validate"
    report = json.loads((out / "report.json").read_text())
    card = (out / "model_card.md").read_text()
    assert card == render_model_card(report)
    assert "prose" in card and "llama_char" in card and f"{report['ci_percent']}% CI" in card
    text = card
    for s in sorted({s for s in _strings(report) if len(s) >= 3}, key=len, reverse=True):  # names and paths
        text = text.replace(s, " ")
    text = text.replace(f"{report['recipe']}-nexus", " ")
    numbers = _numbers(report)
    found = re.findall(r"\d+(?:\.\d+)?", text)
    assert len(found) > 10  # the card does carry figures
    for token in found:
        digits = len(token.split(".")[1]) if "." in token else 0
        value = float(token)
        assert any(math.isclose(round(abs(n), digits), value, abs_tol=1e-12) for n in numbers), token


def test_a_template_with_a_literal_number_is_refused(validated):
    _, report, _ = validated
    with pytest.raises(ValueError, match="literal number '95'"):
        render_model_card(report, template=MODEL_CARD_TEMPLATE.replace("{ci_percent}% CI", "95% CI"))
    with pytest.raises(ValueError, match="unknown field"):
        render_model_card(report, template="# {model_name} {no_such_field}")


# ---------------------------------------------------------------- the gate, through the CLI


@pytest.fixture(scope="module")
def gate_recipe(profile_teachers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate")
    return make_recipe(folder, {"llama_char": profile_teachers["llama_char"]},
                       {"min_retention": 0.95, "lm_metric": "bpb", "cka": False, "student_dtype": "fp32"},
                       capabilities=[CAPS[0], {**CAPS[2], "teachers": None}])


def test_the_gate_passes_a_student_that_keeps_everything(gate_recipe, students, tmp_path):
    out = CliRunner().invoke(app, [str(gate_recipe), str(students["same"]), "--out", str(tmp_path / "v"),
                                   "--quiet"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "PASSED" in out.output and "prose" in out.output
    assert json.loads((tmp_path / "v" / "report.json").read_text())["gate"]["passed"] is True


def test_the_gate_fails_a_run_made_to_regress_and_names_the_capability(gate_recipe, students, tmp_path):
    out = CliRunner().invoke(app, [str(gate_recipe), str(students["noisy"]), "--out", str(tmp_path / "v"),
                                   "--quiet"], terminal_width=200)
    assert out.exit_code == GATE_FAILED == 3, out.output
    report = json.loads((tmp_path / "v" / "report.json").read_text())  # the evidence is still written
    gate = report["gate"]
    assert gate["passed"] is False and gate["capability"] == "prose" and "prose" in gate["failed"]
    assert report["retention"]["prose"]["value"] < 0.95 and report["retention"]["prose"]["ci"][1] < 0.95
    message = " ".join(out.output.split())
    assert "gate failed" in message and "prose" in message and "0.95" in message


def test_no_gate_reports_without_failing(gate_recipe, students, tmp_path):
    out = CliRunner().invoke(app, [str(gate_recipe), str(students["noisy"]), "--out", str(tmp_path / "v"),
                                   "--quiet", "--no-gate"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "v" / "report.json").read_text())["gate"]["requested"] is False


# ---------------------------------------------------------------- bad input: one clear error, nothing written


def case_missing_student(folder, teachers, students):
    return [str(make_recipe(folder, teachers)), str(folder / "nowhere")], ["student path", "does not exist"]


def case_gate_without_threshold(folder, teachers, students):
    return [str(make_recipe(folder, teachers)), str(students["same"]), "--gate"], [
        "stages.validate.min_retention is not set"]


def case_student_without_tokenizer(folder, teachers, students):
    bare = folder / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(students["same"] / f, bare / f)
    return [str(make_recipe(folder, teachers)), str(bare)], ["student folder", "has no tokenizer"]


def case_one_checkpoint(folder, teachers, students):
    return [str(make_recipe(folder, teachers)), str(students["same"]), "--checkpoint", str(students["noisy"])], [
        "at least two checkpoints"]


def case_missing_checkpoint(folder, teachers, students):
    return [str(make_recipe(folder, teachers)), str(students["same"]), "--checkpoint", str(students["noisy"]),
            "--checkpoint", f"late={folder / 'gone'}"], ["checkpoint 2", "does not exist"]


def case_bad_lmc(folder, teachers, students):
    (folder / "lmc.json").write_text(json.dumps({"alphas": [0, 1], "scores": [0.5]}))
    return [str(make_recipe(folder, teachers)), str(students["same"]), "--lmc", str(folder / "lmc.json")], [
        "scores['score'] must be a list of 2 numbers"]


def case_bad_feature_map(folder, teachers, students):
    (folder / "fm.json").write_text(json.dumps({"_schema": "something else"}))
    return [str(make_recipe(folder, teachers)), str(students["same"]), "--feature-map", str(folder / "fm.json")], [
        "not a nexus.feature_map/1 document"]


def case_typo_in_options(folder, teachers, students):
    return [str(make_recipe(folder, teachers, {"min_retenion": 0.9})), str(students["same"])], [
        "stages.validate.min_retenion", "unknown field"]


CASES = [case_missing_student, case_gate_without_threshold, case_student_without_tokenizer, case_one_checkpoint,
         case_missing_checkpoint, case_bad_lmc, case_bad_feature_map, case_typo_in_options]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_bad_input_is_one_clear_error_and_leaves_no_report(case, profile_teachers, students, tmp_path):
    args, needles = case(tmp_path, {"llama_char": profile_teachers["llama_char"]}, students)
    out = CliRunner().invoke(app, args + ["--quiet"], terminal_width=400)
    assert out.exit_code == 2, out.output
    # the stage's memory plan line (printed before it starts) is information, not part of the error
    message = re.sub(r"^memory plan, validate: peak RAM .*?; budget [\d,]+ MiB ", "", " ".join(out.output.split()))
    assert message.startswith("error:") and "Traceback" not in out.output
    for needle in needles:
        assert needle in message
    assert not (tmp_path / "runs").exists()


def test_a_failure_while_writing_leaves_no_report_folder(gate_recipe, students, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("nexus.conversion.report_render.write_retention_plot", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_validate(load_recipe(gate_recipe), students["same"], out=tmp_path / "deep" / "v", show_progress=False)
    assert not (tmp_path / "deep").exists()


# ---------------------------------------------------------------- a two-tower student, routed by capability


@pytest.fixture(scope="module")
def two_tower_student(students, tmp_path_factory):
    """Tower 0 = the llama_char teacher's exact weights, serving prose; tower 1 = a noisy copy, serving arithmetic."""
    from nexus.modeling_nexus import NexusConfig, NexusForCausalLM

    one = NexusForCausalLM.from_pretrained(students["same"], dtype=torch.float32)
    spec = dict(one.config.towers[0])
    raw = one.config.to_dict()
    for key in ("towers", "model_type", "transformers_version", "architectures", "auto_map", "num_hidden_layers"):
        raw.pop(key, None)
    config = NexusConfig(**{**raw, "towers": [{**spec, "name": "prose", "capabilities": ["prose"]},
                                              {**spec, "name": "sums", "capabilities": ["arithmetic"]}]})
    model = NexusForCausalLM(config).eval()
    state = one.state_dict()
    torch.manual_seed(1)
    for key, value in list(state.items()):
        if key.startswith("model.towers.0."):
            state[key.replace("towers.0.", "towers.1.", 1)] = value + 0.3 * torch.randn_like(value)
    missing, _ = model.load_state_dict(state, strict=False)
    assert all(k.startswith("model.router") for k in missing), missing
    out = tmp_path_factory.mktemp("two-tower") / "student"
    model.save_pretrained(out)
    for f in students["same"].iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def test_capability_routing_scores_each_capability_on_its_own_tower(two_tower_student, profile_teachers, tmp_path):
    caps = [CAPS[0], {"name": "arithmetic", "probe": "exact_match", "data": "bundled:arithmetic",
                      "options": {"max_new_tokens": 6}}]
    recipe = load_recipe(make_recipe(tmp_path, {"llama_char": profile_teachers["llama_char"]},
                                     {"routing": "capability", "student_dtype": "fp32"}, capabilities=caps))
    report = run_validate(recipe, two_tower_student, show_progress=False)
    assert report["student"]["n_towers"] == 2 and report["student"]["capability_to_tower"] == {"prose": 0,
                                                                                               "arithmetic": 1}
    assert report["retention"]["prose"]["value"] == pytest.approx(1.0, abs=1e-6)  # tower 0 is the teacher
    assert min(report["cka"]["llama_char"]["prose"]["per_layer"]) > 0.999
    assert max(report["cka"]["llama_char"]["arithmetic"]["per_layer"][1:]) < 0.999  # the noisy tower
    # a random teacher solves no sum: no competent teacher, so no retention number; listed first instead ...
    assert "arithmetic" not in report["retention"] and "arithmetic" not in report["per_teacher"]
    arithmetic = report["no_competent_teacher"]["arithmetic"]
    assert arithmetic["teacher"] == "llama_char" and arithmetic["teacher_score"] == 0
    assert arithmetic["metric"] == "exact_match" and arithmetic["teachers"]["llama_char"]["competent"] is False
    assert report["min"]["capability"] == "prose" and report["mean"]["capabilities"] == ["prose"]  # ... left out
    assert report["competence_waived"] == ["prose"] and report["retention"]["prose"]["competent"] is False
    md = (recipe.run_path / "validate" / "report.md").read_text()
    first = md.split("\n## ")[0]  # before the first section: the top of the report
    assert "No competent teacher" in first and "arithmetic" in first
    assert "| arithmetic | llama_char | exact_match ↑ | **no competent teacher** |" in md
