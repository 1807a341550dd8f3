"""Absolute tolerances of the Triton kernel tests, per device of the ``kernel_device`` fixture.

cpu (the interpreter): every dot in fp32 with exact products (the kernels' IEEE flag), so a
kernel matches its fp32 torch reference to rounding, ~1e-5; fp16 and bf16 outputs to about one
unit in the last place of their own rounding.

cuda: the attention kernels' dots run on tensor cores in the input dtype with fp32
accumulation. fp32 inputs are truncated to TF32 (10-bit mantissa: relative error up to 2^-10
per input), which moves an output or a log-sum-exp by ~1e-3 and needs ~2e-2 to be safe;
fp16/bf16 products are exact in fp32, but P is rounded to fp16 (2^-11) or bf16 (2^-8) before
P @ V. Kernels without dots compute in fp32 on both devices; on a GPU exp and log are the
hardware approximations (ex2.approx, lg2.approx) and sums run in another order: 1e-4.
"""
import torch

ATTENTION_OUT = {
    "cpu": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2},
    "cuda": {torch.float32: 2e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2},
}
ATTENTION_LSE = {
    "cpu": {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5},
    "cuda": {torch.float32: 2e-2, torch.float16: 1e-4, torch.bfloat16: 1e-4},
}
FP32 = {"cpu": 1e-5, "cuda": 1e-4}  # the kernels without dots
# TinyGPT's logits with the kernel as its attention, in fp32: on a GPU the TF32 error of a
# score is ~2^-10 |s|, and with the test's N(0, 0.5) weights |s| reaches ~20 before two layers
# and the head amplify it
MODEL = {"cpu": 1e-5, "cuda": 1e-1}


def attention_tol(device, dtype):
    """(out atol, lse atol and rtol) of flash/varlen attention with inputs in ``dtype``."""
    return ATTENTION_OUT[device.type][dtype], ATTENTION_LSE[device.type][dtype]


def fp32_tol(device):
    """atol and rtol of a kernel that computes in fp32 without dots."""
    return FP32[device.type]


def model_tol(device):
    """atol and rtol of an fp32 TinyGPT's logits with the Triton attention backend."""
    return MODEL[device.type]
