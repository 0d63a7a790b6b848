"""RESULTS.md §10 is rendered from the gemma-pair comparison JSON: one row per run (two towers, OT, TIES), the paired
difference from two towers with who wins, the merges' held-out losses, and what has not run; and the claims table
checks the OT claim on that pair."""

import json

from conftest import load_bench


def _record(name, order, prose, code, towers, merged=None):
    ret = {"prose": {"value": prose, "ci": [prose - 0.01, prose + 0.01], "teacher": "gemma"},
           "code": {"value": code, "ci": [code - 0.01, code + 0.01], "teacher": "gemma-code"}}
    low = min(prose, code)
    return {"schema": "nexus.bench.compare/1", "variant": name, "order": order, "group": "ablation",
            "label": f"label {name}", "status": "done", "retention": ret,
            "min": {"value": low, "ci": [low - 0.01, low + 0.01]},
            "mean": {"value": (prose + code) / 2, "ci": [0.0, 1.0]},
            "params": {"student": 1000, "budget": 1200}, "train": {"steps": 100, "tokens": 30000},
            "student": {"towers": [{}] * towers},
            "align": {"merged": merged} if merged is not None else None}


def _write(folder, *records):
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        (folder / f"{r['variant']}.json").write_text(json.dumps(r))


DELTAS = {"align_ot": 0.05, "align_ties": -0.04, "nexus": 0.0, "align_linear": 0.0}


def _fake_delta(variant, nexus):
    v = DELTAS[variant["variant"]]
    return {"min": {"value": v, "ci": [v - 0.01, v + 0.01]}}


def _align_json(path):
    loss = {"prose": {"teacher": "gemma", "own_teacher": 3.9, "merged": 3.75, "plain_average": 3.75, "tokens": 1016}}
    path.write_text(json.dumps({"methods": {
        "ot": {"merged": [{"heldout_loss": loss, "steps": [{"neurons_moved": 0, "neurons": 36864, "heads_moved": 0}]}],
               "signatures": {}},
        "ties": {"merged": [{"heldout_loss": {"prose": {**loss["prose"], "merged": 3.8}}, "steps": [{"base": "g"}]}],
                 "signatures": {}}}}))
    return path


def test_align_section_rows_deltas_losses_and_what_is_missing(tmp_path):
    results, section = load_bench("results"), load_bench("align_section")
    _write(tmp_path / "gemma_pair", _record("nexus", 0, 0.80, 0.70, 2), _record("align_ot", 1, 0.85, 0.75, 1),
           _record("align_ties", 2, 0.78, 0.66, 1))
    lines = section.align_section(tmp_path / "gemma_pair", results.load_compare, _fake_delta, results.verdict,
                                  results.fmt_ci, results.md_table, align_json=_align_json(tmp_path / "a.json"))
    text = "\n".join(lines)
    assert ("| two towers: the pipeline with align left out (one tower per teacher) | 1,000 | 2 | 0.800 [0.790, 0.810] "
            "| 0.700 [0.690, 0.710] |") in text
    assert "| label align_ot | 1,000 | 1 |" in text and "+0.050 [+0.040, +0.060] | **two towers worse** |" in text
    assert "-0.040 [-0.050, -0.030] | **two towers better** |" in text
    assert "| ot | prose | gemma | 3.9000 | 3.7500 | 3.7500 | 1016 | 0 of 36,864 FFN units, 0 heads |" in text
    assert "| ties | prose | gemma | 3.9000 | 3.8000 | 3.7500 | 1016 | – |" in text
    assert "Not run yet: align_linear." in text
    assert "prose: gemma, code: gemma-code" in text


def _identity_json(path, identical):
    pair = {"tensors": 236, "only_in_one": [], "differing_tensors": 0 if identical else 3,
            "max_abs_diff": 0.0 if identical else 0.25, "identical": identical}
    path.write_text(json.dumps({"pairs": {"ot vs linear (align_real)": pair}}))
    return path


def test_a_linear_merge_identical_to_ots_shares_its_student_instead_of_not_run(tmp_path):
    results, section = load_bench("results"), load_bench("align_section")
    _write(tmp_path / "gemma_pair", _record("nexus", 0, 0.80, 0.70, 2), _record("align_ot", 1, 0.85, 0.75, 1))
    args = (tmp_path / "gemma_pair", results.load_compare, _fake_delta, results.verdict, results.fmt_ci,
            results.md_table)
    text = "\n".join(section.align_section(*args, identity_json=_identity_json(tmp_path / "i.json", True)))
    assert "its merged teacher is bit-identical to OT's (236 tensors, 0 differ, max |OT − linear| = 0;" in text
    assert "Not run yet: align_ties." in text and "align_linear, align_ties" not in text
    text = "\n".join(section.align_section(*args, identity_json=_identity_json(tmp_path / "j.json", False)))
    assert "bit-identical" not in text and "Not run yet: align_linear, align_ties." in text


def test_align_section_without_a_two_tower_run_says_how_to_make_it(tmp_path):
    results, section = load_bench("results"), load_bench("align_section")
    _write(tmp_path / "gemma_pair", _record("align_ot", 1, 0.85, 0.75, 1))
    lines = section.align_section(tmp_path / "gemma_pair", results.load_compare, _fake_delta, results.verdict,
                                  results.fmt_ci, results.md_table)
    assert lines == ["No two-tower NEXUS run in `bench/results/gemma_pair/` yet: run `python bench/compare_methods.py "
                     "--scale gemma-pair --only nexus --only align_ot --only align_linear --only align_ties`."]
    # the merge-level figures still show when align_real has run
    lines = section.align_section(tmp_path / "gemma_pair", results.load_compare, _fake_delta, results.verdict,
                                  results.fmt_ci, results.md_table, align_json=_align_json(tmp_path / "a.json"))
    assert any("| ot | prose | gemma | 3.9000 |" in line for line in lines)


def test_the_ot_claim_is_checked_on_the_pair_against_two_towers_and_the_linear_merge(tmp_path):
    results, claims = load_bench("results"), load_bench("claims_section")
    (tmp_path / "size_sweep").mkdir()
    _write(tmp_path / "gemma_pair", _record("nexus", 0, 0.80, 0.70, 2), _record("align_ot", 1, 0.85, 0.75, 1),
           _record("align_linear", 2, 0.85, 0.75, 1))
    lines = claims.claims_section(tmp_path / "size_sweep", results.load_compare, _fake_delta, results.fmt_ci,
                                  results.md_table, pair_folder=tmp_path / "gemma_pair")
    row = next(line for line in lines[-1].split("\n") if line.startswith("| OT 90–95%"))
    # the stage's effect = on − off = −(off − on): the fake delta of the run switched off (nexus / align_linear) is 0
    assert "| gemma-pair | align_ot (the stage on): min 0.750 [0.740, 0.760]" in row
    assert "its own effect (align_ot − nexus) on the minimum: -0.000 [-0.010, +0.010]" in row
    assert "align_ot − align_linear: -0.000 [-0.010, +0.010]" in row
    assert "**refuted (worse)**" in row and "--only align_ot --only nexus --only align_linear" in row
    # without the pair's folder the claim is not measured, and says where its runs would be
    lines = claims.claims_section(tmp_path / "size_sweep", results.load_compare, _fake_delta, results.fmt_ci,
                                  results.md_table)
    row = next(line for line in lines[-1].split("\n") if line.startswith("| OT 90–95%"))
    assert "not in `gemma_pair` yet | not measured" in row
