"""The per-step work of a ring-attention device as a Triton flash-attention call.

Ring Attention (Liu et al. 2023, Algorithm 1): at each step a device attends its local query
block to the visiting key/value block with a blockwise (flash) attention and keeps the
log-sum-exp, so the partial results merge exactly across steps. The only ring-specific part
is the causal mask: it depends on the GLOBAL positions of the two blocks. For a query block at
positions a + i*st and a key block at b + j*st (st = 1 for contiguous and zigzag chunks,
st = P for striped), key j is visible to query i iff j <= i + floor((a - b) / st): exactly the
``causal_offset`` of the foundation kernel ``refimpl.kernels.attention.flash_attention``.

``ring_block_attention`` calls that kernel with the two things the ring needs: an fp32
output (``out_dtype``; the kernel stores in the output's dtype), the
dtype of the accumulator that ``refimpl.ring.merge_partials`` keeps across the P steps (no
rounding to q's dtype between steps), and the global offset of any sign (a block wholly in the
future loops over no key and returns out 0, lse -inf, which the merge ignores).
"""
from __future__ import annotations

import operator

import torch

from refimpl.kernels.attention import flash_attention
from refimpl.ring import check_blocks


def global_offset(q_start: int, k_start: int, stride: int = 1) -> int:
    """The causal offset of a query block starting at global position ``q_start`` against a
    key block starting at ``k_start``, both with positions spaced ``stride`` apart."""
    q_start, k_start, stride = (operator.index(x) for x in (q_start, k_start, stride))
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return (q_start - k_start) // stride


def ring_block_attention(q, k, v, *, sm_scale, causal_offset=None):
    """Backend for ``refimpl.ring``: ``flash_attention`` into an fp32 output, with the
    reference block's signature (``refimpl.ring.block_attention``).

    q [B, H, T, D], k and v [B, H, S, D]. Returns (out fp32, lse); ``causal_offset`` None means
    no mask. On ``meta`` tensors (shapes only: the ring's memory model) it returns the two
    outputs' shapes without launching anything.
    """
    check_blocks(q, k, v, sm_scale, causal_offset)
    if q.is_meta:
        B, H, T, D = q.shape
        return (torch.empty((B, H, T, D), dtype=torch.float32, device=q.device),
                torch.empty((B, H, T), dtype=torch.float32, device=q.device))
    return flash_attention(q, k, v, causal=causal_offset is not None, sm_scale=sm_scale,
                           causal_offset=causal_offset, out_dtype=torch.float32)


def ring_step(q, k, v, q_start, k_start, *, causal=False, stride=1, sm_scale=None):
    """One ring step: local queries (global positions q_start + i*stride) against a visiting
    key/value block (k_start + j*stride), in Triton. Returns (out, lse); a query row that
    sees no key (a block entirely in its future) gets out 0 and lse -inf."""
    offset = global_offset(q_start, k_start, stride) if causal else None
    return flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, causal_offset=offset)

