"""Flash-attention forward in Triton, with the plain-torch function it must equal.

FlashAttention (Dao et al. 2022, Algorithm 1) computes

    O = softmax(s * Q K^T + M) V                  (s = sm_scale, M = 0 or -inf mask)

without materialising the T x S score matrix. Each program owns a block of
query rows and streams K, V through in blocks, keeping per row a running max
m, a running normaliser l and an unnormalised output acc. The online softmax
(Milakov & Gimelshein 2018; Algorithm 1, lines 9-12) folds in a new block
S_j = s * Q K_j^T as

    m'  = max(m, rowmax(S_j))
    P   = exp(S_j - m')
    l'  = exp(m - m') l + rowsum(P)
    acc = exp(m - m') acc + P V_j

and at the end O = acc / l (dividing once at the end, not per block as
Algorithm 1 does, as in FlashAttention-2) and the log-sum-exp LSE = m + log l,
which lets results over different key sets be merged later (ring attention).

Causal masking: key j is visible to query i iff j <= i + causal_offset, with
causal_offset = S - T by default (bottom-right aligned: the T queries are the
last T of S positions, as when decoding with a KV cache). A query that sees no
key gets O = 0 and LSE = -inf.

The kernel is four ``@triton.jit`` functions, each short enough to read in one
cell of chapter 0 (notebooks/00_workbench.ipynb), which shows them verbatim:
``_tile`` (pointers and bounds mask of a 2-D tile), ``_attn_fwd_inner`` (the loop
over key tiles: masks, and ``_online_softmax_step`` per tile), ``_attn_store`` (O = acc / l, LSE) and
``_attn_fwd_kernel`` (what one program owns, the causal skip).
"""
from __future__ import annotations

import math
import operator

import torch
import triton
import triton.language as tl

from refimpl.kernels.common import FLOAT_DTYPES, check_device, check_launch, interpreted, mma

MAX_HEAD_DIM = 128  # larger head dims would need smaller query/key tiles to fit shared memory


@triton.jit
def _tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """Pointers to the tile base[rows, cols] and its in-bounds mask."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    return ptrs, (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One key tile of the online softmax (FlashAttention-2, Algorithm 1):
    scores s [BLOCK_M, BLOCK_N] (-inf where a key is hidden) and values v
    [BLOCK_N, BLOCK_D] update each query row's running max m, normaliser l
    and unnormalised output acc."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows with no visible key yet keep m = -inf: shift them by 0, not by
    # -inf (inf - inf = NaN)
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)  # rescales what was summed so far
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p, v, IEEE)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_inner(
        q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m,
        offs_d, S, D, hi, sm_scale, causal_offset, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr):
    """Online softmax of one query tile over keys 0 .. hi - 1: (acc, l, m)."""
    # per row: running max m, running normaliser l, unnormalised output (fp32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        # K^T tile [BLOCK_D, BLOCK_N], V tile [BLOCK_N, BLOCK_D]; keys >= S: 0
        kt_ptrs, kt_ok = _tile(k_base, offs_d, cols, stride_kd, stride_ks,
                               D, S)
        kt = tl.load(kt_ptrs, mask=kt_ok, other=0.0)
        v_ptrs, v_ok = _tile(v_base, cols, offs_d, stride_vs, stride_vd, S, D)
        v = tl.load(v_ptrs, mask=v_ok, other=0.0)
        s = mma(q, kt, IEEE) * sm_scale  # scores [BLOCK_M, BLOCK_N], fp32
        visible = cols[None, :] < S
        if CAUSAL:  # key j is visible to query i iff j <= i + causal_offset
            diag = offs_m[:, None] + causal_offset
            visible = visible & (cols[None, :] <= diag)
        s = tl.where(visible, s, float("-inf"))
        acc, l_i, m_i = _online_softmax_step(s, v, m_i, l_i, acc, IEEE)
    return acc, l_i, m_i


@triton.jit
def _attn_store(o_ptrs, o_ok, lse_ptrs, lse_ok, acc, l_i, m_i):
    """O = acc / l and LSE = m + log l; l = 0 only where no key was visible,
    and there O = 0 and LSE = -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=o_ok)
    tl.store(lse_ptrs, m_i + tl.log(l_safe), mask=lse_ok)


@triton.jit
def _attn_fwd_kernel(
    # q [B, H, T, D], k and v [B, H, S, D], out like q, lse [B, H, T] contiguous
    Q, K, V, Out, Lse,
    # element strides of q, k, v and out
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    # sizes; sm_scale = 1/sqrt(D); key j is visible to i iff j <= i + offset
    H, T, S, D, sm_scale, causal_offset,
    # compile-time: mask or not; query rows per program, keys per loop step,
    # D padded to a power of two >= 16; exact fp32 dots (the interpreter)
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # this program: query rows pid_m * BLOCK_M + [0, BLOCK_M) of head h, batch b
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D may exceed D: _tile masks the rest
    q_ptrs, q_ok = _tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d,
                         stride_qt, stride_qd, T, D)
    q = tl.load(q_ptrs, mask=q_ok, other=0.0)
    hi = S
    if CAUSAL:  # keys past the last row's diagonal are invisible to the block
        hi = tl.minimum(S, tl.maximum((pid_m + 1) * BLOCK_M + causal_offset, 0))
    acc, l_i, m_i = _attn_fwd_inner(
        q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
        stride_ks, stride_kd, stride_vs, stride_vd, offs_m, offs_d, S, D, hi,
        sm_scale, causal_offset, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)
    o_ptrs, o_ok = _tile(Out + b * stride_ob + h * stride_oh, offs_m, offs_d,
                         stride_ot, stride_od, T, D)
    _attn_store(o_ptrs, o_ok, Lse + pid_bh * T + offs_m, offs_m < T,
                acc, l_i, m_i)


def flash_attention(q, k, v, causal=False, sm_scale=None, causal_offset=None,
                    out_dtype=None):
    """softmax(sm_scale q k^T + mask) v with the Triton kernel; -> (out, lse).

    q [B, H, T, D], k and v [B, H, S, D] with D <= 128; out [B, H, T, D] in
    ``out_dtype`` (default q's; the kernel stores in it), lse [B, H, T] fp32. With ``causal``, key j is visible to
    query i iff j <= i + causal_offset (default S - T). ``causal_offset`` is
    ignored without ``causal``. On a GPU the two matrix products run on tensor
    cores in q's dtype (TF32 for fp32) with fp32 accumulation.
    """
    T, S, sm_scale, causal_offset = check_flash_args(q, k, v, sm_scale,
                                                     causal_offset)
    B, H, _, D = q.shape
    config = launch_config(D, q.dtype)
    check_launch(grid_yz=[("B * H", B * H)], q=q, k=k, v=v)
    check_device(q, "q", _attn_fwd_kernel)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be None or a float dtype, got {out_dtype}")
    out = torch.empty((B, H, T, D), dtype=out_dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    grid = (triton.cdiv(T, config["BLOCK_M"]), B * H)  # query blocks x heads
    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, T, S, D, sm_scale, causal_offset,
        CAUSAL=bool(causal), IEEE=interpreted(_attn_fwd_kernel), **config,
    )
    return out, lse


def launch_config(D, dtype):
    """Block sizes and warps for head dim D <= 128 (also those of
    ``refimpl.kernels.packing``).

    64 x 64 tiles of queries and keys, but 32 x 32 for fp32 at D > 64: fp32
    tiles take twice the bytes, and 64-key K and V tiles in Triton's three
    pipeline stages would need 178 KiB of shared memory on sm_80, over an
    A100's 163 KiB. Tiles over 8 KiB get 8 warps, not 4, or ptxas spills
    registers. ``refimpl.kernels.aot`` measures both on a CPU.
    """
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"the head dim D must be in [1, {MAX_HEAD_DIM}], "
                         f"got {D}")
    BLOCK_D = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16
    block = 32 if dtype == torch.float32 and BLOCK_D > 64 else 64
    tile_bytes = block * BLOCK_D * dtype.itemsize
    return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": BLOCK_D,
            "num_warps": 8 if tile_bytes > 8192 else 4}


def attention_reference(q, k, v, causal=False, sm_scale=None, causal_offset=None):
    """The same function in plain torch, in fp32: materialise the scores, mask, softmax."""
    T, S, sm_scale, causal_offset = check_flash_args(q, k, v, sm_scale, causal_offset)
    scores = (q.float() @ k.float().transpose(-2, -1)) * sm_scale
    if causal:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + causal_offset, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for a row with no visible key
    p = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return (p @ v.float()).to(q.dtype), lse


def check_flash_args(q, k, v, sm_scale, causal_offset):
    """ValueError / TypeError for ``flash_attention`` and ``attention_reference``: shapes and
    dtypes; return T, S and the resolved sm_scale and causal_offset."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T or S, D], got {got}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q.dtype must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype ({t.dtype}) must equal q.dtype ({q.dtype})")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape[:2] != q.shape[:2] or t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} must be [B, H, S, D] = [{q.shape[0]}, {q.shape[1]}, S, "
                             f"{q.shape[3]}] to match q, got {tuple(t.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length S, got {k.shape[2]} and {v.shape[2]}")
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    if D < 1:
        raise ValueError("q, k, v need a head dim D >= 1")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    if causal_offset is None:
        causal_offset = S - T
    elif isinstance(causal_offset, bool):
        raise TypeError("causal_offset must be an int")
    else:
        causal_offset = operator.index(causal_offset)
    return T, S, sm_scale, causal_offset
