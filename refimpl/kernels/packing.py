"""Padding-free (varlen) flash attention in Triton.

ByteTransformer (Zhai et al. 2022) and the unpadded BERT work ("Boosting
Distributed Training Performance of the Unpadded BERT Model", 2022) remove
padding by concatenating all sequences into one stream of N tokens and telling
attention where each one starts: ``cu_seqlens`` = [0, l_0, l_0 + l_1, ..., N]
(int32). Sequence i owns rows cu[i] .. cu[i+1] - 1 and attends only there:

    O[a:b] = softmax(s * Q[a:b] K[a:b]^T + M) V[a:b]        (a = cu[i], b = cu[i+1])

One program handles one block of query rows of one sequence and one head and
streams that sequence's keys with the online softmax of FlashAttention
(Dao et al. 2022, Algorithm 1), as in ``refimpl/kernels/attention.py``; the
only new thing is that the row range comes from ``cu_seqlens``. Causal masking
is top-left aligned inside each sequence (key j visible to query i iff j <= i).
The reference is ``refimpl.packing.varlen_attention``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from refimpl.kernels.attention import launch_config
from refimpl.kernels.common import FLOAT_DTYPES, check_device, check_launch, interpreted, mma
from refimpl.packing import _check_varlen


@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, Out, CuSeqlens,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_on, stride_oh, stride_od,
    D, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CuSeqlens + seq)
    length = tl.load(CuSeqlens + seq + 1) - start
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < length  # blocks past a short sequence's end do nothing

    q = tl.load(Q + (start + offs_m[:, None]) * stride_qn + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = length
    if CAUSAL:
        hi = tl.minimum(length, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < length
        kt = tl.load(K + (start + cols[None, :]) * stride_kn + h * stride_kh + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + (start + cols[:, None]) * stride_vn + h * stride_vh + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = mma(q, kt, IEEE) * sm_scale
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past the end see nothing
        p = tl.exp(s - m_shift[:, None])
        alpha = tl.exp(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p, v, IEEE)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + (start + offs_m[:, None]) * stride_on + h * stride_oh + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


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
