"""The demo's whole flow on a few training steps: teachers, lossless imports, a profile with every capability."""

import json

from rich.console import Console

from nexus.conversion.demo import run_demo


def test_demo_flow_end_to_end_with_few_steps(tmp_path):
    summary = run_demo(tmp_path / "runs", steps=3, max_items=6, console=Console(quiet=True), show_progress=False)
    assert set(summary["imports"]) == {"arithmetic", "code", "prose"}
    assert {row["architecture"] for row in summary["imports"].values()} == {"llama", "gemma3_text", "qwen3"}
    assert all(row["max_abs_logit_diff"] <= 1e-4 for row in summary["imports"].values())
    profile = json.loads((tmp_path / "runs" / "demo" / "profile" / "profile.json").read_text())
    assert set(profile["capabilities"]) == {"prose", "code", "arithmetic"}
    for cap, by_teacher in profile["capabilities"].items():
        for row in by_teacher.values():
            if "score" in row:
                lo, hi = row["ci"]
                assert lo <= row["score"] <= hi
    written = json.loads((tmp_path / "runs" / "demo" / "demo.json").read_text())
    assert written["not_built"] == ["distill", "validate", "export", "consolidate"]
