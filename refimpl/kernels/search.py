"""Two Triton kernels of beam search: the per-step candidate scores, and the shared-prefix
attention of its KV cache.

Diverse beam search (Vijayakumar et al. 2016, Algorithm 1 with the Hamming diversity of
eq. 4) advances group g by scoring every continuation v of each of its beams j,

    cand[n, j, v] = running[n, j] + logits[n, j, v] - logsumexp_v(logits[n, j])
                    - diversity_penalty * counts[n, v]

and keeping the top k = 2 * B/G of the Bg * V candidates of prompt n. In plain torch that
is a log_softmax, a subtraction, an addition and a top-k over a [N, Bg * V] tensor, each a
pass over memory. Here one program per beam row (n, j) makes two passes over the vocabulary:

1. an online log-sum-exp (running max m and normaliser l, as in FlashAttention's softmax),
2. the candidate scores block by block, keeping each block's k best by k rounds of
   max / argmax / mask-out (a loop, not unrolled: k is not a compile-time constant),
   written as [N, Bg, n_blocks, k] values and flat indices.

The global top-k per prompt is then a torch.topk over Bg * n_blocks * k survivors instead
of Bg * V scores (k survivors per block suffice: the global top-k holds at most k of any
block). ``refimpl.search.group_candidates`` is the reference it must equal.

Shared-prefix (cascade) attention: the beam-search cache keeps each prompt's keys and values once
(``refimpl.search.SharedPrefixCache``), and Hydragen (Juravsky et al. 2024, sec. 3) stacks the
queries of all beams and GQA heads of a prompt into one matrix, so that attention to the prefix
is one matrix product per prompt and kv head rather than one matrix-vector product per beam; it
is merged with each beam's own suffix by the log-sum-exps. ``_prefix_attention_kernel`` computes
the prefix part with FlashAttention's online softmax (Dao et al. 2022, Algorithm 1; chapter 0's
``_tile`` and ``_attn_store``), with an additive key mask per prompt (left padding):

    out = softmax(s q k^T + mask) v,    lse = logsumexp(s q k^T + mask)

for q [N, Hkv, M, D] (M = beams x GQA group x new tokens) and k, v [N, Hkv, S, D]. One program
owns BLOCK_M of the M query rows of one (prompt, kv head), by default all (up to 64), so each key
tile is read once for every beam. ``refimpl.search.partial_attention`` is the reference.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from refimpl.kernels.attention import _attn_store, _online_softmax_step, _tile
from refimpl.kernels.attention import launch_config as attention_launch_config
from refimpl.kernels.common import (FLOAT_DTYPES, MAX_BLOCK, check_block, check_device, check_launch,
                                    check_same_device, interpreted, mma)
from refimpl.lm import shape_or_type
from refimpl.search import check_candidate_args


@triton.jit
def _row_logsumexp(base, V, BLOCK_V: tl.constexpr):
    """log sum_v exp(x[v]) of one row of V values, in one pass of blocks:
    each lane keeps a running max m and a normaliser l (online softmax)."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        ok = start + offs < V
        x = tl.load(base + start + offs, mask=ok, other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, x)
        # a lane that has seen only padding keeps m = -inf: shift it by 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    return m_row + tl.log(tl.sum(l * tl.exp(m - m_row), 0))


@triton.jit
def _group_candidates_kernel(
    Logits, Running, Counts, OutVal, OutIdx,
    stride_lr, stride_cn, Bg, V, n_blocks, penalty, K,
    BLOCK_V: tl.constexpr, HAS_PENALTY: tl.constexpr,
):
    row = tl.program_id(0)              # one program per beam: row = n * Bg + j
    n = row // Bg
    j = row % Bg
    offs = tl.arange(0, BLOCK_V)
    base = Logits + row * stride_lr
    # pass 1: the row's log-sum-exp; pass 2: scores, each block's K best
    lse = _row_logsumexp(base, V, BLOCK_V)
    shift = tl.load(Running + row).to(tl.float32) - lse
    for blk in range(0, n_blocks):
        cols = blk * BLOCK_V + offs
        ok = cols < V
        s = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32) + shift
        if HAS_PENALTY:
            c = tl.load(Counts + n * stride_cn + cols, mask=ok, other=0.0)
            s = s - penalty * c.to(tl.float32)
        s = tl.where(ok, s, float("-inf"))
        out = (row * n_blocks + blk) * K
        for i in range(0, K):           # K rounds of max, store, mask out
            at = tl.argmax(s, 0)
            tl.store(OutVal + out + i, tl.max(s, 0))
            index = j * V + blk * BLOCK_V + at  # into the group's Bg * V
            tl.store(OutIdx + out + i, index.to(tl.int64))
            s = tl.where(offs == at, float("-inf"), s)


def group_candidates(logits, running, counts=None, diversity_penalty=0.0, k=2, block_v=None):
    """Triton version of ``refimpl.search.group_candidates``: (scores [N, k], flat indices [N, k]).

    logits [N, Bg, V] (fp32/fp16/bf16), running [N, Bg], counts [N, V] or None.
    """
    check_candidate_args(logits, running, counts, diversity_penalty, k)  # the reference's rules
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits.dtype must be float32, float16 or bfloat16, got {logits.dtype}")
    N, Bg, V = logits.shape
    check_same_device("logits", logits, running=running, counts=counts)
    check_launch(logits=logits)
    check_device(logits, "logits", _group_candidates_kernel)
    block_v = check_block("block_v", block_v or launch_config(V)["BLOCK_V"])
    K = min(k, block_v)
    n_blocks = triton.cdiv(V, block_v)
    logits = logits.reshape(N * Bg, V)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    running = running.float().contiguous()
    has_penalty = counts is not None and diversity_penalty > 0
    counts = counts.float().contiguous() if has_penalty else running  # dummy pointer when unused
    vals = torch.empty((N, Bg, n_blocks, K), dtype=torch.float32, device=logits.device)
    idx = torch.empty((N, Bg, n_blocks, K), dtype=torch.int64, device=logits.device)
    _group_candidates_kernel[(N * Bg,)](
        logits, running, counts, vals, idx, logits.stride(0), counts.stride(0) if has_penalty else 0,
        Bg, V, n_blocks, float(diversity_penalty), K, BLOCK_V=block_v, HAS_PENALTY=has_penalty)
    top, pos = vals.view(N, -1).topk(k, dim=1)
    return top, idx.view(N, -1).gather(1, pos)


def launch_config(V):
    """The default vocabulary block: all of V up to MAX_BLOCK lanes, at least 16."""
    return {"BLOCK_V": max(16, min(MAX_BLOCK, triton.next_power_of_2(V)))}


# ---- shared-prefix attention: all beams of a prompt against its keys, read once ----


@triton.jit
def _prefix_attn_inner(q, k_base, v_base, mask_row, stride_ks, stride_kd,
                       stride_vs, stride_vd, offs_d, S, D, sm_scale,
                       HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       IEEE: tl.constexpr):
    """Online softmax of one query tile over the S shared keys, each key
    shifted by its additive mask: (acc, l, m)."""
    # per row: running max m, running normaliser l, unnormalised output (fp32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, S, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        # K^T tile [BLOCK_D, BLOCK_N], V tile [BLOCK_N, BLOCK_D]; keys >= S: 0
        ptrs, ok = _tile(k_base, offs_d, cols, stride_kd, stride_ks, D, S)
        kt = tl.load(ptrs, mask=ok, other=0.0)
        ptrs, ok = _tile(v_base, cols, offs_d, stride_vs, stride_vd, S, D)
        v = tl.load(ptrs, mask=ok, other=0.0)
        s = mma(q, kt, IEEE) * sm_scale  # scores [BLOCK_M, BLOCK_N], fp32
        if HAS_MASK:  # the prompt's key mask: 0, or large negative (padding)
            s = s + tl.load(mask_row + cols, mask=cols < S, other=0.0)[None, :]
        s = tl.where(cols[None, :] < S, s, float("-inf"))  # past the last key
        acc, l_i, m_i = _online_softmax_step(s, v, m_i, l_i, acc, IEEE)
    return acc, l_i, m_i


@triton.jit
def _prefix_attention_kernel(
    # q [N, Hkv, M, D]; k, v [N, Hkv, S, D]; out [N, Hkv, M, D] fp32;
    # contiguous: the key mask [N, S] (fp32) and lse [N, Hkv, M]
    Q, K, V, Mask, Out, Lse,
    stride_qn, stride_qh, stride_qm, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_vd,
    stride_on, stride_oh, stride_om, stride_od,
    Hkv, M, S, D, sm_scale,
    # compile-time: key mask or not; query rows per program, keys per loop
    # step, D padded to a power of two >= 16; exact fp32 dots (interpreter)
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # this program: rows pid_m * BLOCK_M + [0, BLOCK_M) of the M queries
    # (all beams x GQA group) of prompt n at kv head h, against its S keys
    pid_m, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D may exceed D: _tile masks it
    q_ptrs, ok = _tile(Q + n * stride_qn + h * stride_qh, offs_m, offs_d,
                       stride_qm, stride_qd, M, D)
    q = tl.load(q_ptrs, mask=ok, other=0.0)
    k_base = K + n * stride_kn + h * stride_kh  # the prompt's keys, shared
    v_base = V + n * stride_vn + h * stride_vh  # by all M queries
    acc, l_i, m_i = _prefix_attn_inner(
        q, k_base, v_base, Mask + n * S, stride_ks, stride_kd, stride_vs,
        stride_vd, offs_d, S, D, sm_scale, HAS_MASK, BLOCK_M, BLOCK_N,
        BLOCK_D, IEEE)
    o_ptrs, _ = _tile(Out + n * stride_on + h * stride_oh, offs_m, offs_d,
                      stride_om, stride_od, M, D)
    _attn_store(o_ptrs, ok, Lse + (n * Hkv + h) * M + offs_m, offs_m < M,
                acc, l_i, m_i)


def prefix_attention(q, k, v, key_mask=None, sm_scale=None, block_m=None, block_n=None):
    """Triton version of ``refimpl.search.partial_attention`` for a per-prompt key mask:
    (out [N, Hkv, M, D] fp32, lse [N, Hkv, M]).

    q [N, Hkv, M, D]: the M queries of prompt n at kv head h (beams x GQA group x new tokens);
    k, v [N, Hkv, S, D] with D <= 128, in q's dtype (fp32/fp16/bf16); key_mask None or float
    [N, S], added to every query's scores (0 where a key is visible, a large negative number
    where it is padding); sm_scale default 1/sqrt(D). A query whose keys are all -inf gets
    out = 0 and lse = -inf. On a GPU the two products run on tensor cores in q's dtype (TF32
    for fp32) with fp32 accumulation.
    """
    N, Hkv, M, S, D = check_prefix_args(q, k, v, key_mask)
    sm_scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be a finite float or None, got {sm_scale}")
    config = prefix_launch_config(M, D, q.dtype)
    config["BLOCK_M"] = check_block("block_m", block_m or config["BLOCK_M"])
    config["BLOCK_N"] = check_block("block_n", block_n or config["BLOCK_N"])
    check_launch(grid_yz=[("N", N), ("Hkv", Hkv)], q=q, k=k, v=v)
    check_device(q, "q", _prefix_attention_kernel)
    out = torch.zeros((N, Hkv, M, D), dtype=torch.float32, device=q.device)
    lse = torch.full((N, Hkv, M), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or S == 0:  # no queries, or no keys: out = 0, lse = -inf
        return out, lse
    has_mask = key_mask is not None
    mask = key_mask.to(torch.float32).contiguous() if has_mask else lse  # dummy when unused
    grid = (triton.cdiv(M, config["BLOCK_M"]), N, Hkv)  # query blocks x prompts x kv heads
    _prefix_attention_kernel[grid](
        q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hkv, M, S, D, sm_scale, HAS_MASK=has_mask, IEEE=interpreted(_prefix_attention_kernel),
        **config)
    return out, lse


def check_prefix_args(q, k, v, key_mask):
    """ValueError for ``prefix_attention``: shapes, dtypes and devices; -> N, Hkv, M, S, D."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            dims = "M" if name == "q" else "S"
            raise ValueError(f"{name} must be a 4-D tensor [N, Hkv, {dims}, D], "
                             f"got {shape_or_type(t)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q.dtype must be float32, float16 or bfloat16, got {q.dtype}")
    check_same_device("q", q, k=k, v=v, key_mask=key_mask)
    N, Hkv, M, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype ({t.dtype}) must equal q.dtype ({q.dtype})")
        if t.shape[:2] != q.shape[:2] or t.shape[3] != D:
            raise ValueError(f"{name} must be [N, Hkv, S, D] = [{N}, {Hkv}, S, {D}] to match q, "
                             f"got {tuple(t.shape)}")
    S = k.shape[2]
    if v.shape[2] != S:
        raise ValueError(f"k and v must have the same length S, got {S} and {v.shape[2]}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or not key_mask.is_floating_point():
            got = key_mask.dtype if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
            raise ValueError(f"key_mask must be an additive float tensor [N, S] or None, got {got}")
        if tuple(key_mask.shape) != (N, S):
            raise ValueError(f"key_mask must be [N, S] = [{N}, {S}], got {tuple(key_mask.shape)}")
    return N, Hkv, M, S, D


def prefix_launch_config(M, D, dtype):
    """Block sizes and warps of ``prefix_attention`` for M queries per (prompt, kv head) and head
    dim D <= 128.

    BLOCK_M: all M queries in one program (the keys are then read once per prompt and head), a
    power of two >= 16 (tl.dot), at most chapter 0's tile (64, or 32 for fp32 at D > 64: 8 beams
    x a GQA group of 4 still fit). BLOCK_N, BLOCK_D and the warps as ``attention.launch_config``,
    whose shared-memory and register limits hold here too (``refimpl.kernels.aot`` checks them),
    but 8 warps at D <= 16: there the key mask's registers made ptxas spill 8 bytes at 4 warps
    (fp32 on sm_80 and sm_86, fp16 on sm_86).
    """
    config = attention_launch_config(D, dtype)  # ValueError unless 1 <= D <= 128
    config["BLOCK_M"] = max(16, min(config["BLOCK_M"], triton.next_power_of_2(max(M, 1))))
    if config["BLOCK_D"] == 16:
        config["num_warps"] = 8
    return config
