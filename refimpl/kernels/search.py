"""The per-step work of (diverse) beam search in one Triton kernel.

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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from refimpl.kernels.common import (FLOAT_DTYPES, MAX_BLOCK, check_block, check_device, check_launch,
                                    check_same_device)
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
