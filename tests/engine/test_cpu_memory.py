"""``reuse_freed_cpu_memory``: large freed blocks stay in the process for the next step instead of going back to the OS."""

import subprocess
import sys

import pytest

# Frees a 64 MB tensor (above glibc's largest mmap threshold) and prints whether the resident memory fell by it.
PROBE = """
import sys, torch
from sslbench.engine import reuse_freed_cpu_memory
applied = reuse_freed_cpu_memory() if sys.argv[1] == "reuse" else None
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
x = torch.ones(16 * 2**20)  # 64 MB, touched
held = rss_mb()
del x
print(applied, held - rss_mb() > 48)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tuning applies on Linux only")
@pytest.mark.parametrize("mode, expected", [("default", "None True"), ("reuse", "True False")])
def test_large_freed_blocks_stay_in_the_process_only_when_asked(mode, expected):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    assert " ".join(out[-2:]) == expected
