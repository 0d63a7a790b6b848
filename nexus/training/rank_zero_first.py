"""Multi-process `nexus` commands: rank 0 leads, the other ranks join it for training only.

``accelerate launch --num_processes 2 ... nexus distill RECIPE`` (or ``consolidate``, ``torchrun``) starts the whole
command in every process, but only the distillation engine (`train_student`) needs every rank; the stage work around
it (profile, student build, teacher cache, validation, export, LMC) writes files. So::

    with rank_zero_first():          # the command body, in every process
        run_consolidate(recipe)

- rank 0 runs the command; ranks > 0 wait at the start.
- When rank 0 reaches `train_student`, the engine calls `release_followers`: the other ranks now run the same
  command, which finds every earlier stage finished (the profile, the student build, the teacher cache) and reuses
  it without writing, reach `train_student` and train with rank 0 (DDP; each rank takes its rows of every batch).
- When training ends the engine calls `finish_follower`: ranks > 0 raise `FollowerFinished` and leave (exit 0);
  rank 0 alone writes the student, the report and the export.
- If rank 0 ends without training (every stage reused, or an error), it tells the others to leave at once.

``accelerate launch --cpu --num_processes N`` (accelerate 1.16) starts ONE process, with ``MASTER_PORT`` set and no
``RANK`` (its ``--cpu`` path expects an MPI hostfile); `relaunch_accelerate_cpu` turns that into ``N`` processes
through ``torch.distributed.run`` (gloo on CPU), reading ``N`` from the ``accelerate launch`` command line.
"""

import contextlib
import os
import re
import sys
from pathlib import Path

import torch

_MPI_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")
_STATE = {"active": False, "released": False}


class FollowerFinished(Exception):
    """Raised on ranks > 0 when training is over: rank 0 alone carries on and writes the outputs."""


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_follower_rank() -> bool:
    """True in a rank > 0 of a multi-process launch (it must not write outputs or take the run lock)."""
    return launched_world_size() > 1 and int(os.environ.get("RANK", "0") or 0) > 0


def _accelerate_num_processes(pid) -> int | None:
    """``--num_processes N`` of the ``accelerate launch`` command line of process ``pid``, or None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"--num[_-]processes(?:=(\d+))?", arg)
        if match:
            value = match.group(1) or (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


def relaunch_accelerate_cpu(argv=None):
    """Re-execute this command as ``N`` torch.distributed processes when ``accelerate launch --cpu --num_processes N``
    (N > 1) started it as one; a no-op otherwise. Raises ValueError (one line) when N cannot be read."""
    env = os.environ
    cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not cpu or "MASTER_PORT" not in env or any(k in env for k in _MPI_SIZE) or "RANK" in env:
        return
    n = _accelerate_num_processes(os.getppid())
    if n is None:
        raise ValueError("`accelerate launch --cpu` asked for several processes but its --num_processes could not be "
                         "read from its command line; start with `torchrun --nproc_per_node N $(which nexus) ...`")
    if n < 2:
        return
    argv = list(sys.argv if argv is None else argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--nnodes", "1",
           "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", env["MASTER_PORT"], *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


FOLLOWER_WAIT_HOURS = 24  # ranks > 0 wait in a collective while rank 0 runs the stages before training


def _state():
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=FOLLOWER_WAIT_HOURS))


def release_followers(accelerator=None):
    """Rank 0, on reaching training: let the waiting ranks start. A no-op outside `rank_zero_first`."""
    if not _STATE["active"] or _STATE["released"]:
        return
    state = _state()
    if state.is_main_process:
        _broadcast("train")
    _STATE["released"] = True


def finish_follower(accelerator=None):
    """Ranks > 0, at the end of training: leave (`FollowerFinished`). A no-op outside `rank_zero_first`."""
    if _STATE["active"] and not _state().is_main_process:
        raise FollowerFinished


def _broadcast(word=None) -> str:
    from torch import distributed as dist

    box = [word]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank_zero_first():
    """Run the block on rank 0 first; ranks > 0 run it only to train with rank 0 (see the module docstring).
    A no-op in a single process."""
    relaunch_accelerate_cpu()
    if launched_world_size() < 2:
        yield
        return
    state = _state()
    _STATE.update(active=True, released=False)
    try:
        if not state.is_main_process and _broadcast() != "train":  # rank 0 finished without training
            raise FollowerFinished
        yield
    except FollowerFinished:
        _STATE["active"] = False
        return
    finally:
        if state.is_main_process and _STATE["active"] and not _STATE["released"]:
            _broadcast("leave")
        _STATE["active"] = False
