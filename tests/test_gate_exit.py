"""A failed validation gate ends `nexus consolidate` and `nexus demo` with exit code 3 (as `nexus validate`), the
failing capabilities printed last; a passed gate exits 0."""

import json

from test_distill_stage import consolidate_recipe_file, two_teachers  # noqa: F401  (fixture)
from typer.testing import CliRunner

from nexus.cli import app
from nexus.gate_exit import GATE_FAILED


def _last_line(result):
    return [line for line in result.output.splitlines() if line.strip()][-1]


def test_consolidate_exits_3_and_names_the_failing_capabilities_last(two_teachers, tmp_path):  # noqa: F811
    recipe = consolidate_recipe_file(two_teachers, tmp_path, steps=1, min_retention=1000.0)  # unreachable
    result = CliRunner().invoke(app, ["consolidate", str(recipe), "--quiet"], terminal_width=300)
    assert result.exit_code == GATE_FAILED == 3, result.output
    report = json.loads((tmp_path / "runs" / "tiny" / "validate" / "report.json").read_text())
    assert report["gate"]["passed"] is False and set(report["gate"]["failed"]) == {"prose", "code"}
    last = _last_line(result)
    assert last.startswith("gate failed:") and "prose" in last and "code" in last, last


def _fake_demo(gate):
    def run_demo(*args, **kwargs):
        return {"gate": gate}
    return run_demo


def test_demo_exits_3_when_its_gate_fails(monkeypatch, tmp_path):
    import nexus.conversion.demo as demo

    gate = {"requested": True, "passed": False, "threshold": 0.95, "failed": ["code", "arithmetic"],
            "reason": "min retention 0.400 < 0.95"}
    monkeypatch.setattr(demo, "run_demo", _fake_demo(gate))
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--quiet"], terminal_width=300)
    assert result.exit_code == 3, result.output
    assert _last_line(result) == "gate failed: min retention 0.400 < 0.95; capabilities below 0.95: code, arithmetic"


def test_demo_exits_0_when_its_gate_passes(monkeypatch, tmp_path):
    import nexus.conversion.demo as demo

    monkeypatch.setattr(demo, "run_demo", _fake_demo({"requested": True, "passed": True, "threshold": 0.95,
                                                       "failed": [], "reason": "ok"}))
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
