"""Kill and resume (issue 8): `nexus consolidate` killed with SIGKILL at 5 points, then rerun with the same command,
ends with final weights bit-identical to an uninterrupted run, and leaves no half-written stage folder behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_distill_stage import consolidate_recipe_file, two_teachers  # noqa: F401  (two_teachers: a fixture)

KILL_FRACTIONS = (0.15, 0.35, 0.55, 0.75, 0.9)  # of the uninterrupted run's wall time


def recipe_file(teachers, root):
    return consolidate_recipe_file(teachers, root, steps=6)


def command(recipe):
    return [sys.executable, "-c", "from nexus.cli import app; app()", "consolidate", str(recipe), "--quiet"]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def final_weights(root):
    return load_file(str(root / "runs" / "tiny" / "distill" / "student" / "model.safetensors"))


def leftovers(root):
    """Temporary folders/files that an atomic write left behind (``.tmp-`` prefixed names)."""
    return [p for p in (root / "runs").rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("fraction", KILL_FRACTIONS)
def test_sigkill_then_rerun_gives_bit_identical_weights(two_teachers, tmp_path_factory, fraction,  # noqa: F811
                                                         uninterrupted):
    reference, seconds = uninterrupted
    root = tmp_path_factory.mktemp(f"killed-{fraction}")
    recipe = recipe_file(two_teachers, root)
    proc = subprocess.Popen(command(recipe), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + fraction * seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = root / "runs" / "tiny"
    done = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if run_dir.is_dir() else []
    print(f"kill at {fraction:.0%} of {seconds:.0f} s: killed={killed}; stage folders in place: {done}; "
          f"temporaries left: {len(leftovers(root))}")
    rerun = subprocess.run(command(recipe), env=environment(), capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    weights = final_weights(root)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference), f"weights differ (killed={killed})"
    assert not leftovers(root), leftovers(root)
    report = json.loads((root / "runs" / "tiny" / "validate" / "report.json").read_text())
    assert set(report["retention"]) == {"prose", "code"}


@pytest.fixture(scope="module")
def uninterrupted(two_teachers, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("uninterrupted")
    recipe = recipe_file(two_teachers, root)
    started = time.monotonic()
    run = subprocess.run(command(recipe), env=environment(), capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return final_weights(root), time.monotonic() - started
