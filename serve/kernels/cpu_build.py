"""Build slimlm's CPU kernels (C, in `cpu/`) with the system's C compiler, once per machine.

Each library is one `cpu/<name>.c` (which includes `prelude.h` and, for the fused decode stack, the
other kernels), compiled into slimlm's cache dir and loaded with ctypes. The source is written with
AVX-512 intrinsics; it is compiled for the best instruction set the CPU has (`cpu_isa`): natively
where it has AVX-512 F/BW/VL/DQ/BF16, else with `cpu/avx2_compat.h` (the same intrinsics on two
256-bit halves) where it has AVX2, FMA and F16C, as most x86-64 server CPUs since 2013 do (AMD Zen 1-3
among them). Anything missing (not Linux on x86-64 with one of the two, no compiler, no libgomp in the
process) gives None, and the callers run their PyTorch path; SLIMLM_CPU_KERNELS=0 turns every kernel
off, SLIMLM_CPU_ISA=avx2 builds the AVX2 form on an AVX-512 CPU (to test it there).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from slimlm.toolkit.cpu import cpu_flags

SOURCE_DIR = Path(__file__).parent / "cpu"

# -ffp-contract=off: no fused multiply-adds the source does not ask for, so elementwise kernels round
# each product as PyTorch's ops do.
CFLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]
# Per instruction set: the CPU flags it needs (as /proc/cpuinfo names them) and the compiler's flags.
ISAS = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]),
    # -Wno-psabi: the 512-bit vector types change the ABI of non-inline functions without AVX-512;
    # every function taking one is static inline.
    "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c", "-Wno-psabi"]),
}


def kernels_enabled() -> bool:
    """slimlm's C kernels (GEMV, attention, RMSNorm, RoPE, the decode stack) run unless SLIMLM_CPU_KERNELS=0."""
    return os.environ.get("SLIMLM_CPU_KERNELS", "1") != "0"


def cpu_isa() -> str | None:
    """"avx512" or "avx2": the instruction set the kernels are built for here; None where neither runs.
    SLIMLM_CPU_ISA=avx2 picks the AVX2 form where both would run."""
    flags = cpu_flags()
    usable = [isa for isa, (needs, _) in ISAS.items() if needs <= flags]
    want = os.environ.get("SLIMLM_CPU_ISA", "").strip().lower()
    if want and want not in ISAS:
        raise ValueError(f"SLIMLM_CPU_ISA={want!r}: expected one of {', '.join(ISAS)} (or unset for the best one)")
    if want:
        return want if want in usable else None
    return usable[0] if usable else None


def _source_key(cc: str, flags: list[str]) -> str:
    # Every file of the folder: a library includes others, and an edit to any must rebuild it.
    h = hashlib.sha256("\0".join([cc, *flags]).encode())
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.suffix in (".c", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def build_cpu_kernels(name: str) -> ctypes.CDLL | None:
    """Compile `cpu/<name>.c` once per machine into slimlm's cache and load it; None where it cannot run.

    The library is keyed by a hash of the sources, compiler and flags, so an edit rebuilds it. OpenMP
    comes from the libgomp torch already loaded (same soname), so kernels share torch's thread pool;
    where torch has no libgomp loaded, a second OpenMP runtime would fight torch's for the cores: no kernels.
    """
    isa = cpu_isa() if sys.platform == "linux" else None
    if isa is None:
        return None
    flags = CFLAGS + ISAS[isa][1]
    try:
        if not any("libgomp" in line for line in Path("/proc/self/maps").read_text().splitlines()):
            return None
        from slimlm.toolkit.cache import cache_dir
        cc = os.environ.get("CC", "cc")
        path = cache_dir() / "kernels" / f"slimlm_{name}_{isa}_{_source_key(cc, flags)}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                lib = Path(tmp) / f"{name}.so"
                subprocess.run([cc, *flags, f"-I{SOURCE_DIR}", str(SOURCE_DIR / f"{name}.c"), "-o", str(lib)],
                               check=True, capture_output=True, timeout=120, text=True)
                os.replace(lib, path)  # atomic: a concurrent process sees the whole file or none
        return ctypes.CDLL(str(path))
    except subprocess.CalledProcessError as e:  # a compiler that rejects the source: say so, run without
        warnings.warn(f"slimlm's CPU kernels {name!r} did not compile ({' '.join(e.cmd[:1])} exit {e.returncode}); "
                      f"running the slower PyTorch path. Compiler said:\n{e.stderr[-2000:]}", stacklevel=2)
        return None
    except (OSError, subprocess.SubprocessError, ImportError):  # no compiler, no cache dir: quietly without
        return None
