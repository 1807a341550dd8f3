"""Padding-free (varlen) flash attention in Triton.

ByteTransformer (Zhai et al. 2022) and the unpadded BERT work ("Boosting
Distributed Training Performance of the Unpadded BERT Model", 2022) remove
padding by concatenating all sequences into one stream of N tokens and telling
attention where each one starts: ``cu_seqlens`` = [0, l_0, l_0 + l_1, ..., N]
(int32). Sequence i owns rows cu[i] .. cu[i+1] - 1 and attends only there:

    O[a:b] = softmax(s * Q[a:b] K[a:b]^T + M) V[a:b]        (a = cu[i], b = cu[i+1])

One program handles one block of query rows of one sequence and one head and
streams that sequence's keys with the online softmax of FlashAttention
(Dao et al. 2022, Algorithm 1): chapter 0's ``_tile`` and ``_attn_fwd_inner``
from ``refimpl/kernels/attention.py``, on the sequence's rows as a matrix of
``length`` rows with causal offset 0. The only new thing is that the row range
comes from ``cu_seqlens``. Causal masking
is top-left aligned inside each sequence (key j visible to query i iff j <= i).
The reference is ``refimpl.packing.varlen_attention``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from refimpl.kernels.attention import _attn_fwd_inner, _tile, launch_config
from refimpl.kernels.common import FLOAT_DTYPES, check_device, check_launch, interpreted
from refimpl.packing import _check_varlen


@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, Out, CuSeqlens,        # [N, H, D] streams; int32 (n + 1,) offsets
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd, stride_on, stride_oh, stride_od,
    D, sm_scale,                    # head size; softmax scale 1 / sqrt(D)
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, seq, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CuSeqlens + seq)           # the sequence's first row
    length = tl.load(CuSeqlens + seq + 1) - start
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows in the sequence
    offs_d = tl.arange(0, BLOCK_D)
    # the sequence as a [length, D] matrix per head: rows past its end are 0
    q_ptrs, ok = _tile(Q + start * stride_qn + h * stride_qh, offs_m, offs_d,
                       stride_qn, stride_qd, length, D)
    q = tl.load(q_ptrs, mask=ok, other=0.0)
    hi = length
    if CAUSAL:  # keys after this block's last row are never visible
        hi = tl.minimum(length, (pid_m + 1) * BLOCK_M)
    acc, l_i, _ = _attn_fwd_inner(
        q, K + start * stride_kn + h * stride_kh,
        V + start * stride_vn + h * stride_vh, stride_kn, stride_kd,
        stride_vn, stride_vd, offs_m, offs_d, length, D, hi, sm_scale, 0,
        CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs, _ = _tile(Out + start * stride_on + h * stride_oh, offs_m, offs_d,
                      stride_on, stride_od, length, D)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=ok)


def varlen_flash_attention(q, k, v, cu_seqlens, causal=True, sm_scale=None):
    """Triton version of ``refimpl.packing.varlen_attention``: q, k, v [N, H, D] (D <= 128),
    cu_seqlens int32 (n+1,) with 0 = cu[0] < cu[1] < ... < cu[n] = N."""
    _check_varlen(q, k, v, cu_seqlens)
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q.dtype must be float32, float16 or bfloat16, got {q.dtype}")
    N, H, D = q.shape
    config = launch_config(D, q.dtype)
    check_launch(grid_yz=[("the number of sequences", len(cu_seqlens) - 1), ("H", H)], q=q, k=k, v=v)
    check_device(q, "q", _varlen_fwd_kernel)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    cu = cu_seqlens.to(q.device)
    max_len = int(cu_seqlens.diff().max())
    out = torch.empty_like(q)
    grid = (triton.cdiv(max_len, config["BLOCK_M"]), len(cu_seqlens) - 1, H)
    _varlen_fwd_kernel[grid](
        q, k, v, out, cu,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        D, sm_scale, CAUSAL=bool(causal), IEEE=interpreted(_varlen_fwd_kernel), **config,
    )
    return out
