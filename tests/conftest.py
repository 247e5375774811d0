"""Suite-wide settings that must be in place before any test module imports torch or triton.

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before Triton is first imported (importing torch._dynamo imports it). Setting it here,
in the first conftest pytest loads, lets tests/serve/kernels run in this process.
"""
import glob
import os

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
