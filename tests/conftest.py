"""Test set-up: without a GPU, Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here (pytest imports
conftest.py before any test module). On a machine with CUDA the real kernels are compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
