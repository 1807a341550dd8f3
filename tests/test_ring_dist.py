"""Ring attention and Ulysses over torch.distributed: 4 gloo processes on localhost, spawned once
for every case, checked against single-process scaled_dot_product_attention, against torch's own
ring attention (``_templated_ring_attention``, the engine of its experimental context_parallel),
and with a dead peer that must give an error within the timeout, not a hang."""
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from refimpl import ring_dist as rd
from refimpl.ring import comm_volume

WORLD = 4
B, H, N, D = 1, 4, 32, 8      # N divisible by 2 * WORLD (zigzag), H by WORLD (Ulysses)
CASES = [("ring", "contiguous"), ("ring", "zigzag"), ("ring", "striped"), ("ulysses", "contiguous")]
DEAD_TIMEOUT_S = 3.0


def full_tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(4)]  # q, k, v, dout


def _worker(rank, world, port, outdir):
    from refimpl.ring_dist import (ring_attention_dist, shard, ulysses_attention_dist, unshard)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    q, k, v, dout = full_tensors()
    results = {}
    for scheme, layout in CASES:
        for causal in (False, True):
            params = [shard(x, layout).requires_grad_(True) for x in (q, k, v)]
            stats = {}
            if scheme == "ring":
                out = ring_attention_dist(*params, causal=causal, layout=layout, stats=stats)
            else:
                out = ulysses_attention_dist(*params, causal=causal, stats=stats)
            fwd_bytes = stats["bytes_sent"]
            out.backward(shard(dout, layout))
            results[scheme, layout, causal] = {
                "out": unshard(out.detach(), layout),
                "grads": [unshard(p.grad, layout) for p in params],
                "fwd_bytes": fwd_bytes, "all_bytes": stats["bytes_sent"]}

    # torch's own ring (private API, forward only): CPU flash op, head-tail (= zigzag) balancing
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp
    for causal, balance in ((False, False), (True, False), (True, True)):
        cp._cp_options.enable_load_balance = balance
        layout = "zigzag" if balance else "contiguous"
        out, *_ = cp._templated_ring_attention(
            dist.group.WORLD, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            *(shard(x, layout) for x in (q, k, v)), is_causal=causal)
        results["torch_cp", layout, causal] = {"out": unshard(out.contiguous(), layout)}

    try:
        ring_attention_dist(shard(q, "zigzag"), shard(k, "zigzag")[:, :, :2], shard(v, "zigzag"))
    except ValueError as err:
        results["bad_input"] = str(err)
    torch.save(results, Path(outdir) / f"rank{rank}.pt")

    # a peer that never answers: the last rank stays silent, then dies; the others must fail
    # on the timeout, well before it dies (its death would close the sockets, a quicker error)
    dist.barrier()
    if rank == world - 1:
        time.sleep(4 * DEAD_TIMEOUT_S)
        os._exit(0)
    start = time.perf_counter()
    try:
        ring_attention_dist(*(shard(x, "contiguous") for x in (q, k, v)),
                            timeout=timedelta(seconds=DEAD_TIMEOUT_S))
        dead = {"error": None}
    except RuntimeError as err:
        dead = {"error": str(err)[:300]}
    dead["seconds"] = time.perf_counter() - start
    torch.save(dead, Path(outdir) / f"dead{rank}.pt")
    os._exit(0)  # the process group is broken now: skip its teardown


def _dying_worker(rank, world, port, outdir):
    from refimpl.ring_dist import ring_attention_dist, shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    q, k, v, _ = full_tensors()
    local = [shard(x, "contiguous") for x in (q, k, v)]
    dist.barrier()
    if rank == world - 1:
        os._exit(0)  # a rank that dies just before the ring starts
    start = time.perf_counter()
    try:
        ring_attention_dist(*local, timeout=timedelta(seconds=DEAD_TIMEOUT_S))
        died = {"error": None}
    except RuntimeError as err:
        died = {"error": str(err)[:300]}
    died["seconds"] = time.perf_counter() - start
    torch.save(died, Path(outdir) / f"died{rank}.pt")
    os._exit(0)


def run_workers(worker, world, outdir, limit_s=90):
    """Spawn ``world`` gloo processes with one thread each; fail (never hang) after ``limit_s``."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(worker, args=(world, free_port(), str(outdir)), nprocs=world,
                                 join=False, start_method="spawn")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    deadline = time.time() + limit_s
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the gloo workers did not finish within {limit_s} s")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("ring_dist")
    run_workers(_worker, WORLD, outdir)
    return ([torch.load(outdir / f"rank{r}.pt") for r in range(WORLD)],
            [torch.load(outdir / f"dead{r}.pt") for r in range(WORLD - 1)])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scheme,layout", CASES)
def test_dist_matches_single_process_sdpa(ranks, scheme, layout, causal):
    q, k, v, dout = (x.requires_grad_(True) for x in full_tensors())
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for res in ranks[0]:
        got = res[scheme, layout, causal]
        torch.testing.assert_close(got["out"], ref.detach(), atol=1e-5, rtol=0)
        for g, want in zip(got["grads"], ref_grads):
            torch.testing.assert_close(g, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scheme,layout", CASES)
def test_dist_bytes_sent_match_comm_volume(ranks, scheme, layout, causal):
    kw = dict(seq_len=N, world_size=WORLD, heads=H, head_dim=D, batch=B)
    for res in ranks[0]:
        got = res[scheme, layout, causal]
        assert got["fwd_bytes"] == comm_volume(scheme, **kw)
        assert got["all_bytes"] == comm_volume(scheme, backward=True, **kw)


@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("contiguous", True), ("zigzag", True)])
def test_dist_matches_torchs_own_ring_attention(ranks, layout, causal):
    ours = ranks[0][0]["ring", layout, causal]["out"]
    theirs = ranks[0][0]["torch_cp", layout, causal]["out"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    q, k, v, _ = full_tensors()
    torch.testing.assert_close(theirs, F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                               atol=1e-5, rtol=0)


def test_dist_bad_input_names_the_argument(ranks):
    assert all("k must have q's shape" in res["bad_input"] for res in ranks[0])


def test_silent_peer_gives_an_error_not_a_hang(ranks):
    for dead in ranks[1]:
        assert dead["error"] is not None, "a rank finished a ring whose last member never answered"
        assert dead["seconds"] < 3 * DEAD_TIMEOUT_S


def test_dead_rank_gives_an_error_not_a_hang(tmp_path):
    run_workers(_dying_worker, 2, tmp_path, limit_s=60)
    died = torch.load(tmp_path / "died0.pt")
    assert died["error"] is not None, "a rank finished a ring whose peer had died"
    assert died["seconds"] < 3 * DEAD_TIMEOUT_S


# argument checks run before any message is sent, so they need no process group
def _local(n=4):
    return [torch.randn(B, H, n, D) for _ in range(3)]


BAD_CALLS = {
    "shard x not 4-D": (lambda: rd.shard(torch.zeros(3), "zigzag"), "x must"),
    "unshard x_local": (lambda: rd.unshard([1, 2], "zigzag"), "x_local"),
    "ring q dtype": (lambda: rd.ring_attention_dist(*(x.long() for x in _local())), "dtype"),
    "ring v device": (lambda: rd.ring_attention_dist(*_local()[:2], torch.empty(B, H, 4, D, device="meta")),
                      "v is on meta"),
    "ring q empty": (lambda: rd.ring_attention_dist(*_local(0)), "non-empty"),
    "ring timeout": (lambda: rd.ring_attention_dist(*_local(), timeout=5), "timeout"),
    "ring stats": (lambda: rd.ring_attention_dist(*_local(), stats=[]), "stats"),
    "ring sm_scale NaN": (lambda: rd.ring_attention_dist(*_local(), sm_scale=float("nan")), "sm_scale"),
    "ulysses timeout": (lambda: rd.ulysses_attention_dist(*_local(), timeout=timedelta(seconds=0)), "timeout"),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_check_functions_name_the_argument(case):
    call, match = BAD_CALLS[case]
    with pytest.raises(ValueError, match=match):
        call()
