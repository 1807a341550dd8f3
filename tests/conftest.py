"""Shared test setup.

Triton kernels run on CPU tensors under the interpreter; the variable must be
set before any kernel module imports triton, hence here and not in a fixture.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)  # tests use tiny models: more threads only add overhead
