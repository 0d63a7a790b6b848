"""One process at a time per run folder: an exclusive lock file holding the owner's pid.

Two `nexus consolidate` runs on one run folder would both train and overwrite each other's checkpoints. `run_lock`
creates ``<run_dir>/<name>.lock`` next to the run folder ``<run_dir>/<name>`` (beside it, so the stages still create
their run folder atomically) with ``O_CREAT | O_EXCL`` (atomic on a local file system), holding the pid, the
process's start time and the command; a second run finds it and stops with a `RunLockError` (a ValueError: one
line, exit 2)::

    run folder runs/demo is in use by pid 4242 (nexus consolidate recipe.yaml) since 2026-12-04 10:00:00, lock file
    runs/demo.lock; wait for it to finish, or delete the lock file if that process is not a NEXUS run

A lock whose pid is gone, or whose pid now belongs to another process (its start time differs), is stale: it is taken
over (a killed run's lock never blocks the resume). The lock is removed on exit, and so is ``run_dir`` if taking the
lock created it and nothing else was written there.

    with run_lock(recipe.run_path, command="nexus consolidate recipe.yaml"):
        run_consolidate(recipe)
"""

import contextlib
import json
import os
import time
from pathlib import Path

LOCK_SUFFIX = ".lock"


class RunLockError(ValueError):
    """The run folder is locked by a live process; the message names the lock file and the pid."""


def process_start_time(pid) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _holder(lock) -> dict | None:
    """The lock's record, or None when it is unreadable (a lock being written, or garbage)."""
    try:
        record = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _is_live(record) -> bool:
    pid = record["pid"]
    if pid == os.getpid() or not pid_alive(pid):
        return pid == os.getpid()
    started = record.get("started")
    now = process_start_time(pid)
    return started is None or now is None or started == now  # a reused pid has another start time


def _write_new(lock, record) -> bool:
    """Create ``lock`` holding ``record``; False when it exists already."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(record))
    return True


def launched_world_size() -> int:
    """The process count of a torch.distributed launch (1 when not launched that way)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def lock_path(run_folder) -> Path:
    """``<run_dir>/<name>.lock`` for the run folder ``<run_dir>/<name>``."""
    folder = Path(run_folder)
    return folder.with_name(folder.name + LOCK_SUFFIX)


def acquire_run_lock(run_folder, command=None) -> Path:
    """Take the lock of ``run_folder`` (its parent is created if missing); returns the lock file. Raises
    `RunLockError` when a live process holds it; a stale lock (its process gone) is taken over."""
    folder = Path(run_folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot write output {folder}: {exc.strerror or exc}") from exc
    lock = lock_path(folder)
    record = {"pid": os.getpid(), "started": process_start_time(os.getpid()), "command": command,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(20):
        if _write_new(lock, record):
            return lock
        holder = _holder(lock)
        if holder is None:  # being written right now, or garbage: look again, then treat it as stale
            time.sleep(0.05)
            holder = _holder(lock) or {"pid": -1}
        if holder["pid"] > 0 and _is_live(holder):
            what = f" ({holder['command']})" if holder.get("command") else ""
            since = f" since {holder['since']}" if holder.get("since") else ""
            raise RunLockError(f"run folder {folder} is in use by pid {holder['pid']}{what}{since}, lock file "
                               f"{lock}; wait for it to finish, or delete the lock file if that process is not a "
                               "NEXUS run")
        # stale: move it aside atomically (only one taker wins the rename), then try again
        aside = lock.with_name(f".{lock.name}.stale-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(lock, aside)
            os.unlink(aside)
    raise RunLockError(f"run folder {folder}: could not take the lock file {lock} (another process keeps "
                       "replacing it)")


def release_run_lock(lock) -> None:
    """Remove ``lock`` if this process still holds it."""
    lock = Path(lock)
    holder = _holder(lock)
    if holder is not None and holder["pid"] == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


@contextlib.contextmanager
def run_lock(run_folder, command=None):
    """Hold the lock of ``run_folder`` for the block (see the module docstring)."""
    if launched_world_size() > 1 and int(os.environ.get("RANK", "0") or 0) > 0:  # rank 0 of this launch holds it
        yield None
        return
    parent = Path(run_folder).parent
    created = not parent.exists()
    lock = acquire_run_lock(run_folder, command)
    try:
        yield lock
    finally:
        release_run_lock(lock)
        if created:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty: the run wrote nothing
