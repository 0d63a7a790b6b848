"""Smoke test of bench/compare_methods.py + bench/results.py (issue 7) on the tiny "test" scale: two variants run
end to end (NEXUS and the dense FuseLLM-style baseline), the not-applicable / same-run entries are written with their
reasons, a rerun skips finished variants, and RESULTS.md is rendered from the JSON alone."""

import json

import pytest
from conftest import load_bench

RUN = ["nexus", "fusellm_dense_kd"]
NOT_RUN = {"mergekit_linear_ties": "not_applicable", "no_localisation": "not_a_switch",
           "no_capability_weighting": "same_run"}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    compare = load_bench("compare_methods")
    root = tmp_path_factory.mktemp("compare")
    argv = ["--scale", "test", "--out", str(root / "compare"), "--runs", str(root / "runs"), "--no-progress"]
    for name in RUN + list(NOT_RUN):
        argv += ["--only", name]
    results = compare.main(argv)
    return compare, root, argv, results


def _record(root, name):
    return json.loads((root / "compare" / f"{name}.json").read_text())


def test_each_variant_writes_one_json_with_retention_budget_and_training(compared):
    _, root, _, _ = compared
    assert sorted(p.stem for p in (root / "compare").glob("*.json")) == sorted(RUN + list(NOT_RUN))
    nexus, dense = _record(root, "nexus"), _record(root, "fusellm_dense_kd")
    for record in (nexus, dense):
        assert record["status"] == "done" and record["scale"] == "test"
        assert set(record["retention"]) == {"prose", "code", "arithmetic"}
        assert record["params"]["student"] <= record["params"]["budget"]
        for cap, entry in record["retention"].items():
            block = record["items"][cap]
            assert len(block["student"]) == len(block["teacher_rows"]) == entry["n"]
            if entry["value"] is not None:
                assert entry["ci"][0] <= entry["value"] <= entry["ci"][1]
    # the same parameter budget and the same training: steps, micro-batches, student tokens
    assert nexus["params"]["budget"] == dense["params"]["budget"]
    for key in ("steps", "tokens", "batch_size", "rows"):
        assert nexus["train"][key] == dense["train"][key], key
    # keep_best: the held-out curve (one score per checkpoint step) and the step whose weights were kept
    curve = nexus["train"]["heldout_curve"]
    assert curve and min(curve, key=lambda e: e[1]) == [nexus["train"]["best"]["step"], nexus["train"]["best"]["score"]]
    assert nexus["student"]["init"] == "teachers" and len(nexus["student"]["towers"]) == 3
    assert dense["student"]["layout"] == "dense" and len(dense["student"]["towers"]) == 1
    assert dense["student"]["init"] == "random"


def test_not_run_entries_say_why(compared):
    _, root, _, _ = compared
    for name, status in NOT_RUN.items():
        record = _record(root, name)
        assert record["status"] == status and record["reason"]
    evidence = _record(root, "mergekit_linear_ties")["evidence"]
    assert {s["model_type"] for s in evidence["teachers"].values()} == {"llama", "gemma3_text", "qwen3"}
    assert evidence["groups_sharing_an_architecture"] == []
    assert _record(root, "no_capability_weighting")["same_as"] == "magnitude_kd"


def test_a_rerun_skips_finished_variants(compared):
    compare, root, argv, _ = compared
    before = {p.name: p.read_bytes() for p in (root / "compare").glob("*.json")}
    compare.main(argv)
    assert {p.name: p.read_bytes() for p in (root / "compare").glob("*.json")} == before


def test_results_markdown_is_rendered_from_the_json(compared, tmp_path):
    _, root, _, _ = compared
    results = load_bench("results")
    other = tmp_path / "out"
    other.mkdir()
    md_path = tmp_path / "RESULTS.md"
    no_gemma = tmp_path / "no-gemma"
    text = results.main(["--compare-dir", str(root / "compare"), "--out-dir", str(other), "--md", str(md_path),
                         "--gemma-dir", str(no_gemma)])
    assert md_path.read_text() == text
    assert "## 1. Quality at equal budget" in text and "## 2. Ablations" in text and "smoke run" in text
    assert f"No comparison JSON in `{no_gemma}`" in text
    nexus, dense = _record(root, "nexus"), _record(root, "fusellm_dense_kd")
    for record in (nexus, dense):
        assert record["label"] in text
        assert results.fmt_ci(record["min"]) in text
    assert "not applicable" in text and "not a switch" in text
    assert "throughput_compare.json` not found" in text and "inference_speed.json` not found" in text
    assert (tmp_path / "RESULTS_retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the difference of a student from itself is exactly 0, and the rendered difference is the paired one
    records = results.load_compare(root / "compare")
    same = results.paired_delta(records["nexus"], records["nexus"])
    assert all(d["value"] == 0 and d["ci"] == [0.0, 0.0] for d in same["per_capability"].values())
    delta = results.paired_delta(records["fusellm_dense_kd"], records["nexus"])
    assert results.fmt_ci(delta["min"], signed=True) in text

    # the other benches' JSON: every method, ratio and memory row they hold is rendered
    (other / "throughput_compare.json").write_text(json.dumps(
        {"tokens_per_s": {"nexus_distill": 1234.0, "trl_gkd": 987.0}, "ratios": {"nexus_over_trl": 1.25},
         "peak_rss_mib": {"one_teacher": 512.0}, "config": {"steps": 4, "rounds": 3}}))
    (other / "inference_speed.json").write_text(json.dumps(
        {"note": "ratio = HF / Nexus time", "threads": 1, "results": {"llama": {
            "baseline": "LlamaForCausalLM", "dims": {"hidden": 64}, "fp32_max_abs_logit_diff": 0.0, "rows": [
                {"kind": "forward", "precision": "fp32", "hf_tokens_per_s": 100.0, "nexus_tokens_per_s": 105.0,
                 "ratio_nexus_over_hf": 1.05}]}}}))
    # the Gemma section renders a folder of its own (here the test-scale JSON, flagged as not the gemma scale)
    text = results.main(["--compare-dir", str(root / "compare"), "--out-dir", str(other), "--md", str(md_path),
                         "--gemma-dir", str(root / "compare")])
    gemma_part = text.split("## 1b.")[1].split("## 3.")[0]
    assert "(expected gemma)" in gemma_part and results.fmt_ci(nexus["min"]) in gemma_part
    assert "## 2. Ablations" in gemma_part  # the folder holds ablations, so the section shows them
    assert (tmp_path / "RESULTS_retention_gemma.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("nexus_distill", "1,234", "trl_gkd", "nexus_over_trl", "1.25", "one_teacher", "512",
                "LlamaForCausalLM", "hidden 64", "1.05"):
        assert key in text, key


def test_a_method_that_cannot_meet_the_budget_is_recorded_as_not_feasible(compared, tmp_path, monkeypatch):
    """Minitron's uniform widths cannot shrink Gemma-3-270M's 18 layers to a 7M-parameter tower: the student build's
    BudgetError becomes a JSON that says so (and is kept on a rerun), and RESULTS.md lists it with the reason."""
    compare, root, argv, _ = compared
    from nexus.conversion.budget import BudgetError

    def refuse(*args, **kwargs):
        raise BudgetError("budget of 7 params is smaller than the smallest model this allocation can build (9)")

    monkeypatch.setattr(compare, "run_variant", refuse)
    out = tmp_path / "compare"
    args = ["--scale", "test", "--out", str(out), "--runs", str(root / "runs"), "--no-progress",
            "--only", "minitron_kd"]
    results = compare.main(args)
    record = json.loads((out / "minitron_kd.json").read_text())
    assert results["minitron_kd"]["status"] == record["status"] == "not_feasible"
    assert "smallest model this allocation can build" in record["reason"]
    before = (out / "minitron_kd.json").read_bytes()
    compare.main(args)  # not retried: the budget, not the step count, made it infeasible
    assert (out / "minitron_kd.json").read_bytes() == before
    text = load_bench("results").main(["--compare-dir", str(out), "--out-dir", str(tmp_path), "--md",
                                  str(tmp_path / "R.md"), "--gemma-dir", str(tmp_path / "none")])
    assert "not feasible" in text and "smallest model this allocation can build" in text


def test_only_the_size_sweep_section_is_rewritten_from_its_json(compared, tmp_path):
    _, root, _, _ = compared
    results = load_bench("results")
    point = tmp_path / "results" / "size_sweep" / "0.25"
    point.mkdir(parents=True)
    for name in RUN:
        (point / f"{name}.json").write_text((root / "compare" / f"{name}.json").read_text())
    md = tmp_path / "RESULTS.md"
    md.write_text("# NEXUS benchmarks\n\n## 1. Kept\n\nkept text\n\n## 5. Size sweep: old\n\nold rows\n")
    title = results.size_sweep_md.TITLE
    md.write_text(md.read_text().replace("## 5. Size sweep: old", title))
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    text = md.read_text()
    assert "## 1. Kept\n\nkept text\n" in text and "old rows" not in text and text.count(title) == 1
    nexus = _record(root, "nexus")
    row = next(line for line in text.splitlines() if line.startswith("| 0.25 | nexus |"))
    assert f"{nexus['params']['student']:,}" in row and results.fmt_ci(nexus["min"]) in row
    assert "| 0.25 | min ≥ 0.92 | " + results.fmt_ci(nexus["min"]) + " |" in text  # the goal at that point, with the measured minimum
    delta = results.paired_delta(_record(root, "fusellm_dense_kd"), nexus)
    assert f"| 0.25 | fusellm_dense_kd | {results.fmt_ci(delta['min'], signed=True)} |" in text
    # a long-budget run (size_sweep.py --long) is a row of its own, and the goals are read off it (more tokens)
    long = dict(nexus, train=dict(nexus["train"], steps=700, tokens=1_040_000),
                min={"value": 0.5, "ci": [0.4, 0.6]})
    (point / "long").mkdir()
    (point / "long" / "nexus.json").write_text(json.dumps(long))
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 0.25 | nexus (long) |"))
    assert "1,040,000 (700 steps)" in row
    assert "| 0.25 | min ≥ 0.92 | 0.500 [0.400, 0.600] | **missed** |" in text
    assert "| 0.25 | train tokens ≥ 1,000,000 | 1,040,000 | met |" in text
    # a long run of an older base recipe is shown but not paired, and the goals fall back to the default run
    (point / "long" / "nexus.json").write_text(json.dumps(dict(long, base_recipe_sha256="0" * 64)))
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    text = md.read_text()
    assert "| 0.25 | min ≥ 0.92 | " + results.fmt_ci(nexus["min"]) + " |" in text
    assert "predates its base recipe" in text and results.ablation_md.UNPAIRED in text
    # a second section appended when absent, the first kept
    md.write_text("# NEXUS benchmarks\n\n## 1. Kept\n\nkept text\n")
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    assert md.read_text().startswith("# NEXUS benchmarks\n\n## 1. Kept\n\nkept text\n\n" + title)


def test_sweep_ablations_and_the_claims_table_come_from_the_json(compared, tmp_path):
    _, root, _, _ = compared
    results = load_bench("results")
    point = tmp_path / "results" / "size_sweep" / "0.25"
    point.mkdir(parents=True)
    (point / "nexus.json").write_text((root / "compare" / "nexus.json").read_text())
    (point / "no_localisation.json").write_text((root / "compare" / "no_localisation.json").read_text())
    switched = _record(root, "fusellm_dense_kd")  # stands in for a finished ablation run (LMC off)
    switched.update(variant="no_lmc", group="ablation", label="LMC off")
    (point / "no_lmc.json").write_text(json.dumps(switched))
    md = tmp_path / "RESULTS.md"
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    text = md.read_text()
    nexus = _record(root, "nexus")
    delta = results.paired_delta(switched, nexus)
    # the ablation is a row of its own table (not a baseline row), with its paired difference from NEXUS
    row = next(line for line in text.splitlines() if line.startswith("| 0.25 | LMC off |"))
    assert results.fmt_ci(delta["min"], signed=True) in row and results.verdict(delta["min"]) in row
    assert not any(line.startswith("| 0.25 | no_lmc |") for line in text.splitlines())
    assert "localisation off**: not_a_switch" in text
    # the claims: NIWT's retention claim checked per capability at that point; LMC's with the stage's own effect
    claims = text[text.index(results.claims_md.TITLE):]
    niwt = next(line for line in claims.splitlines() if line.startswith("| NIWT keeps 93–97% of each capability | 0.25 |"))
    assert all(results.fmt_ci(e) in niwt for e in nexus["retention"].values())
    worst = min(e["ci"][1] for e in nexus["retention"].values() if e["ci"])  # tiny teachers: some undefined
    assert ("**refuted (worse)**" in niwt) == (worst < 0.93)
    lmc = next(line for line in claims.splitlines() if line.startswith("| LMC 90–95% | 0.25 |"))
    effect = {"value": -delta["min"]["value"], "ci": [-delta["min"]["ci"][1], -delta["min"]["ci"][0]]}
    assert results.fmt_ci(effect, signed=True) in lmc
    # a claim whose runs are missing says so instead of a figure
    assert "| traditional KD loses 15–20% | – | the runs it needs are not in the sweep yet | not measured |" in claims


def test_paired_deltas_accept_teacher_rows_equal_to_float_noise_only(compared):
    """Two runs that scored the teacher separately (bf16) differ in the last digits on the same items: still paired;
    rows that differ more are other items, so no paired difference is claimed."""
    _, root, _, _ = compared
    results = load_bench("results")
    nexus = _record(root, "nexus")

    def scaled(factor):
        record = json.loads(json.dumps(nexus))
        for block in record["items"].values():
            block["teacher_rows"] = [[v * factor if isinstance(v, float) else v for v in row] if isinstance(row, list)
                                     else row * factor for row in block["teacher_rows"]]
        return record

    close = results.paired_delta(scaled(1 + 1e-6), nexus)
    assert close is not None and set(close["per_capability"]) <= set(nexus["retention"])
    assert results.paired_delta(scaled(1 + 1e-2), nexus) is None


def test_runs_of_another_base_recipe_are_not_paired(compared, tmp_path):
    """Every record names its base recipe; an ablation built from another one (or from before the hash was recorded)
    gets no paired difference, and its table row says to re-run it instead of a verdict."""
    compare, root, _, _ = compared
    results, ablation = load_bench("results"), load_bench("ablation_section")
    nexus, dense = _record(root, "nexus"), _record(root, "fusellm_dense_kd")
    assert len(nexus["base_recipe_sha256"]) == 64 and nexus["base_recipe_sha256"] == dense["base_recipe_sha256"]
    assert results.paired_delta(dense, nexus) is not None
    raw = {"name": "compare", "run_dir": "/a", "stages": {"student_build": {"allocation": "dynamic"}}}
    moved = {**raw, "run_dir": "/b"}  # the run folder is not part of the recipe
    other = {**raw, "stages": {"student_build": {}}}
    assert compare.base_recipe_sha256(raw) == compare.base_recipe_sha256(moved) != compare.base_recipe_sha256(other)
    for sha in ("0" * 64, None):
        switched = {**dense, "variant": "no_lmc", "group": "ablation", "label": "LMC off", "base_recipe_sha256": sha}
        assert results.paired_delta(switched, nexus) is None
        assert results.unpaired_reason(switched, nexus)
        rows, _ = ablation.ablation_rows("0.25", {"nexus": nexus, "no_lmc": switched}, results.paired_delta,
                                         results.verdict, results.fmt_ci)
        assert rows[0][-1] == ablation.UNPAIRED and rows[0][-2] == "–"


def test_runs_resolved_with_other_code_defaults_are_not_paired(compared, llama_dir, tmp_path):
    """The file's hash cannot see a changed code default; the resolved recipe's hash can. Two records that carry it
    pair only when it matches; a record from before it was recorded still pairs by the file's hash."""
    compare, root, _, _ = compared
    results = load_bench("results")
    nexus, dense = _record(root, "nexus"), _record(root, "fusellm_dense_kd")
    assert len(nexus["resolved_recipe_sha256"]) == 64
    assert nexus["resolved_recipe_sha256"] == dense["resolved_recipe_sha256"]
    assert results.paired_delta(dense, nexus) is not None
    other_defaults = {**dense, "resolved_recipe_sha256": "1" * 64}
    assert results.paired_delta(other_defaults, nexus) is None
    assert "code defaults" in results.unpaired_reason(other_defaults, nexus)
    older = {k: v for k, v in dense.items() if k != "resolved_recipe_sha256"}
    assert results.paired_delta(older, nexus) is not None
    from nexus.conversion.recipe import validate_recipe

    raw = {"name": "r", "run_dir": str(tmp_path / "run"), "teachers": [{"name": "t", "source": str(llama_dir)}],
           "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose"}],
           "stages": {"student_build": {}}}
    base = validate_recipe(raw, base_dir=tmp_path)
    explicit = validate_recipe({**raw, "stages": {"student_build": {"keep_top_by": "teacher_mass"}}}, base_dir=tmp_path)
    changed = validate_recipe({**raw, "stages": {"student_build": {"keep_top_by": "id"}}}, base_dir=tmp_path)
    # writing a default out changes the file's hash but not the resolved one; changing it changes both
    assert compare.base_recipe_sha256(raw) != compare.base_recipe_sha256(
        {**raw, "stages": {"student_build": {"keep_top_by": "teacher_mass"}}})
    assert compare.resolved_recipe_sha256(base) == compare.resolved_recipe_sha256(explicit)
    assert compare.resolved_recipe_sha256(base) != compare.resolved_recipe_sha256(changed)
    # an optional stage the comparison's base recipe does not run (align, registered later) leaves it unchanged
    aligned = validate_recipe({**raw, "stages": {"student_build": {}, "align": {"method": "linear"}}},
                              base_dir=tmp_path)
    assert "align" in aligned.stages and "align" not in compare.HASHED_STAGES
    assert compare.resolved_recipe_sha256(base) == compare.resolved_recipe_sha256(aligned)


def test_a_remeasured_ablation_pairs_with_its_own_nexus_run(compared, tmp_path):
    """An ablation re-run with its own NEXUS arm in a folder of their own (size_sweep.py --results-dir) is rendered
    paired against that arm, with the command that made it; a folder with no NEXUS run renders nothing."""
    _, root, _, _ = compared
    results, ablation = load_bench("results"), load_bench("ablation_section")
    nexus, dense = _record(root, "nexus"), _record(root, "fusellm_dense_kd")
    switched = {**dense, "variant": "localisation_on", "group": "ablation", "label": "localisation ON"}
    point = tmp_path / "again" / "0.25"
    point.mkdir(parents=True)
    (point / "nexus.json").write_text(json.dumps(nexus))
    (point / "localisation_on.json").write_text(json.dumps(switched))
    lines = ablation.remeasured_lines(tmp_path / "again", results.load_compare, results.paired_delta,
                                      results.verdict, results.fmt_ci, results.md_table)
    text = "\n".join(lines)
    delta = results.paired_delta(switched, nexus)
    assert delta is not None
    steps = nexus["train"]["steps"]
    assert f"--methods nexus localisation_on --steps {steps} --results-dir bench/results/again" in text
    assert "against the committed sweep" not in text  # no reference given
    reference = tmp_path / "committed" / "0.25"
    reference.mkdir(parents=True)
    shorter = {**nexus, "train": {**nexus["train"], "steps": steps // 2}}
    (reference / "nexus.json").write_text(json.dumps(shorter))
    text = "\n".join(ablation.remeasured_lines(tmp_path / "again", results.load_compare, results.paired_delta,
                                               results.verdict, results.fmt_ci, results.md_table,
                                               reference=tmp_path / "committed"))
    step_delta = results.paired_delta(nexus, shorter)
    assert step_delta is not None
    assert (f"against the committed sweep's NEXUS at {steps // 2} steps" in text
            and f"paired Δ min {results.fmt_ci(step_delta['min'], signed=True)}" in text)
    row = next(line for line in text.splitlines() if line.startswith("| 0.25 | localisation ON"))
    assert results.fmt_ci(delta["min"], signed=True) in row and results.verdict(delta["min"]) in row
    (point / "nexus.json").unlink()
    assert ablation.remeasured_lines(tmp_path / "again", results.load_compare, results.paired_delta,
                                     results.verdict, results.fmt_ci, results.md_table) == []
    assert ablation.remeasured_lines(tmp_path / "missing", results.load_compare, results.paired_delta,
                                     results.verdict, results.fmt_ci, results.md_table) == []


def test_a_remeasurement_with_baselines_pairs_each_against_nexus_and_each_option(compared, tmp_path):
    """A re-measurement on another base recipe (size_sweep.py --distill-tokens all --results-dir D) holding a baseline
    and a switched-on option: the baseline gets its paired difference from NEXUS, the option its difference from the
    baseline, and the command that made them names the recipe change."""
    _, root, _, _ = compared
    results, ablation = load_bench("results"), load_bench("ablation_section")
    nexus = {**_record(root, "nexus"), "base_overrides": {"distill": {"tokens": None}}}
    dense = {**_record(root, "fusellm_dense_kd"), "base_overrides": nexus["base_overrides"]}
    option = {**dense, "variant": "manifold_on", "group": "ablation", "label": "manifold ON"}
    baseline = {**nexus, "variant": "minitron_kd", "group": "baseline",
                "min": {**nexus["min"], "value": nexus["min"]["value"] + 0.5}}  # a different headline, same items
    point = tmp_path / "all_text" / "0.25"
    point.mkdir(parents=True)
    for name, record in (("nexus", nexus), ("minitron_kd", baseline), ("manifold_on", option)):
        (point / f"{name}.json").write_text(json.dumps(record))
    text = "\n".join(ablation.remeasured_lines(tmp_path / "all_text", results.load_compare, results.paired_delta,
                                               results.verdict, results.fmt_ci, results.md_table))
    assert (f"--methods nexus minitron_kd manifold_on --steps {nexus['train']['steps']} --distill-tokens all "
            "--results-dir bench/results/all_text" in text)
    vs_nexus = results.paired_delta(baseline, nexus)
    row = next(line for line in text.splitlines() if line.startswith("| 0.25 | minitron_kd |"))
    assert results.fmt_ci(baseline["min"]) in row and results.fmt_ci(vs_nexus["min"], signed=True) in row
    vs_baseline = results.paired_delta(option, baseline)
    assert vs_baseline is not None
    row = next(line for line in text.splitlines() if line.startswith("| 0.25 | manifold ON | minitron_kd |"))
    assert results.fmt_ci(vs_baseline["min"], signed=True) in row
    assert row.endswith(f"| {ablation.option_verdict(vs_baseline['min'], results.verdict)} |")
    # option - baseline: a CI below 0 is the baseline's win, above 0 the option's
    assert ablation.option_verdict({"value": -0.014, "ci": [-0.020, -0.008]}, results.verdict) == "**baseline better**"
    assert ablation.option_verdict({"value": 0.02, "ci": [0.01, 0.03]}, results.verdict) == "**option better**"
    assert ablation.option_verdict({"value": 0.0, "ci": [-0.01, 0.01]}, results.verdict) == "no clear difference"
    # a baseline of another base recipe is listed but not paired
    (point / "minitron_kd.json").write_text(json.dumps({**baseline, "base_recipe_sha256": "0" * 64}))
    text = "\n".join(ablation.remeasured_lines(tmp_path / "all_text", results.load_compare, results.paired_delta,
                                               results.verdict, results.fmt_ci, results.md_table))
    row = next(line for line in text.splitlines() if line.startswith("| 0.25 | minitron_kd |"))
    assert row.endswith(f"| {ablation.UNPAIRED} |")


def test_the_size_sweep_takes_all_of_the_text_only_into_a_folder_of_its_own(capsys):
    """--distill-tokens changes every arm's base recipe: 'all' or a positive count, and only with --results-dir (the
    runs pair only with each other); a bad value names itself."""
    sweep = load_bench("size_sweep")
    assert sweep.distill_tokens("all") is None and sweep.distill_tokens("5000") == 5000
    for bad in ("0", "-3", "lots"):
        with pytest.raises(Exception, match=f"got '{bad}'"):
            sweep.distill_tokens(bad)
    import sys

    argv = sys.argv
    sys.argv = ["size_sweep.py", "--points", "0.25", "--methods", "nexus", "--distill-tokens", "all"]
    try:
        with pytest.raises(SystemExit):
            sweep.main()
    finally:
        sys.argv = argv
    assert "--results-dir" in capsys.readouterr().err
    sweep.register_point(0.25, 100, distill={"tokens": None})
    scale = sweep.compare_methods.SCALES["sweep-0.25"]
    assert scale["overrides"]["distill"] == {"tokens": None}
    assert "budget_fraction" in scale["overrides"]["student_build"]
