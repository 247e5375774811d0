"""What the CPU can do, read once from /proc/cpuinfo: the serving kernels pick their instruction set
from it (serve/kernels/cpu_build.py), calibration its compute dtype (toolkit/quant/calibrate.py)."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them ("avx2", "avx512_bf16", ...); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
