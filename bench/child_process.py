"""One child process measured: its output streamed to the console and a log, its wall time, its peak RSS and its
CPU time. Runs with one thread (``OMP_NUM_THREADS=1``) by default so that two benches on this machine's two cores do
not share one.

Peak RSS: ``os.wait4``'s ``ru_maxrss`` alone is not the child's peak when the child resets the kernel's high-water
mark, as NEXUS's pipeline does before every stage (``nexus/conversion/peak_rss.py`` writes 5 to
``/proc/self/clear_refs``): it then reports the peak of the child's last stage only (a consolidate whose distill
stage peaked at 4,144 MiB reported 1,400 MiB, its export stage). It also counts what the parent held when the child
was forked, before its exec. So a thread also reads the child's ``VmHWM`` (its peak since the last reset) from
``/proc/<pid>/status`` every ``SAMPLE_SECONDS`` while it runs, and the peak is the largest of those readings and
``ru_maxrss``. Only a phase that peaks and is reset within one sampling interval can be missed. Where ``/proc`` is
absent (macOS) it falls back to ``ru_maxrss`` and says so in ``peak_rss_source``."""

import os
import subprocess
import threading
import time
from pathlib import Path

SAMPLE_SECONDS = 0.05


def proc_peak_bytes(pid: int | str) -> int | None:
    """``VmHWM`` of process ``pid`` (or ``"self"``) in bytes: its peak RSS since it started or since its last reset;
    None if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakSampler:
    """Reads a process's ``VmHWM`` until stopped; ``peak`` is the largest reading (None if none could be read)."""

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS):
        self.pid, self.interval, self.peak = pid, interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            value = proc_peak_bytes(self.pid)
            if value is not None:
                self.peak = value if self.peak is None else max(self.peak, value)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measured(name, cmd, console, log_dir, threads: int = 1) -> dict:
    """Run ``cmd`` as a child process (its output streamed and logged to ``log_dir/<name>.log``); returns wall
    seconds, peak RSS (see the module docstring), CPU seconds and the exit code."""
    log = Path(log_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    console.print(f"[bold]{name}[/]: {' '.join(map(str, cmd))}  (log {log})", highlight=False)
    started = time.perf_counter()
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    with PeakSampler(proc.pid) as sampler, open(log, "w") as fh:
        for line in proc.stdout:
            fh.write(line)
            if line.strip():
                console.print(f"  {name}> {line.rstrip()}", highlight=False, markup=False)
        _, status, usage = os.wait4(proc.pid, 0)  # the sampler reads the child until it is reaped here
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    ru_maxrss = usage.ru_maxrss * 1024  # kB on Linux
    peak = max(ru_maxrss, sampler.peak or 0)
    record = {"command": " ".join(map(str, cmd)), "wall_seconds": round(wall, 1),
              "peak_rss_mb": round(peak / 2**20, 1), "ru_maxrss_mb": round(ru_maxrss / 2**20, 1),
              "peak_rss_source": "max(VmHWM sampled, ru_maxrss)" if sampler.peak is not None else "ru_maxrss",
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
              "exit_code": proc.returncode, "threads": threads, "log": str(log)}
    console.print(f"  {name}: {wall:.0f} s, peak RSS {record['peak_rss_mb']:.0f} MB, exit {proc.returncode}")
    return record
