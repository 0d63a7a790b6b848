"""The whole demo on its tiny "test" scale: specialists -> profile -> student build -> distill -> validate -> export,
with the report's schema checked and every number of the exported model card traced back to report.json."""

import json
import re

from rich.console import Console

from nexus.conversion.demo import run_demo
from nexus.conversion.report_render import fmt
from nexus.hub.card_paths import absolute_paths_in, card_with_paths, load_path_for


def _numbers(text):
    return set(re.findall(r"\d+(?:\.\d+)?", text))


def _report_numbers(obj, out):
    """Every number the report holds, as the card formats it (ints as they are, floats to 3 decimals), plus every
    number inside its strings (paths, names)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= _numbers(str(k))
            _report_numbers(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _report_numbers(v, out)
    elif isinstance(obj, bool) or obj is None:
        pass
    elif isinstance(obj, (int, float)):
        out |= _numbers(fmt(obj)) | _numbers(str(obj))
    else:
        out |= _numbers(str(obj))
    return out


def test_demo_runs_every_stage_end_to_end_on_the_test_scale(tmp_path):
    summary = run_demo(tmp_path / "runs", console=Console(quiet=True), show_progress=False, scale="test")
    run = tmp_path / "runs" / "demo"
    assert {row["architecture"] for row in summary["imports"].values()} == {"llama", "gemma3_text", "qwen3"}
    assert all(row["max_abs_logit_diff"] <= 1e-4 for row in summary["imports"].values())

    # profile -> a best teacher per capability: each specialist at its own, so the student has one tower per
    # (distinct) best teacher, i.e. one per capability, within 1/3 of the teachers. The 3-step arithmetic specialist
    # solves no sum: no teacher is competent at arithmetic (flagged; the test scale keeps it with
    # require_competent_teacher: false)
    profile = json.loads((run / "profile" / "profile.json").read_text())
    assert set(profile["best"]) == {"prose", "code", "arithmetic"}
    assert profile["no_competent_teacher"] == ["arithmetic"]
    build = json.loads((run / "student_build" / "student_build.json").read_text())
    assert [t["capability"] for t in build["towers"]] == ["prose", "code", "arithmetic"]
    assert [t["teacher"] for t in build["towers"]] == [profile["best"][c] for c in ("prose", "code", "arithmetic")]
    assert build["capability_to_tower"] == {"prose": 0, "code": 1, "arithmetic": 2}
    assert build["params"] <= build["teacher_params_total"] / 3

    # distill: router accuracy and cache bytes/token measured and written
    distill = json.loads((run / "distill" / "distill.json").read_text())
    assert 0.0 <= distill["router_accuracy"]["overall"] <= 1.0 and distill["router_accuracy"]["n"] > 0
    assert len(distill["bytes_per_token"]) == 3 and all(v > 0 for v in distill["bytes_per_token"].values())
    assert (run / "distill" / "student" / "model.safetensors").is_file()

    # validate: the report schema of issue 6
    report = json.loads((run / "validate" / "report.json").read_text())
    assert set(report["retention"]) == {"prose", "code", "arithmetic"}
    assert report["no_competent_teacher"] == {} and report["competence_waived"] == ["arithmetic"]
    for cap, entry in report["retention"].items():
        assert {"value", "ci", "teacher"} <= set(entry) and entry["teacher"] == profile["best"][cap]
        if entry["value"] is not None:
            lo, hi = entry["ci"]
            assert lo <= entry["value"] <= hi
    defined = [e["value"] for e in report["retention"].values() if e["value"] is not None]
    assert report["min"]["value"] == min(defined)
    assert {"value", "ci"} <= set(report["mean"])
    assert report["student_params"] == build["params"]
    assert set(report["teacher_params"]) == {"arithmetic-specialist", "code-specialist", "prose-specialist"}
    assert summary["min"] == report["min"] and summary["retention"]["code"]["value"] == report["retention"]["code"]["value"]

    # export: a self-contained folder whose model card has only numbers from report.json
    export = run / "export"
    for name in ("model.safetensors", "config.json", "modeling_nexus.py", "tokenizer.json", "model_card.md",
                 "README.md"):
        assert (export / name).is_file(), name
    card = (export / "model_card.md").read_text()
    # the validation card, its usage snippet loading the export folder and no absolute local path left
    assert card == card_with_paths((run / "validate" / "model_card.md").read_text(), load_path_for(export))
    assert f'from_pretrained("{load_path_for(export)}", trust_remote_code=True)' in card and not absolute_paths_in(card)
    allowed = _report_numbers(report, set())
    stray = _numbers(card) - allowed
    assert not stray, f"numbers in the model card that report.json does not hold: {sorted(stray)}"
    for cap, entry in report["retention"].items():
        assert f"| {cap} | {entry['teacher']} |" in card and fmt(entry["value"]) in card
    assert fmt(report["student_params"]) in card

    written = json.loads((run / "demo.json").read_text())
    assert written["scale"] == "test" and set(written["seconds"]) >= {"specialists", "distill", "validate", "total"}
