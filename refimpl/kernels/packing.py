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
def _varlen_rows(Base, start, rows, h, offs_d, stride_n, stride_h, stride_d):
    """Pointers [len(rows), BLOCK_D] to rows ``rows`` of the sequence that
    starts at stream row ``start``, head h."""
    return (Base + (start + rows[:, None]) * stride_n + h * stride_h
            + offs_d[None, :] * stride_d)


@triton.jit
def _online_softmax_step(q, k, v, visible, m_i, l_i, acc, sm_scale,
                         IEEE: tl.constexpr):
    """One block of keys into the running max m_i, sum l_i and fp32 acc
    (FlashAttention, Dao et al. 2022, Algorithm 1)."""
    s = tl.where(visible, mma(q, tl.trans(k), IEEE) * sm_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no key yet (past the end) shifts by 0, not by -inf
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p, v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _varlen_attend_keys(q, K, V, start, length, hi, offs_m, h, offs_d,
                        stride_kn, stride_kh, stride_kd,
                        stride_vn, stride_vh, stride_vd, D, sm_scale,
                        CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """The sequence's keys 0 .. hi - 1, BLOCK_N at a time, through the online
    softmax; returns the fp32 (acc, l_i) of the query rows offs_m."""
    m_i = tl.full([offs_m.shape[0]], float("-inf"), tl.float32)  # row max
    l_i = tl.zeros([offs_m.shape[0]], tl.float32)                # row sum
    acc = tl.zeros([offs_m.shape[0], BLOCK_D], tl.float32)       # fp32 acc
    d_ok = offs_d[None, :] < D
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        n_ok = cols[:, None] < length     # key rows past the end read 0
        k = tl.load(_varlen_rows(K, start, cols, h, offs_d, stride_kn,
                                 stride_kh, stride_kd),
                    mask=n_ok & d_ok, other=0.0)
        v = tl.load(_varlen_rows(V, start, cols, h, offs_d, stride_vn,
                                 stride_vh, stride_vd),
                    mask=n_ok & d_ok, other=0.0)
        visible = cols[None, :] < length
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc,
                                             sm_scale, IEEE)
    return acc, l_i


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
    ok = (offs_m[:, None] < length) & (offs_d[None, :] < D)  # past the end: 0
    q = tl.load(_varlen_rows(Q, start, offs_m, h, offs_d, stride_qn,
                             stride_qh, stride_qd), mask=ok, other=0.0)
    hi = length
    if CAUSAL:  # keys after this block's last row are never visible
        hi = tl.minimum(length, (pid_m + 1) * BLOCK_M)
    acc, l_i = _varlen_attend_keys(
        q, K, V, start, length, hi, offs_m, h, offs_d,
        stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
        D, sm_scale, CAUSAL, BLOCK_N, BLOCK_D, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(_varlen_rows(Out, start, offs_m, h, offs_d, stride_on, stride_oh,
                          stride_od), out.to(Out.dtype.element_ty), mask=ok)


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
