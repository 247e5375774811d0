"""Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before Triton is first imported (Triton decorates its own helpers at
import), so it is set here, when pytest collects this folder and before its test files import
Triton. For the rest of the process Triton then stays in interpreter mode (and child processes
inherit the variable). If something collected earlier already imported Triton (importing
torch._dynamo does), setting it is useless here: the test file notices and reruns itself in a
fresh process, so the variable is left alone.
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
