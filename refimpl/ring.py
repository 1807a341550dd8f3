"""Ring attention and DeepSpeed-Ulysses, simulated on one machine.

Li et al., "Sequence Parallelism: Long Sequence Training from System Perspective" (2021)
split the sequence over P devices and pass key/value blocks around a ring (Ring
Self-Attention). Liu et al., "Ring Attention with Blockwise Transformers" (2023) make each
step a blockwise (flash) attention whose partial results are merged with the online
softmax, and overlap the pass with the compute, so memory per device scales with N / P.
Jacobs et al., "DeepSpeed Ulysses" (2023) instead re-shard with two all-to-alls: sequence-
sharded to head-sharded, full attention per head group, and back.

Here the P devices are simulated: each holds only its own Q, K, V shard, and K/V blocks move
only through ``_send``, which copies the tensors and records a ``Message`` (phase, step,
sender, receiver, bytes). Each device's resident tensors are accounted, giving its peak
working memory. ``comm_volume`` is the analytic count the message log must equal.

A partial result over a key subset is a pair (out, lse) with lse the log-sum-exp of the
scores of that subset; two partials over disjoint key sets merge exactly (the online softmax
of Milakov & Gimelshein 2018, FlashAttention Algorithm 1 lines 9-12):

    lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from refimpl.lm import check_int, check_real, shape_or_type

LAYOUTS = ("contiguous", "zigzag", "striped")
SCHEMES = ("ring", "allgather", "ulysses")
BACKENDS = ("torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PHASES = ("forward", "backward")


def check_partials(out_a, lse_a, out_b, lse_b):
    """ValueError unless out_a, out_b are tensors [..., T, D] of one shape and lse_a, lse_b [..., T]."""
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or t.ndim < (2 if name.startswith("out") else 1):
            raise ValueError(f"{name} must be a tensor ({'[..., T, D]' if name.startswith('out') else '[..., T]'}), "
                             f"got {shape_or_type(t)}")
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b.shape {shape_or_type(out_b)} must equal out_a.shape {shape_or_type(out_a)}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != out_a.shape[:-1]:
            raise ValueError(f"{name}.shape {shape_or_type(t)} must be out_a.shape[:-1] = {shape_or_type(out_a)[:-1]}")


def check_blocks(q, k, v, sm_scale, causal_offset):
    """ValueError unless q [..., T, D], k [..., S, D], v [..., S, Dv] fit, sm_scale is a finite real
    number and causal_offset is None or an int."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim < 2:
            raise ValueError(f"{name} must be a tensor [..., rows, head_dim], got {shape_or_type(t)}")
    if k.shape[-1] != q.shape[-1] or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k.shape {shape_or_type(k)} must match q.shape {shape_or_type(q)} except in the key rows")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v.shape {shape_or_type(v)} must match k.shape {shape_or_type(k)} except in the last dim")
    check_real("sm_scale", sm_scale, -math.inf, math.inf)
    if causal_offset is not None:
        check_offset("causal_offset", causal_offset)


def check_offset(name, offset):
    """ValueError unless ``offset`` is an int (of any sign)."""
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {offset!r}")


def check_block_grads(q, v, dout, lse, delta):
    """ValueError unless dout is [..., T, Dv] and lse, delta are [..., T] for the query rows of q."""
    want = {"dout": q.shape[:-1] + v.shape[-1:], "lse": q.shape[:-1], "delta": q.shape[:-1]}
    for name, t in (("dout", dout), ("lse", lse), ("delta", delta)):
        if not isinstance(t, torch.Tensor) or t.shape != want[name]:
            raise ValueError(f"{name} must be a tensor of shape {tuple(want[name])}, got {shape_or_type(t)}")


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partial attention results over disjoint key sets; returns (out, lse) in fp32.

    out_a, out_b [..., T, D], lse_a, lse_b [..., T]. Subtracting the larger lse before exp keeps
    it stable; a row empty in both (lse -inf) stays out 0, lse -inf, with no NaN.
    """
    check_partials(out_a, lse_a, out_b, lse_b)
    m = torch.maximum(lse_a, lse_b)
    m = m.masked_fill(m == float("-inf"), 0.0)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    lse = m + torch.log(total)
    total = total.masked_fill(total == 0, 1.0)
    out = ((wa / total)[..., None] * out_a.float()
           + (wb / total)[..., None] * out_b.float())
    return out, lse


def block_attention(q, k, v, *, sm_scale, causal_offset=None):
    """softmax(sm_scale q k^T + mask) v for one query block and one key block, in fp32.

    Returns (out, lse). With ``causal_offset`` key j is visible to query i iff
    j <= i + causal_offset; None means no mask. A row that sees no key gets out 0, lse -inf.
    """
    check_blocks(q, k, v, sm_scale, causal_offset)
    s = (q.float() @ k.float().transpose(-2, -1)) * sm_scale
    if causal_offset is not None:
        i = torch.arange(q.shape[-2], device=q.device)[:, None]
        j = torch.arange(k.shape[-2], device=q.device)[None, :]
        s = s.masked_fill(j > i + causal_offset, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return p @ v.float(), lse


def block_attention_backward(q, k, v, dout, lse, delta, *, sm_scale,
                             causal_offset=None):
    """Gradients of one (query block, key block) pair given the GLOBAL lse of the query rows.

    With A = exp(S - lse) (the block's slice of the full softmax) and delta = rowsum(dO * O)
    (FlashAttention-2, Algorithm 2): dV = A^T dO, dS = A * (dO V^T - delta),
    dQ = s dS K, dK = s dS^T Q. Returns (dq, dk, dv) in fp32.
    """
    check_blocks(q, k, v, sm_scale, causal_offset)
    check_block_grads(q, v, dout, lse, delta)
    s = (q.float() @ k.float().transpose(-2, -1)) * sm_scale
    if causal_offset is not None:
        i = torch.arange(q.shape[-2], device=q.device)[:, None]
        j = torch.arange(k.shape[-2], device=q.device)[None, :]
        s = s.masked_fill(j > i + causal_offset, float("-inf"))
    a = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    dout = dout.float()
    dv = a.transpose(-2, -1) @ dout
    ds = a * (dout @ v.float().transpose(-2, -1) - delta[..., None])
    dq = (ds @ k.float()) * sm_scale
    return dq, (ds.transpose(-2, -1) @ q.float()) * sm_scale, dv


def empty_partial(q):
    """The partial result over no key yet: out 0 (fp32) and lse -inf, one row per query."""
    return (torch.zeros(q.shape, dtype=torch.float32, device=q.device),
            torch.full(q.shape[:-1], float("-inf"), device=q.device))


def blockwise_attention(q, k, v, *, block_size, causal=False, sm_scale=None):
    """Attention on one device, one key block at a time, merged with the online softmax.

    The memory-saving step of Blockwise Parallel Transformers (Liu & Abbeel 2023): scores
    never exceed [T, block_size]. Returns out in q's dtype.
    """
    check_int("block_size", block_size, 1)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    out, lse = empty_partial(q)
    for start in range(0, k.shape[-2], block_size):
        kb = k[..., start:start + block_size, :]
        vb = v[..., start:start + block_size, :]
        # query i, key start + j: visible iff start + j <= i
        offset = -start if causal else None
        o, l = block_attention(q, kb, vb, sm_scale=sm_scale,
                               causal_offset=offset)
        out, lse = merge_partials(out, lse, o, l)
    return out.to(q.dtype)


def check_segment(seg):
    """ValueError unless seg has start >= 0, length >= 1 and stride >= 1 (all ints)."""
    check_int("start", seg.start, 0)
    check_int("length", seg.length, 1)
    check_int("stride", seg.stride, 1)


def check_segments(name, segs):
    """ValueError unless ``segs`` is a non-empty list of ``Segment``s of one stride."""
    fields = ("start", "length", "stride")  # duck-typed: a notebook defines its own Segment
    if not isinstance(segs, (list, tuple)) or not segs or not all(hasattr(s, f) for s in segs for f in fields):
        raise ValueError(f"{name} must be a non-empty list of Segment, got {segs!r}")
    if len({s.stride for s in segs}) > 1:
        raise ValueError(f"{name} must share one stride, got strides {[s.stride for s in segs]}")


def check_shard_args(seq_len, world_size, layout, name="seq_len"):
    """ValueError unless ``layout`` is known and cuts ``seq_len`` into equal parts for ``world_size``."""
    check_int("world_size", world_size, 1)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = 2 * world_size if layout == "zigzag" else world_size
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1 or seq_len % parts:
        raise ValueError(f"{name} = {seq_len!r} must be a positive multiple of "
                         f"{parts} ({'2 * ' if layout == 'zigzag' else ''}world_size) "
                         f"for layout {layout!r}")


@dataclass(frozen=True)
class Segment:
    """Global positions start, start + stride, ..., start + (length - 1) * stride."""
    start: int
    length: int
    stride: int = 1

    def __post_init__(self):
        check_segment(self)

    def positions(self) -> torch.Tensor:
        end = self.start + self.length * self.stride
        return torch.arange(self.start, end, self.stride)


def shard_segments(seq_len: int, world_size: int,
                   layout: str) -> list[list[Segment]]:
    """Which global positions each rank holds.

    contiguous: rank r holds chunk r of P. zigzag: 2P chunks, rank r holds r and 2P-1-r (each
    rank gets one early and one late chunk, so causal work balances). striped: rank r holds
    positions r, r + P, r + 2P, ... (Brandon et al. 2023, Striped Attention).
    """
    check_shard_args(seq_len, world_size, layout)
    P = world_size
    if layout == "contiguous":
        c = seq_len // P
        return [[Segment(r * c, c)] for r in range(P)]
    if layout == "zigzag":
        c = seq_len // (2 * P)
        return [[Segment(r * c, c), Segment((2 * P - 1 - r) * c, c)]
                for r in range(P)]
    return [[Segment(r, seq_len // P, P)] for r in range(P)]  # striped


def positions_of(segments: list[Segment]) -> torch.Tensor:
    check_segments("segments", segments)
    return torch.cat([s.positions() for s in segments])


def pair_offset(q_seg: Segment, k_seg: Segment) -> int:
    """Causal offset between two segments of the same stride.

    Query a + i*st sees key b + j*st iff j <= i + (a - b) / st, i.e. j <= i + floor((a - b) / st).
    """
    check_segments("[q_seg, k_seg]", [q_seg, k_seg])
    return (q_seg.start - k_seg.start) // q_seg.stride


def visible_pairs(offset: int, tq: int, tk: int) -> int:
    """Number of (query, key) pairs with j <= i + offset in a tq x tk block (the work)."""
    check_offset("offset", offset)
    check_int("tq", tq, 0)
    check_int("tk", tk, 0)
    return int(torch.arange(offset + 1, offset + 1 + tq).clamp(0, tk).sum())


def visible_tiles(q_segs, k_segs, causal):
    """Yield (a, b, rows, cols, offset, n) for every pair (query segment a, key segment b) with
    a visible key: rows and cols slice the local shards, offset is the pair's causal offset
    (None without causal), n the number of visible (query, key) pairs."""
    check_segments("q_segs", q_segs)
    check_segments("k_segs", k_segs)
    qi = 0
    for a, qs in enumerate(q_segs):
        ki = 0
        for b, ks in enumerate(k_segs):
            offset = pair_offset(qs, ks) if causal else None
            n = (visible_pairs(offset, qs.length, ks.length) if causal
                 else qs.length * ks.length)
            if n:
                rows = slice(qi, qi + qs.length)
                yield a, b, rows, slice(ki, ki + ks.length), offset, n
            ki += ks.length
        qi += qs.length


def check_shard_inputs(q, k, v, q_segs, k_segs):
    """ValueError unless q holds the rows of ``q_segs`` and k, v those of ``k_segs`` ([..., rows, D])."""
    check_segments("q_segs", q_segs)
    check_segments("k_segs", k_segs)
    for name, t, segs in (("q", q, q_segs), ("k", k, k_segs), ("v", v, k_segs)):
        rows = sum(s.length for s in segs)
        if not isinstance(t, torch.Tensor) or t.ndim < 2 or t.shape[-2] != rows:
            raise ValueError(f"{name} must be a tensor [..., {rows}, D] (the rows of its segments), "
                             f"got {shape_or_type(t)}")


def attend_shard(q, k, v, q_segs, k_segs, *, causal, sm_scale,
                 block_fn=block_attention):
    """One device, one ring step: its query shard against the visiting key/value shard.

    Runs ``block_fn`` on each (query segment, key segment) pair with the causal offset of their
    global positions, skips pairs with no visible key, drops the mask for fully visible pairs.
    Returns (out fp32, lse, work, tiles): work = visible (query, key) pairs, tiles = the pairs
    computed as (q segment index, k segment index, visible pairs).
    """
    check_shard_inputs(q, k, v, q_segs, k_segs)
    out, lse = empty_partial(q)
    work, tiles = 0, []
    for a, b, rows, cols, offset, n in visible_tiles(q_segs, k_segs, causal):
        if offset is not None and offset >= k_segs[b].length - 1:
            offset = None  # every key visible to every query: no mask needed
        o, l = block_fn(q[..., rows, :], k[..., cols, :], v[..., cols, :],
                        sm_scale=sm_scale, causal_offset=offset)
        out[..., rows, :], lse[..., rows] = merge_partials(
            out[..., rows, :], lse[..., rows], o, l)
        work += n
        tiles.append((a, b, n))
    return out, lse, work, tiles


def check_trace_query(trace, world_size, phase):
    """ValueError unless world_size covers every rank that sent and phase is None or a known phase."""
    check_int("world_size", world_size, 1 + max((m.sender for m in trace.messages), default=0))
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase must be None or one of {PHASES}, got {phase!r}")


@dataclass
class Message:
    phase: str      # "forward" or "backward"
    step: int
    sender: int
    receiver: int
    nbytes: int
    what: str       # "kv", "kv+dkv", "dkv", "q", "k", "v", "out"


@dataclass
class RingTrace:
    """What a simulated run did: every message, work per step and device, peak memory."""
    messages: list[Message] = field(default_factory=list)
    work: dict = field(default_factory=dict)        # phase -> [step][rank] visible pairs
    holds: dict = field(default_factory=dict)       # phase -> [step][rank] rank whose K/V is held
    tiles: dict = field(default_factory=dict)       # phase -> [step][rank] list of tiles
    peak_bytes: dict = field(default_factory=dict)  # phase -> [rank] peak resident bytes

    def bytes_sent(self, world_size, phase=None) -> list[int]:
        """Bytes each rank sent (in ``phase``, or in all phases)."""
        check_trace_query(self, world_size, phase)
        sent = [0] * world_size
        for m in self.messages:
            if phase is None or m.phase == phase:
                sent[m.sender] += m.nbytes
        return sent


class _Memory:
    """Resident bytes of one simulated device: named buffers plus a transient term."""

    def __init__(self):
        self.buffers, self.peak = {}, 0

    def hold(self, name, *tensors):
        self.buffers[name] = sum(t.numel() * t.element_size() for t in tensors)
        self.peak = max(self.peak, sum(self.buffers.values()))

    def drop(self, name):
        self.buffers.pop(name, None)

    def transient(self, nbytes):
        self.peak = max(self.peak, sum(self.buffers.values()) + nbytes)


def _send(trace, phase, step, sender, receiver, what, *tensors):
    """The only way data moves between simulated devices: a copy, logged with its size."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    trace.messages.append(Message(phase, step, sender, receiver, nbytes, what))
    return tuple(t.clone() for t in tensors)


def _score_bytes(backend, q_segs, k_segs, q):
    """The torch backend materialises a [B, H, tq, tk] fp32 score block; the kernel does not."""
    if backend != "torch":
        return 0
    tq = max(s.length for s in q_segs)
    tk = max(s.length for s in k_segs)
    return q.shape[0] * q.shape[1] * tq * tk * 4


def _block_fn(backend):
    if backend == "torch":
        return block_attention
    from refimpl.kernels.ring import ring_block_attention  # needs CUDA or TRITON_INTERPRET=1
    return ring_block_attention


def check_ring_shards(shards, segs, **per_rank):
    """ValueError unless shards is a non-empty list of (q, k, v), one per rank, and segs and every
    list in ``per_rank`` (outs, lses, douts) have one entry per rank."""
    if not isinstance(shards, (list, tuple)) or not shards or not all(len(s) == 3 for s in shards):
        raise ValueError("shards must be a non-empty list of (q, k, v), one per rank")
    for name, value in (("segs", segs), *per_rank.items()):
        if not isinstance(value, (list, tuple)) or len(value) != len(shards):
            raise ValueError(f"{name} must be a list with one entry per rank ({len(shards)}), "
                             f"got {type(value).__name__} of length {len(value) if hasattr(value, '__len__') else '?'}")


def forward_step(shards, segs, kv, acc, mem, *, causal, sm_scale, backend):
    """One forward ring step on every rank: attend its queries to the K/V it holds (kv[r] =
    (k, v, source rank)) and merge into its accumulator acc[r]. Returns (work, holds, tiles)."""
    block_fn = _block_fn(backend)
    work, holds, tiles = [], [], []
    for r, (q, _, _) in enumerate(shards):
        k, v, src = kv[r]
        mem[r].transient(_score_bytes(backend, segs[r], segs[src], q))
        o, l, w, tl = attend_shard(q, k, v, segs[r], segs[src], causal=causal,
                                   sm_scale=sm_scale, block_fn=block_fn)
        acc[r] = merge_partials(*acc[r], o, l)
        work.append(w), holds.append(src), tiles.append(tl)
    return work, holds, tiles


def pass_kv(trace, step, kv, mem):
    """Every rank sends the K/V it holds to rank r + 1; returns what each rank holds next."""
    P = len(kv)
    moved = [None] * P
    for r, (k, v, src) in enumerate(kv):
        dst = (r + 1) % P
        moved[dst] = (*_send(trace, "forward", step, r, dst, "kv", k, v), src)
    for r in range(P):
        mem[r].drop("recv")
        mem[r].hold("kv", moved[r][0], moved[r][1])
    return moved


def ring_forward(shards, segs, *, causal, sm_scale, backend, trace):
    """Forward ring: P steps; at step t rank r attends to the K/V of rank (r - t) mod P, then
    passes it to rank r + 1 (the send overlaps the compute, so a receive buffer is live).
    ``shards`` is [(q, k, v)] per rank. Returns [(out fp32, lse)] per rank."""
    check_ring_shards(shards, segs)
    P = len(shards)
    mem = [_Memory() for _ in range(P)]
    acc = []
    for r, (q, k, v) in enumerate(shards):
        mem[r].hold("qkv", q, k, v)
        acc.append(empty_partial(q))
        mem[r].hold("out+lse", *acc[r])
    kv = [(k, v, r) for r, (_, k, v) in enumerate(shards)]
    logs = {"work": trace.work, "holds": trace.holds, "tiles": trace.tiles}
    for log in logs.values():
        log["forward"] = []
    for t in range(P):
        if t < P - 1:  # the receive buffer fills while this step computes
            for r in range(P):
                mem[(r + 1) % P].hold("recv", kv[r][0], kv[r][1])
        step = forward_step(shards, segs, kv, acc, mem, causal=causal,
                            sm_scale=sm_scale, backend=backend)
        for log, rows in zip(logs.values(), step):
            log["forward"].append(rows)
        if t < P - 1:
            kv = pass_kv(trace, t, kv, mem)
    trace.peak_bytes["forward"] = [m.peak for m in mem]
    return acc


def attend_shard_backward(q, k, v, dout, lse, delta, grads, q_segs, k_segs,
                          *, causal, sm_scale):
    """One device, one backward ring step: adds the gradients of its query shard against the
    visiting K/V shard into grads = (dq, dk, dv) (fp32, in place). Returns the work."""
    dq, dk, dv = grads
    work = 0
    for _, _, rows, cols, offset, n in visible_tiles(q_segs, k_segs, causal):
        g = block_attention_backward(
            q[..., rows, :], k[..., cols, :], v[..., cols, :],
            dout[..., rows, :], lse[..., rows], delta[..., rows],
            sm_scale=sm_scale, causal_offset=offset)
        dq[..., rows, :] += g[0]
        dk[..., cols, :] += g[1]
        dv[..., cols, :] += g[2]
        work += n
    return work


def pass_kv_grads(trace, step, travel, mem):
    """Backward hop: every rank sends K, V with their fp32 dK, dV to rank r + 1; at the last
    step only dK, dV travel (home). Returns what each rank holds next."""
    P = len(travel)
    moved = [None] * P
    for r, (k, v, dk, dv, src) in enumerate(travel):
        dst = (r + 1) % P
        if step < P - 1:
            sent = _send(trace, "backward", step, r, dst, "kv+dkv",
                         k, v, dk, dv)
        else:  # the last hop: only the gradients go home (dst == src)
            sent = (None, None,
                    *_send(trace, "backward", step, r, dst, "dkv", dk, dv))
        moved[dst] = (*sent, src)
    for r, (k, v, dk, dv, _) in enumerate(moved):
        mem[r].hold("dkv", dk, dv)
        if k is not None:
            mem[r].hold("kv", k, v)
    return moved


def start_backward(shards, outs, lses, douts, mem):
    """Per rank: its fp32 dQ (zero), delta = rowsum(dO * O), and the block that will
    travel, (k, v, dk, dv, source rank) with zero fp32 dk, dv."""
    dqs, deltas, travel = [], [], []
    for r, (q, k, v) in enumerate(shards):
        dqs.append(torch.zeros(q.shape, dtype=torch.float32, device=q.device))
        deltas.append((douts[r].float() * outs[r].float()).sum(-1))
        mem[r].hold("qkv+out+dout+lse", q, k, v, outs[r], douts[r], lses[r])
        mem[r].hold("dq", dqs[r])
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        travel.append((k, v, dk, torch.zeros_like(dk), r))
        mem[r].hold("dkv", dk, dk)
    return dqs, deltas, travel


def ring_backward(shards, outs, lses, douts, segs, *, causal, sm_scale, trace):
    """Backward ring: K, V travel with their fp32 gradient accumulators dK, dV; each rank adds
    its queries' contribution using the global lse saved by the forward, accumulates its own
    dQ locally, and after P steps one last hop brings dK, dV home. Returns [(dq, dk, dv)]."""
    check_ring_shards(shards, segs, outs=outs, lses=lses, douts=douts)
    P = len(shards)
    mem = [_Memory() for _ in range(P)]
    dqs, deltas, travel = start_backward(shards, outs, lses, douts, mem)
    trace.work["backward"], trace.holds["backward"] = [], []
    for t in range(P):
        work = []
        for r, (q, _, _) in enumerate(shards):
            k, v, dk, dv, src = travel[r]
            mem[r].transient(2 * _score_bytes("torch", segs[r], segs[src], q))
            work.append(attend_shard_backward(
                q, k, v, douts[r], lses[r], deltas[r], (dqs[r], dk, dv),
                segs[r], segs[src], causal=causal, sm_scale=sm_scale))
        trace.work["backward"].append(work)
        trace.holds["backward"].append([src for *_, src in travel])
        if P > 1:
            travel = pass_kv_grads(trace, t, travel, mem)
    trace.peak_bytes["backward"] = [m.peak for m in mem]
    return [(dqs[r], travel[r][2], travel[r][3]) for r in range(P)]


def _check_qkv(q, k, v, world_size):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D], got {got}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q.dtype must be one of {FLOAT_DTYPES}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}.shape {tuple(t.shape)} must equal q.shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype ({t.dtype}) must equal q.dtype ({q.dtype})")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")


def check_ring_args(q, k, v, world_size, layout):
    """ValueError naming the argument unless q, k, v [B, H, N, D] can be sharded ``layout``-wise."""
    _check_qkv(q, k, v, world_size)
    check_shard_args(q.shape[2], world_size, layout, name="sequence length N")


def shard_rows(idx, *tensors):
    """Per rank r, a tuple of the rows idx[r] (dim 2) of each tensor."""
    return [tuple(x[:, :, i] for x in tensors) for i in idx]


class _RingAttention(torch.autograd.Function):
    """Forward and backward both run on the simulated ring, shard by shard."""

    @staticmethod
    def forward(ctx, q, k, v, world_size, causal, layout, sm_scale, backend,
                trace):
        segs = shard_segments(q.shape[2], world_size, layout)
        idx = [positions_of(s).to(q.device) for s in segs]
        shards = shard_rows(idx, q, k, v)
        acc = ring_forward(shards, segs, causal=causal, sm_scale=sm_scale,
                           backend=backend, trace=trace)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        for i, (o, l) in zip(idx, acc):
            out[:, :, i], lse[:, :, i] = o.to(q.dtype), l
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (segs, idx, causal, sm_scale, trace)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        segs, idx, causal, sm_scale, trace = ctx.args
        outs, lses, douts = map(list, zip(*shard_rows(idx, out, lse, dout)))
        grads = ring_backward(shard_rows(idx, q, k, v), outs, lses, douts, segs,
                              causal=causal, sm_scale=sm_scale, trace=trace)
        dq, dk, dv = (torch.empty_like(q) for _ in range(3))
        for i, g in zip(idx, grads):
            for full, part in zip((dq, dk, dv), g):
                full[:, :, i] = part.to(q.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def ring_attention(q, k, v, *, world_size, causal=False, layout="contiguous",
                   sm_scale=None, backend="torch", trace=None):
    """Self-attention of q, k, v [B, H, N, D] on ``world_size`` simulated devices in a ring.

    Equals softmax(sm_scale q k^T + causal mask) v exactly (up to fp32 rounding). Pass a
    ``RingTrace`` to get the message log, the work per step and the peak memory per device;
    the backward adds its messages to the same trace. ``backend`` "triton" runs each block
    with the flash-attention kernel of ``refimpl.kernels.ring`` (forward only; the backward
    blocks are plain torch).
    """
    check_ring_args(q, k, v, world_size, layout)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    sm_scale = (1.0 / math.sqrt(q.shape[-1]) if sm_scale is None
                else check_real("sm_scale", sm_scale))
    trace = RingTrace() if trace is None else trace
    return _RingAttention.apply(q, k, v, world_size, bool(causal), layout,
                                sm_scale, backend, trace)


def check_ulysses_args(q, k, v, world_size):
    """ValueError naming the argument unless q, k, v [B, H, N, D] split into world_size head
    groups and world_size sequence shards."""
    _check_qkv(q, k, v, world_size)
    _, H, N, _ = q.shape
    if H % world_size:
        raise ValueError(f"heads H = {H} must be divisible by world_size = {world_size} for Ulysses")
    if N == 0 or N % world_size:
        raise ValueError(f"sequence length N = {N} must be a positive multiple of world_size = {world_size}")


def all_to_all(trace, step, what, pieces):
    """pieces[r][s] is what rank r sends to rank s; returns got[s][r], what s received from r
    (its own piece is not sent)."""
    P = len(pieces)
    def piece(r, s):
        if r == s:
            return pieces[r][s]
        return _send(trace, "forward", step, r, s, what, pieces[r][s])[0]
    return [[piece(r, s) for r in range(P)] for s in range(P)]


def to_head_shards(trace, seq_shards, hp):
    """Ulysses' first all-to-alls: seq_shards[r] = [q, k, v] of rank r, [B, H, N/P, D];
    returns [q, k, v] per rank, each [B, H/P, N, D] (hp = H/P heads, all positions)."""
    P = len(seq_shards)
    head_shards = []  # head_shards[j][s]: rank s's q, k or v
    for j, name in enumerate("qkv"):
        got = all_to_all(trace, 0, name, [
            [seq_shards[r][j][:, s * hp:(s + 1) * hp] for s in range(P)]
            for r in range(P)])
        head_shards.append([torch.cat(got[s], dim=2) for s in range(P)])
    return [[h[s] for h in head_shards] for s in range(P)]


def ulysses_attention(q, k, v, *, world_size, causal=False, sm_scale=None,
                      trace=None):
    """DeepSpeed-Ulysses on simulated devices: all-to-all from sequence-sharded [B, H, N/P, D]
    to head-sharded [B, H/P, N, D] for q, k, v; full attention per head group; all-to-all back.
    Gradients flow through autograd (the transpose of an all-to-all is an all-to-all)."""
    check_ulysses_args(q, k, v, world_size)
    B, H, N, D = q.shape
    P = world_size
    sm_scale = (1.0 / math.sqrt(D) if sm_scale is None
                else check_real("sm_scale", sm_scale))
    trace = RingTrace() if trace is None else trace
    c, hp = N // P, H // P
    mem = [_Memory() for _ in range(P)]
    seq_shards = [[x[:, :, r * c:(r + 1) * c] for x in (q, k, v)]
                  for r in range(P)]
    heads = to_head_shards(trace, seq_shards, hp)
    outs = []
    for s in range(P):
        mem[s].hold("qkv", *seq_shards[s])
        mem[s].hold("qkv_heads", *heads[s])
        mem[s].transient(B * hp * N * N * 4)
        o, _ = block_attention(*heads[s], sm_scale=sm_scale,
                               causal_offset=0 if causal else None)
        outs.append(o.to(q.dtype))
        mem[s].hold("out_heads", outs[s])
    back = all_to_all(trace, 1, "out", [
        [outs[s][:, :, r * c:(r + 1) * c] for r in range(P)] for s in range(P)])
    trace.peak_bytes["forward"] = [m.peak for m in mem]
    return torch.cat([torch.cat(back[r], dim=1) for r in range(P)], dim=2)


def check_comm_args(scheme, seq_len, world_size, heads, head_dim, batch, dtype):
    """ValueError naming the argument unless ``comm_volume`` can count this layer."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    for name, val in (("seq_len", seq_len), ("world_size", world_size), ("heads", heads),
                      ("head_dim", head_dim), ("batch", batch)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    if seq_len % world_size:
        raise ValueError(f"seq_len = {seq_len} must be a multiple of world_size = {world_size}")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")


def comm_volume(scheme, *, seq_len, world_size, heads, head_dim, batch=1,
                dtype=torch.float32, backward=False) -> int:
    """Bytes one device sends for one attention layer (self-attention, H query = K/V heads).

    ring (pass-KV): P - 1 hops of its K and V block, 2 B H (N/P) D each hop, i.e. about
    2 N H D (P-1)/P elements; backward adds P - 1 hops of K, V with fp32 dK, dV and a last hop
    of dK, dV home. allgather: the same forward bytes (a ring all-gather of K, V), but every
    device then holds all of K, V; backward reduce-scatters dK, dV in fp32. ulysses: four
    all-to-alls (q, k, v, out), each keeping 1/P of a device's shard, i.e.
    4 N H D (P-1) / P^2 elements: constant when N and P grow together.
    """
    check_comm_args(scheme, seq_len, world_size, heads, head_dim, batch, dtype)
    P = world_size
    e = torch.empty(0, dtype=dtype).element_size()
    block = batch * heads * (seq_len // P) * head_dim  # elements of one K (or V) shard
    if scheme == "ulysses":
        if heads % P:
            raise ValueError(f"heads = {heads} must be divisible by "
                             f"world_size = {P} for Ulysses")
        fwd = 4 * (P - 1) * (block // P) * e
        return fwd * (2 if backward else 1)
    fwd = 2 * (P - 1) * block * e
    if not backward or P == 1:
        return fwd
    if scheme == "ring":
        return fwd + 2 * (P - 1) * block * e + 2 * P * block * 4
    return fwd + 2 * (P - 1) * block * 4
