"""Batched speculative verification in Triton, with the plain-torch function it must equal.

One program per row runs the whole verification step of speculative sampling (Leviathan et al.
2022, Algorithm 1; Chen et al. 2023, Algorithm 2) given its uniforms:

    n    = first j with u_j * q_j(x_j) >= p_j(x_j)   (else g: every draft accepted)
    r    = max(0, p_n - q_n)   (q_g = 0, so r = p_g for the bonus token; r = p_n if r has no mass)
    next = the first token k with cumsum(r)_k > v * sum(r)   (inverse-CDF sampling)

The vocabulary is streamed in blocks of BLOCK_V (two passes: the residual mass, then the
inverse CDF with a running carry), so any vocabulary size works, ragged ones included.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from refimpl.kernels.common import FLOAT_DTYPES, check_block, check_device, check_launch, check_same_device


@triton.jit
def _first_rejection(Tok, Q, P, U, b, G, stride_qb, stride_qg, stride_pb,
                     stride_pg):
    """n = the first draft j with u_j q_j(x_j) >= p_j(x_j); G if none."""
    n = G
    for j in range(0, G):
        x = tl.load(Tok + b * G + j)
        px = tl.load(P + b * stride_pb + j * stride_pg + x).to(tl.float32)
        qx = tl.load(Q + b * stride_qb + j * stride_qg + x).to(tl.float32)
        u = tl.load(U + b * G + j)
        rejected = u * qx >= px
        n = tl.where(rejected & (n == G), j, n)
    return n


@triton.jit
def _residual_mass(p_row, q_row, has_q, V, BLOCK_V: tl.constexpr):
    """Pass one over the vocabulary: the mass of max(0, p - q) and of p."""
    offs = tl.arange(0, BLOCK_V)
    mass = 0.0
    p_mass = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        ok = cols < V
        p = tl.load(p_row + cols, mask=ok, other=0.0).to(tl.float32)
        q = tl.load(q_row + cols, mask=ok & has_q, other=0.0).to(tl.float32)
        mass += tl.sum(tl.maximum(p - q, 0.0), axis=0)
        p_mass += tl.sum(p, axis=0)
    return mass, p_mass


@triton.jit
def _inverse_cdf(p_row, q_row, has_q, use_p, threshold, V,
                 BLOCK_V: tl.constexpr):
    """Pass two: the first index whose cumulative weight exceeds threshold,
    the sum of earlier blocks carried into each block's cumsum."""
    offs = tl.arange(0, BLOCK_V)
    carry = 0.0
    found = V
    last = 0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        ok = cols < V
        p = tl.load(p_row + cols, mask=ok, other=0.0).to(tl.float32)
        q = tl.load(q_row + cols, mask=ok & has_q, other=0.0).to(tl.float32)
        w = tl.where(use_p, p, tl.maximum(p - q, 0.0))
        cum = tl.cumsum(w, axis=0) + carry
        hit = (cum > threshold) & ok & (w > 0)
        found = tl.minimum(found, tl.min(tl.where(hit, cols, V), axis=0))
        positive = tl.where((w > 0) & ok, cols, 0)
        last = tl.maximum(last, tl.max(positive, axis=0))
        carry += tl.sum(w, axis=0)
    # rounding can leave the threshold above the total: the last with weight
    return tl.minimum(found, last)


@triton.jit
def _verify_kernel(Tok, Q, P, U, Vu, N_out, Next_out, G, V,
                   stride_qb, stride_qg, stride_pb, stride_pg,
                   BLOCK_V: tl.constexpr):
    b = tl.program_id(0)  # one program per row of the batch
    n = _first_rejection(Tok, Q, P, U, b, G, stride_qb, stride_qg,
                         stride_pb, stride_pg)
    has_q = n < G  # after the last draft q is zero: the residual is p itself
    p_row = P + b * stride_pb + n * stride_pg
    q_row = Q + b * stride_qb + tl.minimum(n, G - 1) * stride_qg
    mass, p_mass = _residual_mass(p_row, q_row, has_q, V, BLOCK_V)
    use_p = mass <= 0.0  # p = q: the residual is empty, sample from p
    threshold = tl.load(Vu + b) * tl.where(use_p, p_mass, mass)
    token = _inverse_cdf(p_row, q_row, has_q, use_p, threshold, V, BLOCK_V)
    tl.store(N_out + b, n)
    tl.store(Next_out + b, token)


def _check(draft_tokens, q, p, u, v):
    B, g = draft_tokens.shape if draft_tokens.ndim == 2 else (-1, -1)
    if g < 1 or q.ndim != 3 or p.ndim != 3 or q.shape[:2] != (B, g) or p.shape[:2] != (B, g + 1) \
            or q.shape[2] != p.shape[2]:
        raise ValueError(f"need draft_tokens [B, g] (g >= 1), q [B, g, V], p [B, g+1, V]; got "
                         f"{tuple(draft_tokens.shape)}, {tuple(q.shape)}, {tuple(p.shape)}")
    if u.shape != (B, g) or v.shape != (B,):
        raise ValueError(f"u must be [B, g] = [{B}, {g}] and v [B] = [{B}], got {tuple(u.shape)}, {tuple(v.shape)}")
    if draft_tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"draft_tokens must be int32 or int64 token ids, got {draft_tokens.dtype}")
    V = p.shape[2]
    # the kernel reads p[b, j, x] and q[b, j, x] at each draft token x: outside [0, V) that is
    # an illegal memory access on a GPU (the torch gather raises on its own)
    if draft_tokens.numel() and not bool(((draft_tokens >= 0) & (draft_tokens < V)).all()):
        raise ValueError(f"draft_tokens must be token ids in [0, V = {V}), got values in "
                         f"[{int(draft_tokens.min())}, {int(draft_tokens.max())}]")


def verify_reference(draft_tokens, q, p, u, v):
    """The torch function the kernel must equal: the same step with the uniforms given."""
    _check(draft_tokens, q, p, u, v)
    B, g = draft_tokens.shape
    px = p[:, :g].gather(2, draft_tokens[..., None]).squeeze(2).float()
    qx = q.gather(2, draft_tokens[..., None]).squeeze(2).float()
    n = (u * qx < px).cumprod(dim=1).sum(dim=1)
    rows = torch.arange(B, device=p.device)
    p_n = p[rows, n].float()
    q_n = torch.nn.functional.pad(q, (0, 0, 0, 1))[rows, n].float()
    w = (p_n - q_n).clamp_min(0)
    w = torch.where(w.sum(-1, keepdim=True) <= 0, p_n, w)
    cdf = w.cumsum(-1)
    nxt = torch.searchsorted(cdf, (v * cdf[:, -1])[:, None].float(), right=True).squeeze(1)
    last = (w > 0).long().cumsum(-1).argmax(-1)  # the last index with positive weight
    return n, torch.minimum(nxt, last)


def verify(draft_tokens, q, p, u, v, block_v: int = 128):
    """Triton verification: (num_accepted [B], next_token [B]) for uniforms u [B, g] and v [B].

    q and p in fp32, fp16 or bf16 (computed in fp32); block_v a power of two in [16, 1024].
    """
    _check(draft_tokens, q, p, u, v)
    for name, t in (("q", q), ("p", p)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype must be float32, float16 or bfloat16, got {t.dtype}")
    check_block("block_v", block_v)
    check_launch(p=p)
    check_same_device("p", p, draft_tokens=draft_tokens, q=q, u=u, v=v)
    check_device(p, "p", _verify_kernel)
    B, g = draft_tokens.shape
    tok = draft_tokens.to(torch.int32).contiguous()
    q, p = q.contiguous(), p.contiguous()
    u, v = u.float().contiguous(), v.float().contiguous()
    n = torch.empty(B, dtype=torch.int32, device=p.device)
    nxt = torch.empty(B, dtype=torch.int32, device=p.device)
    _verify_kernel[(B,)](tok, q, p, u, v, n, nxt, g, p.shape[2], q.stride(0), q.stride(1),
                         p.stride(0), p.stride(1), BLOCK_V=block_v)
    return n.long(), nxt.long()


def speculative_accept_triton(draft_tokens, q, p, generator=None, block_v: int = 128):
    """``refimpl.speculative.speculative_accept`` with the verification in one kernel launch."""
    B, g = draft_tokens.shape
    u = torch.rand(B, g, generator=generator, device=p.device)
    v = torch.rand(B, generator=generator, device=p.device)
    return verify(draft_tokens, q, p, u, v, block_v)
