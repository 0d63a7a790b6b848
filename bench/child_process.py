"""One child process measured: its output streamed to the console and a log, its wall time, and its peak RSS and
CPU time from ``os.wait4`` (the largest resident set of it and of any process it waited for). Runs with one thread
(``OMP_NUM_THREADS=1``) by default so that two benches on this machine's two cores do not share one."""

import os
import subprocess
import time
from pathlib import Path


def measured(name, cmd, console, log_dir, threads: int = 1) -> dict:
    """Run ``cmd`` as a child process (its output streamed and logged to ``log_dir/<name>.log``); returns wall
    seconds, peak RSS, CPU seconds and the exit code."""
    log = Path(log_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    console.print(f"[bold]{name}[/]: {' '.join(map(str, cmd))}  (log {log})", highlight=False)
    started = time.perf_counter()
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    with open(log, "w") as fh:
        for line in proc.stdout:
            fh.write(line)
            if line.strip():
                console.print(f"  {name}> {line.rstrip()}", highlight=False, markup=False)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    record = {"command": " ".join(map(str, cmd)), "wall_seconds": round(wall, 1),
              "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
              "exit_code": proc.returncode, "threads": threads, "log": str(log)}
    console.print(f"  {name}: {wall:.0f} s, peak RSS {record['peak_rss_mb']:.0f} MB, exit {proc.returncode}")
    return record
