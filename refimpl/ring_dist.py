"""Ring attention and DeepSpeed-Ulysses over torch.distributed: the real thing.

Liu et al., "Ring Attention with Blockwise Transformers" (2023); Li et al., "Sequence
Parallelism" (2021, Ring Self-Attention); Jacobs et al., "DeepSpeed Ulysses" (2023).

The same algorithm as the simulation in ``refimpl.ring`` (whose block functions it reuses), with
the simulated ``_send`` replaced by point-to-point messages: at each step a rank posts the send
of its current K/V block to rank + 1 and the receive from rank - 1, computes on the block it
holds while the messages fly, then waits. One code path for gloo (CPU) and NCCL (GPU). Every
wait has a timeout, so a dead peer gives a RuntimeError instead of a hang.

    torchrun --nproc-per-node 4 -m refimpl.ring_dist --seq 4096 --heads 8 --dim 64 \
        --causal --layout zigzag --check
"""
from __future__ import annotations

import argparse
import math
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from refimpl.lm import check_real
from refimpl.ring import (attend_shard, attend_shard_backward, block_attention, empty_partial,
                          merge_partials, shard_segments, positions_of, FLOAT_DTYPES, LAYOUTS)

DEFAULT_TIMEOUT = timedelta(seconds=60)


def _peers(group):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return (rank, size, dist.get_global_rank(group, (rank + 1) % size) if group else (rank + 1) % size,
            dist.get_global_rank(group, (rank - 1) % size) if group else (rank - 1) % size)


def _post_exchange(send, group, stats):
    """Start sending ``send`` to the next rank and receiving the previous rank's block."""
    _, size, nxt, prv = _peers(group)
    recv = torch.empty_like(send)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt, group),
                                    dist.P2POp(dist.irecv, recv, prv, group)])
    if stats is not None:
        stats["bytes_sent"] = stats.get("bytes_sent", 0) + send.numel() * send.element_size()
    return works, recv


def _wait(works, timeout):
    for w in works:
        w.wait(timeout)


def local_segments(seq_len, layout, group=None):
    """This rank's global positions under ``layout`` (see ``refimpl.ring.shard_segments``)."""
    return shard_segments(seq_len, dist.get_world_size(group), layout)


def check_4d(name, x):
    """ValueError unless ``x`` is a 4-D tensor [B, H, N, D]."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D], got {got}")


def shard(x, layout, group=None):
    """This rank's shard of a full [B, H, N, D] tensor (every rank holds the full one)."""
    check_4d("x", x)
    segs = local_segments(x.shape[2], layout, group)[dist.get_rank(group)]
    return x[:, :, positions_of(segs).to(x.device)].contiguous()


def unshard(x_local, layout, group=None):
    """All-gather the shards and put every position back in order: [B, H, N, D] on every rank."""
    check_4d("x_local", x_local)
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x_local) for _ in range(size)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    n = x_local.shape[2] * size
    full = torch.empty(*x_local.shape[:2], n, x_local.shape[3], dtype=x_local.dtype, device=x_local.device)
    for segs, part in zip(local_segments(n, layout, group), parts):
        full[:, :, positions_of(segs).to(x_local.device)] = part
    return full


def ring_forward_dist(q, k, v, segs, *, causal, sm_scale, group, timeout, stats):
    """This rank's forward ring; returns (out fp32, lse). ``segs`` are all ranks' segments."""
    rank, size, _, _ = _peers(group)
    out, lse = empty_partial(q)
    kv = torch.stack([k, v])
    for t in range(size):
        if t < size - 1:
            works, incoming = _post_exchange(kv, group, stats)
        src = (rank - t) % size
        o, l, _, _ = attend_shard(q, kv[0], kv[1], segs[rank], segs[src], causal=causal,
                                  sm_scale=sm_scale, block_fn=block_attention)
        out, lse = merge_partials(out, lse, o, l)
        if t < size - 1:
            _wait(works, timeout)
            kv = incoming
    return out, lse


def ring_backward_dist(q, k, v, out, lse, dout, segs, *, causal, sm_scale, group, timeout, stats):
    """This rank's backward ring: K, V travel with fp32 dK, dV; a last hop brings dK, dV home."""
    rank, size, _, _ = _peers(group)
    delta = (dout.float() * out.float()).sum(-1)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
    for t in range(size):
        src = (rank - t) % size
        if t < size - 1:
            kv_works, kv_in = _post_exchange(kv, group, stats)
        attend_shard_backward(q, kv[0], kv[1], dout, lse, delta, (dq, dkv[0], dkv[1]), segs[rank],
                              segs[src], causal=causal, sm_scale=sm_scale)
        if size > 1:  # dK, dV follow their K, V one hop behind; the last hop takes them home
            dkv_works, dkv_in = _post_exchange(dkv, group, stats)
            _wait(dkv_works, timeout)
            dkv = dkv_in
        if t < size - 1:
            _wait(kv_works, timeout)
            kv = kv_in
    return dq, dkv[0], dkv[1]


class _RingAttentionDist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, layout, sm_scale, group, timeout, stats):
        size = dist.get_world_size(group)
        segs = shard_segments(q.shape[2] * size, size, layout)
        out, lse = ring_forward_dist(q, k, v, segs, causal=causal, sm_scale=sm_scale,
                                     group=group, timeout=timeout, stats=stats)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (segs, causal, sm_scale, group, timeout, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        segs, causal, sm_scale, group, timeout, stats = ctx.args
        dq, dk, dv = ring_backward_dist(q, k, v, out, lse, dout, segs, causal=causal,
                                        sm_scale=sm_scale, group=group, timeout=timeout, stats=stats)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _check_local(q, k, v, layout, group, timeout=DEFAULT_TIMEOUT, stats=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D local shard [B, H, N/P, D]")
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} and dtype {q.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dtype not in FLOAT_DTYPES or q.shape[2] < 1:
        raise ValueError(f"q must be a non-empty shard of dtype in {FLOAT_DTYPES}, got {q.dtype} {tuple(q.shape)}")
    if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be a positive datetime.timedelta, got {timeout!r}")
    if stats is not None and not isinstance(stats, dict):
        raise ValueError(f"stats must be None or a dict, got {type(stats).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"zigzag needs an even local length N/P, got {q.shape[2]}")


def ring_attention_dist(q, k, v, *, causal=False, layout="contiguous", sm_scale=None, group=None,
                        timeout=DEFAULT_TIMEOUT, stats=None):
    """Ring attention of this rank's shard q, k, v [B, H, N/P, D] (positions as ``shard`` gives
    them for ``layout``); returns this rank's output shard. Differentiable: the backward runs
    the backward ring. ``stats`` (a dict) accumulates the bytes this rank sent."""
    _check_local(q, k, v, layout, group, timeout, stats)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else check_real("sm_scale", sm_scale)
    return _RingAttentionDist.apply(q, k, v, bool(causal), layout, sm_scale, group, timeout, stats)


class _AllToAll(torch.autograd.Function):
    """x [B, H, n, D] -> split dim ``split`` into P pieces, piece s to rank s, concatenate the
    received pieces along ``cat``. Its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, split, cat, group, timeout, stats):
        ctx.args = (split, cat, group, timeout, stats)
        return _all_to_all(x, split, cat, group, timeout, stats)

    @staticmethod
    def backward(ctx, grad):
        split, cat, group, timeout, stats = ctx.args
        return _all_to_all(grad, cat, split, group, timeout, stats), None, None, None, None, None


def _all_to_all(x, split, cat, group, timeout, stats):
    size = dist.get_world_size(group)
    sends = [p.contiguous() for p in x.chunk(size, dim=split)]
    recvs = [torch.empty_like(sends[0]) for _ in range(size)]
    dist.all_to_all(recvs, sends, group=group, async_op=True).wait(timeout)
    if stats is not None:
        mine = dist.get_rank(group)
        stats["bytes_sent"] = stats.get("bytes_sent", 0) + sum(
            p.numel() * p.element_size() for s, p in enumerate(sends) if s != mine)
    return torch.cat(recvs, dim=cat)


def ulysses_attention_dist(q, k, v, *, causal=False, sm_scale=None, group=None,
                           timeout=DEFAULT_TIMEOUT, stats=None):
    """DeepSpeed-Ulysses on this rank's contiguous shard q, k, v [B, H, N/P, D]: all-to-all to
    [B, H/P, N, D], attention over the whole sequence for H/P heads, all-to-all back."""
    _check_local(q, k, v, "contiguous", group, timeout, stats)
    size = dist.get_world_size(group)
    if q.shape[1] % size:
        raise ValueError(f"heads H = {q.shape[1]} must be divisible by world_size = {size}")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else check_real("sm_scale", sm_scale)
    qh, kh, vh = (_AllToAll.apply(x, 1, 2, group, timeout, stats) for x in (q, k, v))
    out, _ = block_attention(qh, kh, vh, sm_scale=sm_scale, causal_offset=0 if causal else None)
    return _AllToAll.apply(out.to(q.dtype), 2, 1, group, timeout, stats)


def main(argv=None):
    p = argparse.ArgumentParser(description="Ring attention / Ulysses over torch.distributed "
                                "(launch with torchrun).")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", choices=LAYOUTS, default="contiguous")
    p.add_argument("--scheme", choices=("ring", "ulysses"), default="ring")
    p.add_argument("--check", action="store_true",
                   help="compare outputs and gradients with single-process attention")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent peer is an error")
    args = p.parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=args.timeout)
    dist.init_process_group(backend, timeout=timeout)
    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    layout = "contiguous" if args.scheme == "ulysses" else args.layout
    if args.seq % (2 * size if layout == "zigzag" else size):
        p.error(f"--seq must be a multiple of {2 * size if layout == 'zigzag' else size}")
    g = torch.Generator().manual_seed(0)  # every rank draws the same full tensors, keeps its shard
    full = [torch.randn(args.batch, args.heads, args.seq, args.dim, generator=g) for _ in range(4)]
    q, k, v, dout = (shard(x, layout).to(device) for x in full)
    fn = ring_attention_dist if args.scheme == "ring" else ulysses_attention_dist
    kwargs = {"layout": layout} if args.scheme == "ring" else {}
    stats = {}
    out = fn(q, k, v, causal=args.causal, timeout=timeout, stats=stats, **kwargs)
    fwd_bytes = stats["bytes_sent"] if size > 1 else 0
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        fn(q, k, v, causal=args.causal, timeout=timeout, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - start)
    sent = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(sent, torch.tensor([fwd_bytes], device=device))
    lines = [f"{args.scheme} attention, {size} ranks ({backend}), layout {layout}, "
             f"causal {args.causal}",
             f"[B, H, N, D] = [{args.batch}, {args.heads}, {args.seq}, {args.dim}]",
             "forward bytes sent per rank: " + ", ".join(f"{int(s.item()):,}" for s in sent),
             f"forward time: {sorted(times)[len(times) // 2] * 1e3:.1f} ms (median of {args.repeats})"]
    if args.check:
        qf, kf, vf = (x.clone().requires_grad_(True) for x in full[:3])
        params = [x.requires_grad_(True) for x in (q, k, v)]
        out = fn(*params, causal=args.causal, timeout=timeout, **kwargs)
        out.backward(dout)
        grads = [unshard(x.grad, layout).cpu() for x in params]
        out_full = unshard(out.detach(), layout).cpu()
        ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=args.causal)
        ref.backward(full[3])
        err_out = (out_full - ref.detach()).abs().max().item()
        err_grad = max((a - b.grad).abs().max().item() for a, b in zip(grads, (qf, kf, vf)))
        lines.append(f"max |out - single-process SDPA| = {err_out:.2e}, "
                     f"max |grad - SDPA grad| = {err_grad:.2e}")
    if rank == 0:
        print("\n".join(lines), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
