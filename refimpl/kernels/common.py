"""What every kernel wrapper checks before a launch: interpreter or GPU, the tensors' device, and
the limits a GPU sets on a launch (grid dimensions, int32 offsets, block sizes).

``TRITON_INTERPRET=1``, read when a kernel module is imported, makes ``@triton.jit`` return an
interpreted function that runs on CPU tensors in numpy; otherwise it is a ``JITFunction``
compiled for the GPU. The interpreter computes low-precision ``tl.dot`` wrongly, so kernels
with dots take an ``IEEE`` flag (fp32, exact products) that is on only there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels accept
MAX_BLOCK = 1024  # lanes of a 1-D block a program holds in registers (8 a thread at 4 warps)
MAX_GRID_YZ = 65535  # CUDA's limit on the second and third dimensions of a launch grid
MAX_OFFSET = 2**31 - 1  # the kernels compute element offsets in int32


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation. On a GPU: tensor cores in b's dtype (fp16/bf16; TF32 for
    fp32). Under the interpreter (IEEE): fp32 inputs and exact products."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


def interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(x, name, kernel):
    """A compiled kernel reads GPU memory: refuse CPU tensors unless it is interpreted."""
    if not x.is_cuda and not interpreted(kernel):
        raise ValueError(f"{name} is on {x.device}: the Triton kernel needs CUDA tensors, or "
                         f"TRITON_INTERPRET=1 set before {kernel.__module__} is imported")


def check_same_device(name, x, **others):
    """Every tensor in ``others`` (None skipped) must be on ``x``'s device."""
    for other_name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{other_name} is on {t.device} but {name} is on {x.device}")


def check_launch(grid_yz=(), **tensors):
    """Launch bounds a GPU enforces and the interpreter does not: ``grid_yz`` is ((name, count),
    ...) for the second and third grid dimensions; every element of each tensor must be within
    MAX_OFFSET elements of its first, or int32 offsets wrap around."""
    for name, count in grid_yz:
        if count > MAX_GRID_YZ:
            raise ValueError(f"{name} = {count} programs along a grid dimension that CUDA caps at "
                             f"{MAX_GRID_YZ}: it must be in [1, {MAX_GRID_YZ}]")
    for name, t in tensors.items():
        span = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        if span > MAX_OFFSET:
            raise ValueError(f"{name} spans {span + 1} elements; the kernel indexes in int32, so at "
                             f"most {MAX_OFFSET + 1}")


def check_block(name, block, lo=16, hi=MAX_BLOCK):
    """A user-chosen block size: a power of two (for ``tl.arange``) in [lo, hi]."""
    if not isinstance(block, int) or not lo <= block <= hi or block & (block - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {block!r}")
    return block
