"""Issue 18 item 2: `nexus consolidate` and `nexus distill` under `accelerate launch --num_processes 2` on CPU (gloo)
give the single-process loss curve, with rank 0 alone writing; the FSDP / DeepSpeed accelerate configs parse."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_distill_stage import PROFILE, consolidate_recipe_file, save_two_teachers
from typer.testing import CliRunner

from nexus.cli import app

STEPS = 3
# each rank takes half of every batch's rows: the same trajectory as one process up to float summation order
# (measured in fp32: 2.4e-07 for consolidate, 3.6e-07 for the routed distill, over 3 steps)
LOSS_TOLERANCE = 1e-4
CONFIGS = Path(__file__).resolve().parents[1] / "nexus" / "training" / "accelerate_configs"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return save_two_teachers(tmp_path_factory.mktemp("mp-teachers"))


@pytest.fixture(scope="module")
def single(teachers, tmp_path_factory):
    """The one-process `nexus consolidate` run: its distill engine's loss curve."""
    root = tmp_path_factory.mktemp("mp-single")
    recipe = consolidate_recipe_file(teachers, root, steps=STEPS)
    result = CliRunner().invoke(app, ["consolidate", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    return json.loads((root / "runs" / "tiny" / "distill" / "engine" / "train_log.json").read_text())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args):
    """``accelerate launch --cpu --num_processes 2 nexus ARGS`` (accelerate's own `--cpu` path) in a subprocess."""
    nexus = shutil.which("nexus") or str(Path(sys.executable).with_name("nexus"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), nexus, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _losses(log):
    return [x for _, x in log["losses"]]


def test_consolidate_with_two_cpu_processes_gives_the_single_process_loss_curve(teachers, single, tmp_path):
    recipe = consolidate_recipe_file(teachers, tmp_path, steps=STEPS)
    proc = _launch("consolidate", str(recipe), "--quiet")
    run = tmp_path / "runs" / "tiny"
    log = json.loads((run / "distill" / "engine" / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["steps"] == STEPS == single["steps"]
    assert log["tokens"] == single["tokens"]  # the same global batches
    assert max(abs(a - b) for a, b in zip(_losses(log), _losses(single), strict=True)) <= LOSS_TOLERANCE
    # rank 0 alone ran the stages after training and wrote the outputs; rank 1 left after training
    assert proc.stdout.count("wrote ") == 1, proc.stdout[-2000:]
    assert {"profile", "student_build", "distill", "validate", "export"} <= {p.name for p in run.iterdir()}
    assert not (tmp_path / "runs" / "tiny.lock").exists()
    assert (run / "export" / "model.safetensors").is_file()


def _two_tower_run(teachers, root):
    """A recipe whose (hand-written) profile makes each teacher best at one capability: a 2-tower student with a
    router, whose logits the distill stage computes besides the tower forward (the case DDP used to reject)."""
    recipe = consolidate_recipe_file(teachers, root, steps=STEPS)
    profile = root / "runs" / "tiny" / "profile"
    profile.mkdir(parents=True)
    (profile / "profile.json").write_text(json.dumps(PROFILE))
    return recipe


def test_distill_of_a_routed_student_with_two_cpu_processes_gives_the_single_process_loss_curve(teachers, tmp_path):
    one = CliRunner().invoke(app, ["distill", str(_two_tower_run(teachers, tmp_path / "one")), "--quiet"])
    assert one.exit_code == 0, one.output
    proc = _launch("distill", str(_two_tower_run(teachers, tmp_path / "two")), "--quiet")
    logs = [json.loads((tmp_path / r / "runs" / "tiny" / "distill" / "engine" / "train_log.json").read_text())
            for r in ("one", "two")]
    assert [log["world_size"] for log in logs] == [1, 2] and logs[1]["steps"] == STEPS
    assert max(abs(a - b) for a, b in zip(_losses(logs[0]), _losses(logs[1]), strict=True)) <= LOSS_TOLERANCE
    out = tmp_path / "two" / "runs" / "tiny" / "distill"
    summary = json.loads((out / "distill.json").read_text())
    assert len(summary["capability_to_tower"]) == 2 and len(set(summary["capability_to_tower"].values())) == 2
    assert summary["router_accuracy"]["n"] > 0  # a router was trained, in both processes
    parts = [json.loads(line).get("parts", {}) for line in (out / "engine" / "run_log.jsonl").read_text().splitlines()]
    assert any("router" in p for p in parts), parts
    assert proc.stdout.count("wrote ") == 1, proc.stdout[-2000:]
    assert (out / "student" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------- accelerate configs


def _read(name):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name)), yaml.safe_load((CONFIGS / name).read_text())


def test_fsdp_config_builds_accelerates_fsdp_plugin():
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    config, raw = _read("fsdp.yaml")
    assert config.distributed_type == DistributedType.FSDP
    fsdp = {k.removeprefix("fsdp_"): v for k, v in raw["fsdp_config"].items()}
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["version"], reshard_after_forward=fsdp["reshard_after_forward"],
        auto_wrap_policy=fsdp["auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[fsdp["transformer_layer_cls_to_wrap"]],
        state_dict_type=fsdp["state_dict_type"], use_orig_params=fsdp["use_orig_params"],
        cpu_ram_efficient_loading=fsdp["cpu_ram_efficient_loading"])
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["NexusDecoderLayer"]
    import nexus.modeling_nexus.modeling_nexus as modeling

    assert hasattr(modeling, fsdp["transformer_layer_cls_to_wrap"])  # the class FSDP wraps exists


def test_deepspeed_and_ddp_configs_parse():
    from accelerate.utils import DistributedType

    config, raw = _read("deepspeed_zero2.yaml")
    assert config.distributed_type == DistributedType.DEEPSPEED and raw["deepspeed_config"]["zero_stage"] == 2
    config, _ = _read("ddp_cpu.yaml")
    assert config.distributed_type == DistributedType.MULTI_GPU and config.num_processes == 2


def test_engine_refuses_a_sharded_distributed_type():
    from accelerate.utils import DistributedType

    from nexus.training.distill_engine import check_ddp_only

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match=f"distributed_type {kind.value}: the distillation engine runs DDP only"):
            check_ddp_only(kind)
    check_ddp_only(DistributedType.MULTI_CPU)
    check_ddp_only(DistributedType.MULTI_GPU)
