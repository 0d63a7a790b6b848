"""The process's resident memory: now, and its peak since the last reset.

On Linux the kernel tracks the peak (``VmHWM`` in ``/proc/self/status``) and writing ``5`` to
``/proc/self/clear_refs`` resets it, so the peak of one phase (loading and scoring one teacher) is measured exactly,
not sampled. Elsewhere the peak falls back to ``getrusage`` (since process start; it cannot be reset).
"""

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key):
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def current_rss():
    """Resident set size of this process now, in bytes (None when the platform does not say)."""
    return _status_bytes("VmRSS")


def peak_rss():
    """Peak resident set size in bytes since the last `reset_peak_rss` (or since the process started)."""
    value = _status_bytes("VmHWM")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss():
    """Restart peak tracking from the current RSS; returns False where the platform cannot reset it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory():
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Freed memory otherwise stays in the process's heap and counts towards its RSS: after the profile's planning step
    has loaded and dropped a 262k-token tokenizer, the next teacher would start from that higher floor.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
