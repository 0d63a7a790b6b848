"""`nexus plan RECIPE --gpu-gb N`: per stage and for inference, the planned peak on one GPU and whether it fits, from
configs alone. The recipe is bench/recipes/plan_7b.yaml: two 7B-class teachers given as folders holding only their
config.json (no weights, no tokenizer), so nothing is loaded or downloaded."""

from pathlib import Path

import typer
from typer.testing import CliRunner

from nexus.conversion.gpu_plan import CUDA_CONTEXT_BYTES, STAGES, plan_gpu
from nexus.conversion.memory_plan import GIB, hf_parameter_count, load_config
from nexus.conversion.recipe import load_recipe
from nexus.plan_command import plan

RECIPE = Path(__file__).resolve().parent.parent / "bench" / "recipes" / "plan_7b.yaml"


def test_7b_teachers_from_configs_only():
    recipe = load_recipe(RECIPE, check_paths=False)
    plans = plan_gpu(recipe, gpu_gb=16, context=4096)
    assert list(plans) == list(STAGES)
    qwen = hf_parameter_count(load_config(RECIPE.parent / "plan_7b" / "qwen2-7b"))["total"]
    assert 7.0e9 < qwen < 8.0e9  # Qwen2-7B has 7.6B parameters
    profile = plans["profile"]
    assert profile["assumptions"]["peak"] == "qwen2-7b" and profile["assumptions"]["params_from"].startswith("config")
    assert profile["components"]["teacher_weights"] == 2 * qwen  # bf16
    build = plans["student_build"]["components"]
    assert build["teacher_fp32"] == build["nexus_import_fp32"] == build["calibration_gradients_fp32"] == 4 * qwen
    assert plans["distill"]["components"]["student_training_state"] == 16 * 3_000_000_000  # weights, grads, AdamW
    assert plans["inference"]["components"]["weights_bf16"] == 2 * 3_000_000_000
    assert plans["export"]["total_bytes"] == 0
    for name, p in plans.items():
        assert p["total_bytes"] == sum(p["components"].values()), name
        assert p["fits"] == (p["total_bytes"] <= 16 * GIB), name
    # what a 16 GB GPU holds here: a 7B teacher's bf16 forward and the 3B student's inference, not the fp32 build
    assert plans["profile"]["fits"] and plans["inference"]["fits"]
    assert not plans["student_build"]["fits"] and not plans["distill"]["fits"]
    big = plan_gpu(recipe, gpu_gb=128)
    assert all(p["fits"] for p in big.values())
    assert big["inference"]["total_bytes"] > CUDA_CONTEXT_BYTES + 2 * 3_000_000_000  # + KV cache and prefill


def test_optional_stages_in_the_pipeline_are_planned_in_its_order():
    from nexus.conversion.stage_memory import ties_working_set_bytes

    recipe = load_recipe(RECIPE, check_paths=False)
    recipe.pipeline = ["profile", "localise", "align", "student_build", "distill", "validate", "export"]
    plans = plan_gpu(recipe, gpu_gb=16)
    assert list(plans) == ["profile", "localise", "align", *STAGES[1:]]
    qwen = hf_parameter_count(load_config(RECIPE.parent / "plan_7b" / "qwen2-7b"))["total"]
    llama = hf_parameter_count(load_config(RECIPE.parent / "plan_7b" / "llama-2-7b"))["total"]
    loc = plans["localise"]
    assert loc["assumptions"]["peak"] == "qwen2-7b" and loc["components"]["teacher_weights"] == 2 * qwen
    assert loc["components"]["attribution_backward"] > 0  # gradient attribution keeps the forward's activations
    align = plans["align"]["components"]
    assert align["members_fp32"] == 4 * (qwen + llama) and align["merged_and_plain_average_fp32"] == 8 * qwen
    assert "ties_working_set_fp32" not in align and not plans["align"]["fits"]
    recipe.stages["align"] = type(recipe.stage("align")).model_validate({"method": "ties"})
    ties = plan_gpu(recipe, gpu_gb=16)["align"]["components"]
    configs = [load_config(RECIPE.parent / "plan_7b" / n) for n in ("llama-2-7b", "qwen2-7b")]
    assert ties["ties_working_set_fp32"] == ties_working_set_bytes(configs) > 0


def test_cli_prints_every_stage_and_whether_it_fits(tmp_path):
    app = typer.Typer()
    app.command("plan")(plan)
    app.command("noop")(lambda: None)
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", str(RECIPE), "--gpu-gb", "16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│")}
    assert set(STAGES) <= set(rows), result.output
    assert "no (over by" in rows["student_build"] and rows["inference"].rstrip(" │").endswith("yes")
    assert out.is_file()
    bad = CliRunner().invoke(app, ["plan", str(RECIPE), "--gpu-gb", "0"])
    assert bad.exit_code == 2 and "--gpu-gb must be positive" in bad.output and "Traceback" not in bad.output
