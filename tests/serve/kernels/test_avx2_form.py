"""The AVX2 form of slimlm's CPU kernels (cpu/avx2_compat.h), checked whatever this CPU's best form is.

On an AVX-512 CPU the rest of the run tests the AVX-512 build. This reruns the kernel tests (GEMV,
quantized GEMV and GEMM, attention, RMSNorm and RoPE, the fused decode stack) in a child process with
SLIMLM_CPU_ISA=avx2, so both forms meet their PyTorch references on every machine that has both.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimlm.serve.kernels import cpu_build

ROOT = Path(__file__).resolve().parents[3]
FILES = ["tests/serve/kernels/test_quant_cpu.py", "tests/serve/layers/test_quant_linear.py",
         "tests/serve/layers/test_linear.py",
         "tests/serve/layers/test_attention.py", "tests/serve/layers/test_rotary_norm.py",
         "tests/serve/models/test_cpu_decode.py"]


def test_the_kernel_tests_pass_in_the_avx2_form():
    isa = cpu_build.cpu_isa() if "SLIMLM_CPU_ISA" not in os.environ else None
    if isa != "avx512":
        pytest.skip(f"this CPU's best form is {isa or 'none'}: the rest of this run tests what it runs")
    env = {**os.environ, "SLIMLM_CPU_ISA": "avx2"}
    probe = subprocess.run([sys.executable, "-c", "from slimlm.serve.kernels import cpu_build as c; "
                            "print(c.cpu_isa(), c.build_cpu_kernels('decode_stack') is not None)"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.split() == ["avx2", "True"], probe.stdout + probe.stderr  # the AVX2 form built and loaded
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FILES], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
