"""The profile stage end to end on tiny teachers of two families and two tokenizers, and every bad input."""

import gc
import json
import re
import weakref

import pytest
import torch
import yaml
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.profile import load_profile, run_profile
from nexus.conversion.profile_report import profile_table
from nexus.conversion.recipe import load_recipe

FAST = {"max_items": 4, "n_bootstrap": 100, "window_tokens": 64, "batch_size": 8, "compute": "native"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_recipe(folder, teachers, capabilities=None, name="tiny", **extra):
    (folder / "quiz.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1)], "answer": 0}) + "\n"
        for a in range(5)))
    raw = {
        "name": name,
        "teachers": [{"name": n, "source": str(p), "dtype": "fp32"} for n, p in teachers.items()],
        "capabilities": capabilities or [
            {"name": "prose", "probe": "lm", "data": "bundled:prose", "reference": True},
            {"name": "code", "probe": "lm", "data": "bundled:code"},
            {"name": "arithmetic", "probe": "exact_match", "data": "bundled:arithmetic", "weight": 2,
             "options": {"max_new_tokens": 6}},
            {"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl", "teachers": ["llama_char"]},
        ],
        "stages": {"profile": FAST},
        **extra,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def two_teachers(profile_teachers):
    return {k: profile_teachers[k] for k in ("llama_char", "qwen_bpe")}


@pytest.fixture(scope="module")
def profiled(two_teachers, tmp_path_factory):
    """One profile run shared by the schema tests: (recipe, result, ids of models alive at each load)."""
    folder = tmp_path_factory.mktemp("profiled")
    recipe = load_recipe(make_recipe(folder, two_teachers))
    alive = []
    previous = []

    def check_alone(name, model):
        gc.collect()
        alive.append((name, [ref() is not None for ref in previous]))
        previous.append(weakref.ref(model))

    result = run_profile(recipe, show_progress=False, on_teacher_loaded=check_alone)
    return recipe, result, alive


def test_profile_json_has_the_documented_shape(profiled):
    recipe, result, _ = profiled
    on_disk = load_profile(recipe.run_path)
    assert on_disk["capabilities"] == result["capabilities"]
    assert set(on_disk["capabilities"]) == {"prose", "code", "arithmetic", "quiz"}
    for cap, by_teacher in on_disk["capabilities"].items():
        expected = {"llama_char"} if cap == "quiz" else {"llama_char", "qwen_bpe"}
        assert set(by_teacher) == expected
        for entry in by_teacher.values():
            assert {"metric", "score", "ci", "n", "higher_is_better"} <= set(entry)
            lo, hi = entry["ci"]
            assert lo <= entry["score"] <= hi and entry["n"] == 4
        higher = next(iter(by_teacher.values()))["higher_is_better"]
        scores = {t: e["score"] for t, e in by_teacher.items()}
        assert scores[on_disk["best"][cap]] == (max if higher else min)(scores.values())
        base = on_disk["baselines"][cap]
        assert {"metric", "score", "ci", "n", "kind"} <= set(base)
        assert set(on_disk["competent"][cap]) == expected
    assert on_disk["capabilities"]["prose"]["llama_char"]["metric"] == "bpb"
    assert on_disk["capabilities"]["arithmetic"]["qwen_bpe"]["metric"] == "exact_match"
    assert on_disk["baselines"]["quiz"]["score"] == pytest.approx(0.5)  # chance with two choices
    assert on_disk["weights"]["arithmetic"] == 2
    memory = on_disk["memory"]
    assert memory["peak_rss_bytes"] > 0 and set(memory["per_teacher"]) == {"llama_char", "qwen_bpe"}
    assert memory["largest_teacher_bf16_bytes"] == 2 * max(t["params"] for t in on_disk["teachers"].values())


def test_profile_writes_every_artefact_and_nothing_else(profiled):
    recipe, result, _ = profiled
    run = recipe.run_path
    assert sorted(p.name for p in run.iterdir()) == ["profile", "recipe.resolved.yaml"]
    out = run / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "items.json", "manifest.json", "profile.json"]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    items = json.loads((out / "items.json").read_text())
    assert len(items["prose"]["qwen_bpe"]) == result["capabilities"]["prose"]["qwen_bpe"]["n"]
    assert {"nll", "bytes", "tokens", "correct"} <= set(items["prose"]["qwen_bpe"][0])
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert resolved["stages"]["profile"]["max_items"] == 4


def test_one_teacher_is_resident_at_a_time(profiled):
    _, _, alive = profiled
    assert [name for name, _ in alive] == ["llama_char", "qwen_bpe"]
    assert alive[1][1] == [False]  # when qwen_bpe loaded, llama_char's model had been freed


def test_table_shows_scores_cis_best_and_baseline(profiled):
    from rich.console import Console

    _, result, _ = profiled
    console = Console(width=200, record=True)
    console.print(profile_table(result))
    text = console.export_text()
    assert "llama_char" in text and "qwen_bpe" in text and "(baseline)" in text and "*" in text
    lo, hi = result["capabilities"]["code"]["qwen_bpe"]["ci"]
    assert f"[{lo:.3f}, {hi:.3f}]" in text


def test_rerun_reuses_then_force_and_changed_inputs_rescore(two_teachers, tmp_path):
    recipe = load_recipe(make_recipe(tmp_path, two_teachers, capabilities=[
        {"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl"}]))
    first = run_profile(recipe, show_progress=False)
    assert first["reused"] is False
    assert run_profile(recipe, show_progress=False)["reused"] is True
    assert run_profile(recipe, show_progress=False, force=True)["reused"] is False
    (tmp_path / "quiz.jsonl").write_text(json.dumps({"prompt": "1", "choices": ["a", "b", "c"], "answer": 1}) + "\n")
    changed = run_profile(load_recipe(tmp_path / "recipe.yaml"), show_progress=False)
    assert changed["reused"] is False and changed["capabilities"]["quiz"]["llama_char"]["n"] == 1


def test_a_teacher_that_cannot_be_scored_is_skipped_with_its_reason(profile_teachers, tmp_path):
    teachers = {"qwen_bpe": profile_teachers["qwen_bpe"], "gemma_digits": profile_teachers["gemma_digits"]}
    recipe = load_recipe(make_recipe(tmp_path, teachers, capabilities=[
        {"name": "prose", "probe": "lm", "data": "bundled:prose"},
        {"name": "arithmetic", "probe": "exact_match", "data": "bundled:arithmetic"}]))
    result = run_profile(recipe, show_progress=False)
    assert set(result["capabilities"]["prose"]) == {"qwen_bpe"}
    assert "<unk>" in result["skipped"]["prose"]["gemma_digits"]
    assert set(result["capabilities"]["arithmetic"]) == {"qwen_bpe", "gemma_digits"}  # gemma3 family scored here


def test_cli_profile_prints_the_table(two_teachers, tmp_path):
    path = make_recipe(tmp_path, two_teachers, capabilities=[
        {"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl"}])
    out = CliRunner().invoke(app, ["profile", str(path), "--quiet"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "quiz" in out.output and "accuracy" in out.output and "peak RSS" in out.output
    assert (tmp_path / "runs" / "tiny" / "profile" / "profile.json").is_file()


# ---------------------------------------------------------------- bad input: clear error, no run folder


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def case_missing_teacher(folder, teachers):
    teachers = {**teachers, "ghost": folder / "no_such_model"}
    return make_recipe(folder, teachers), ["teachers[2].source", "does not exist"]


def case_pickle_only(folder, teachers):
    pickled = folder / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((teachers["llama_char"] / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    return make_recipe(folder, {"p": pickled}), ["teachers[0].source", "pickle"]


def case_unknown_probe(folder, teachers):
    caps = [{"name": "prose", "probe": "perplexity", "data": "bundled:prose"}]
    return make_recipe(folder, teachers, caps), ["capabilities[0].probe", "unknown probe 'perplexity'",
                                                 "registered probes: exact_match, lm, lm_eval, multiple_choice"]


def case_empty_data(folder, teachers):
    (folder / "empty.txt").write_text("")
    caps = [{"name": "prose", "probe": "lm", "data": "empty.txt"}]
    return make_recipe(folder, teachers, caps), ["capabilities[0].data", f"{folder / 'empty.txt'} is empty"]


def case_malformed_jsonl(folder, teachers):
    _jsonl(folder / "broken.jsonl", [{"prompt": "1+1=", "answer": "2"}, '{"prompt": "2+2=", "answer": '])
    caps = [{"name": "sums", "probe": "exact_match", "data": "broken.jsonl"}]
    return make_recipe(folder, teachers, caps), [f"{folder / 'broken.jsonl'} line 2: not valid JSON"]


def case_no_answers(folder, teachers):
    _jsonl(folder / "noanswer.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])
    caps = [{"name": "sums", "probe": "exact_match", "data": "noanswer.jsonl"}]
    return make_recipe(folder, teachers, caps), [f"{folder / 'noanswer.jsonl'} line 1: missing 'answer'"]


def case_nobody_can_be_scored(folder, teachers, digits):
    caps = [{"name": "prose", "probe": "lm", "data": "bundled:prose", "teachers": ["gemma_digits"]}]
    return make_recipe(folder, {**teachers, "gemma_digits": digits}, caps), [
        "no teacher can be scored on capability 'prose'", "gemma_digits:", "<unk>"]


def case_empty_teacher_list(folder, teachers):
    caps = [{"name": "prose", "probe": "lm", "data": "bundled:prose", "teachers": []}]
    return make_recipe(folder, teachers, caps), ["capabilities[0].teachers", "no teacher can be scored"]


CASES = [case_missing_teacher, case_pickle_only, case_unknown_probe, case_empty_data, case_malformed_jsonl,
         case_no_answers, case_nobody_can_be_scored, case_empty_teacher_list]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_bad_input_is_one_clear_error_and_leaves_no_run_folder(case, two_teachers, profile_teachers, tmp_path):
    args = (tmp_path, two_teachers) + ((profile_teachers["gemma_digits"],) if "nobody" in case.__name__ else ())
    path, needles = case(*args)
    out = CliRunner().invoke(app, ["profile", str(path), "--quiet"], terminal_width=400)
    assert out.exit_code == 2, out.output
    # the stage's memory plan line (printed before it starts) is information, not part of the error
    message = re.sub(r"^memory plan, profile: peak RAM .*?; budget [\d,]+ MiB ", "", " ".join(out.output.split()))
    assert message.startswith("error:") and "Traceback" not in out.output
    for needle in needles:
        assert " ".join(needle.split()) in message
    assert not (tmp_path / "runs").exists()


def test_a_failure_while_scoring_removes_the_new_run_folder(two_teachers, tmp_path, monkeypatch):
    recipe = load_recipe(make_recipe(tmp_path, two_teachers, capabilities=[
        {"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl"}]))

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("nexus.conversion.profile_report.write_profile_heatmap", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_profile(recipe, show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_failure_keeps_an_existing_runs_previous_profile(two_teachers, tmp_path, monkeypatch):
    recipe = load_recipe(make_recipe(tmp_path, two_teachers, capabilities=[
        {"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl"}]))
    before = run_profile(recipe, show_progress=False)
    saved = (recipe.run_path / "profile" / "profile.json").read_text()
    monkeypatch.setattr("nexus.conversion.profile_report.write_profile_heatmap",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        run_profile(recipe, show_progress=False, force=True)
    assert (recipe.run_path / "profile" / "profile.json").read_text() == saved
    assert sorted(p.name for p in recipe.run_path.iterdir()) == ["profile", "recipe.resolved.yaml"]
    assert before["reused"] is False


def test_sigterm_during_scoring_removes_the_new_run_folder(two_teachers, tmp_path):
    import os
    import signal

    recipe = load_recipe(make_recipe(tmp_path, two_teachers, capabilities=[
        {"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl"}]))
    with pytest.raises(SystemExit):
        run_profile(recipe, show_progress=False, on_teacher_loaded=lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    assert not (tmp_path / "runs").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed afterwards
