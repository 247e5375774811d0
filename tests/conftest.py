"""Suite-wide settings that must be in place before any test module imports torch or triton.

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before Triton is first imported (importing torch._dynamo imports it). Setting it here,
in the first conftest pytest loads, lets tests/serve/kernels run in this process.
"""
import glob
import os

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


@pytest.fixture(autouse=True)
def _hand_memory_back():
    """After each test: give the freed heap back to the system (glibc keeps it otherwise), and where the process
    still holds over 3 GiB, first collect the engines and models a test left in reference cycles (a full collection
    costs ~0.2 s, too much after every test). Without this the one test process grew past the 2-core CI machine's
    24 GiB over the suite (each engine holds a 1 GiB KV cache by default) and was killed."""
    yield
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return
    _LIBC.malloc_trim(0)
    if _rss_bytes() > 3 * 2**30:
        gc.collect()
        _LIBC.malloc_trim(0)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
