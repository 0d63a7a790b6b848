"""Kill and resume (issue 8): `nexus consolidate` killed with SIGKILL at 5 points, then rerun with the same command,
ends with final weights bit-identical to an uninterrupted run, and leaves no half-written stage folder behind.

The harness functions here (`kill_after`, `rerun`, `final_weights`, `leftovers`, ...) are also used by
bench/kill_resume.py (10 kill points)."""

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
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200"}


def final_weights(root, name="tiny"):
    return load_file(str(root / "runs" / name / "distill" / "student" / "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(root):
    """Temporary folders/files that an atomic write left behind (``.tmp-`` prefixed names)."""
    return [p for p in (root / "runs").rglob("*") if ".tmp-" in p.name] if (root / "runs").is_dir() else []


def kill_after(recipe, seconds, log=None):
    """Start `nexus consolidate RECIPE` and SIGKILL it after ``seconds`` unless it finished first; returns whether it
    was killed. ``log``: a file that receives its output (unbuffered, so it shows where the run was)."""
    with open(log if log is not None else os.devnull, "w") as out:
        proc = subprocess.Popen(command(recipe), env=environment(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return killed


def rerun(recipe):
    """`nexus consolidate RECIPE` to the end: (the CompletedProcess, its wall seconds)."""
    started = time.monotonic()
    done = subprocess.run(command(recipe), env=environment(), capture_output=True, text=True, check=False)
    return done, time.monotonic() - started


@pytest.mark.parametrize("fraction", KILL_FRACTIONS)
def test_sigkill_then_rerun_gives_bit_identical_weights(two_teachers, tmp_path_factory, fraction,  # noqa: F811
                                                         uninterrupted):
    reference, seconds = uninterrupted
    root = tmp_path_factory.mktemp(f"killed-{fraction}")
    recipe = recipe_file(two_teachers, root)
    killed = kill_after(recipe, fraction * seconds)
    run_dir = root / "runs" / "tiny"
    done = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if run_dir.is_dir() else []
    print(f"kill at {fraction:.0%} of {seconds:.0f} s: killed={killed}; stage folders in place: {done}; "
          f"temporaries left: {len(leftovers(root))}")
    again, _ = rerun(recipe)
    assert again.returncode == 0, again.stderr[-2000:]
    assert same_weights(final_weights(root), reference), f"weights differ (killed={killed})"
    assert not leftovers(root), leftovers(root)
    report = json.loads((root / "runs" / "tiny" / "validate" / "report.json").read_text())
    assert set(report["retention"]) == {"prose", "code"}


@pytest.fixture(scope="module")
def uninterrupted(two_teachers, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("uninterrupted")
    run, seconds = rerun(recipe_file(two_teachers, root))
    assert run.returncode == 0, run.stderr[-2000:]
    return final_weights(root), seconds
