"""The pointer distribution of a Pointer Network in one Triton kernel.

Vinyals, Fortunato, Jaitly, "Pointer Networks" (2015), eq. 3: the decoder at step i points at
input j with

    u_j = v^T tanh(W1 e_j + W2 d_i),    p(C_i = j | C_<i, P) = softmax_j(u_j)

(``refimpl.pointer.pointer_log_probs`` takes keys = W1 e [..., n, H] and query = W2 d [..., H]).
In plain torch that is an add broadcast to [..., n, H], a tanh, a matrix-vector product, a
masked_fill and a log_softmax, each a pass over memory. Here one program per query row
streams H in blocks of BLOCK_H, accumulating the n scores in fp32 registers, masks the chosen
positions to -inf, and writes log_softmax(u) in the same pass. BLOCK_N covers the whole row
(pointer rows are short: n is the number of inputs, at most 1024 here), so the softmax needs no
second pass.

Layouts, both without copies (a broadcast dimension is passed as stride 0):
- decoding:         keys [B, n, H],    query [B, H],    mask [B, n]     -> [B, n]
- teacher forcing:  keys [B, 1, n, H], query [B, T, H], mask [B, T, n]  -> [B, T, n]
  (the same keys for all T steps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from refimpl.kernels.common import FLOAT_DTYPES, check_device, check_launch, check_same_device

MAX_N = 1024  # one program holds a row's n scores in registers
TILE = 8192  # elements of the [BLOCK_N, BLOCK_H] tile of keys one program holds at a time


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}): no overflow, no
    # cancellation near 0
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _pointer_kernel(Keys, Query, V, Mask, Out, T, N, H, skb, skt, skn, skh,
                    sqb, sqt, sqh, sv, smb, smt, smn, HAS_MASK: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)  # row = b * T + t
    b = row // T
    t = row % T
    offs_n = tl.arange(0, BLOCK_N)
    in_row = offs_n < N
    k_row = Keys + b * skb + t * skt
    q_row = Query + b * sqb + t * sqt
    # 1. u_j = sum_h v_h tanh(k_jh + q_h), H streamed in blocks, fp32
    # accumulation
    u = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        ok_h = cols < H
        k_ptr = k_row + offs_n[:, None] * skn + cols[None, :] * skh
        k = tl.load(k_ptr, mask=in_row[:, None] & ok_h[None, :], other=0.0)
        q = tl.load(q_row + cols * sqh, mask=ok_h, other=0.0).to(tl.float32)
        # v = 0 past H: no term
        v = tl.load(V + cols * sv, mask=ok_h, other=0.0).to(tl.float32)
        u += tl.sum(_tanh(k.to(tl.float32) + q[None, :]) * v[None, :], axis=1)
    # 2. positions already chosen (mask True) and padding lanes get -inf
    keep = in_row
    if HAS_MASK:
        chosen = tl.load(Mask + b * smb + t * smt + offs_n * smn, mask=in_row,
                         other=1)
        keep = keep & (chosen == 0)
    u = tl.where(keep, u, float("-inf"))
    # 3. log_softmax over the row; the wrapper guarantees one open position, so
    # m is finite
    m = tl.max(u, axis=0)
    lse = m + tl.log(tl.sum(tl.exp(u - m), axis=0))
    tl.store(Out + row * N + offs_n, u - lse, mask=in_row)


def _check(keys, query, v, mask):
    """Shapes and dtypes; returns the leading (batch) shape of the output."""
    for name, x in (("keys", keys), ("query", query), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
    if not 2 <= keys.dim() <= 4:
        raise ValueError(f"keys must be [n, H], [B, n, H] or [B, T or 1, n, H], got {tuple(keys.shape)}")
    n, H = keys.shape[-2:]
    if n < 1 or H < 1:
        raise ValueError(f"keys needs n >= 1 positions and H >= 1 features, got {tuple(keys.shape)}")
    if n > MAX_N:
        raise ValueError(f"keys has n={n} positions; the kernel holds a row in one block: n must "
                         f"be in [1, {MAX_N}]")
    if query.dim() != keys.dim() - 1 or query.shape[-1] != H:
        raise ValueError(f"query must be keys' shape without n, [..., H={H}] with {keys.dim() - 2} "
                         f"leading dims, got {tuple(query.shape)} for keys {tuple(keys.shape)}")
    if v.shape != (H,):
        raise ValueError(f"v must be [H] = [{H}], got {tuple(v.shape)}")
    try:
        lead = torch.broadcast_shapes(keys.shape[:-2], query.shape[:-1])
    except RuntimeError:
        raise ValueError(f"the leading dims of keys {tuple(keys.shape[:-2])} and query "
                         f"{tuple(query.shape[:-1])} do not broadcast") from None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = forbidden), got {mask.dtype}")
        try:
            fits = torch.broadcast_shapes(mask.shape, (*lead, n)) == (*lead, n)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"mask must broadcast to [..., n] = {(*lead, n)}, got {tuple(mask.shape)}")
        if mask.expand(*lead, n).all(-1).any():
            raise ValueError("mask masks every position of a row: its log-softmax is undefined "
                             "(the torch reference refuses it too); leave at least one position open")
    return tuple(lead)


def pointer_log_probs_triton(keys, query, v, mask=None):
    """``refimpl.pointer.pointer_log_probs`` in one kernel launch: log softmax_j(v^T tanh(k_j + q)).

    keys [..., n, H], query [..., H], v [H] in fp32 (fp16/bf16 are computed in fp32);
    mask [..., n] bool, True where a position may not be chosen. Returns fp32 log-probs
    [..., n]; masked positions are exactly -inf. A row with every position masked raises a
    ValueError, as in the reference.
    """
    lead = _check(keys, query, v, mask)
    check_same_device("keys", keys, query=query, v=v, mask=mask)
    check_device(keys, "keys", _pointer_kernel)
    n, H = keys.shape[-2:]
    lead2 = (1,) * (2 - len(lead)) + lead  # rows indexed by (b, t); broadcast dims get stride 0
    k = keys.expand(*lead, n, H).reshape(*lead2, n, H)
    q = query.expand(*lead, H).reshape(*lead2, H)
    out = torch.empty(*lead2, n, dtype=torch.float32, device=keys.device)
    check_launch(keys=k, query=q, out=out)
    if out.numel() == 0:
        return out.view(*lead, n)
    B, T = lead2
    if mask is not None:
        m = mask.expand(*lead, n).reshape(*lead2, n).view(torch.uint8)
        mask_strides = m.stride()
    else:
        m, mask_strides = out, (0, 0, 0)  # a dummy pointer, never read
    _pointer_kernel[(B * T,)](
        k, q, v, m, out, T, n, H, *k.stride(), *q.stride(), v.stride(0), *mask_strides,
        HAS_MASK=mask is not None, **launch_config(n))
    return out.view(*lead, n)


def launch_config(n):
    """Block sizes for rows of n <= 1024 positions: the whole row, and as
    many features as keep the tile at TILE elements, at most 64; 8 warps
    past 64 positions, where 4 spill registers (``refimpl.kernels.aot``
    measures it)."""
    BLOCK_N = max(16, triton.next_power_of_2(n))
    return {"BLOCK_N": BLOCK_N, "BLOCK_H": min(64, TILE // BLOCK_N),
            "num_warps": 4 if BLOCK_N <= 64 else 8}
