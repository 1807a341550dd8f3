"""Shared test setup.

Triton kernels run on CPU tensors under the interpreter; the variable must be
set before any kernel module imports triton, hence here and not in a fixture.
Where CUDA is present the kernels compile for the GPU instead, so kernel tests
run on ``cuda`` there and on ``cpu`` (the interpreter) everywhere else, while
decoding tests run on every device present.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# tests use tiny models: more threads only add overhead; `make test` may ask for more to show that
# no result depends on the thread count
torch.set_num_threads(int(os.environ.get("REFIMPL_TEST_THREADS", "1")))

DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]
KERNEL_DEVICES = ["cpu"] if INTERPRETED else ["cuda"]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device present: decoding code must follow its model's and inputs' device."""
    return torch.device(request.param)


@pytest.fixture(params=KERNEL_DEVICES)
def kernel_device(request):
    """Where the Triton kernels run in this process: the interpreter on CPU, or the GPU."""
    return torch.device(request.param)
