"""bench/child_process.py: a child's peak RSS survives the child resetting its own high-water mark, as NEXUS's
pipeline does before every stage (the wait4 figure alone then reports the last stage's peak)."""

import sys
from pathlib import Path

import pytest
from conftest import load_bench
from rich.console import Console

# allocate and touch MIB MiB (argv[1]), hold it long enough to be sampled, free it, reset the high-water mark the
# way nexus/conversion/peak_rss.py does, then finish with a small footprint
CHILD = """
import gc, sys, time
from pathlib import Path
block = bytearray(int(sys.argv[1]) * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
time.sleep(0.5)
del block
gc.collect()
try:
    Path("/proc/self/clear_refs").write_text("5")
    print("reset")
except OSError:
    print("no reset")
time.sleep(0.3)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_peak_survives_the_childs_own_high_water_reset(tmp_path):
    child_process = load_bench("child_process")
    # ru_maxrss also counts the parent's memory the child held before its exec (this test process): the block is
    # larger than that, so only the child's own peak can reach it
    mib = child_process.proc_peak_bytes("self") // 2**20 + 200
    record = child_process.measured("peak", [sys.executable, "-c", CHILD, mib], Console(file=open("/dev/null", "w")),
                                    tmp_path)
    assert record["exit_code"] == 0
    assert record["peak_rss_source"] == "max(VmHWM sampled, ru_maxrss)"
    assert record["peak_rss_mb"] >= mib
    if (tmp_path / "peak.log").read_text().strip() == "reset":
        # the kernel's own figure lost the block: this is what the sampler is for
        assert record["ru_maxrss_mb"] < mib <= record["peak_rss_mb"]


def test_peak_of_a_process_that_is_gone_is_none():
    child_process = load_bench("child_process")
    assert child_process.proc_peak_bytes(2**22 + 12345) is None  # above Linux's largest pid
