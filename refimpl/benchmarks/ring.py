"""Ring-attention benchmark: load balance, per-device memory, communication, gloo wall time.

Load balance, memory and bytes come from the simulation (``refimpl.ring``); memory and bytes
run it on ``meta`` tensors, which carry shapes but no data, so sequences of a million tokens
cost nothing. Wall time launches real gloo processes on this machine (``refimpl.ring_dist``).
"""
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from refimpl.bench import median_seconds, print_table, write_results
from refimpl.ring import (LAYOUTS, RingTrace, block_attention, comm_volume, ring_attention,
                          ulysses_attention)

HEADS, DIM = 8, 64


def load_balance(worlds=(2, 4, 8, 16), chunk=64):
    """Busiest device's causal work over the ideal (total / P), measured from the simulation."""
    rows = []
    for P in tqdm(worlds, desc="load balance"):
        q = torch.randn(1, 1, chunk * P, 4)
        for layout in LAYOUTS:
            trace = RingTrace()
            ring_attention(q, q, q, world_size=P, causal=True, layout=layout, trace=trace)
            work = [sum(col) for col in zip(*trace.work["forward"])]
            rows.append({"P": P, "layout": layout, "busiest_over_ideal": max(work) / (sum(work) / P),
                         "derived_contiguous": (2 * P - 1) / P})
    return rows


def memory(seqs=(4096, 16384, 65536, 262144, 1048576), worlds=(1, 2, 4, 8)):
    """Per-device peak forward bytes (simulation on meta tensors, fp32, 8 heads of 64), with
    the plain-torch block (materialised scores) and the flash block (the Triton backend, no
    scores); P = 1 with the flash block is flash attention on one device."""
    rows = []
    for N in tqdm(seqs, desc="memory"):
        q = torch.empty(1, HEADS, N, DIM, device="meta")
        for P in worlds:
            peak = {}
            for backend in ("torch", "triton"):
                trace = RingTrace()
                ring_attention(q, q, q, world_size=P, causal=True, backend=backend, trace=trace)
                peak[backend] = trace.peak_bytes["forward"][0] / 2 ** 30
            rows.append({"N": N, "P": P, "peak_GiB": peak["torch"], "peak_flash_GiB": peak["triton"],
                         "full_attention_GiB": (4 * N * HEADS * DIM + N * N * HEADS) * 4 / 2 ** 30})
    return rows


def communication(per_device=4096, worlds=(2, 4, 8, 16, 32)):
    """Bytes per device, N = per_device * P (N and P grow together): simulated log vs comm_volume."""
    rows = []
    for P in tqdm(worlds, desc="communication"):
        N = per_device * P
        heads = 32  # Ulysses needs heads divisible by P; fixed, so only N and P grow
        q = torch.empty(1, heads, N, DIM, device="meta")
        ring, uly = RingTrace(), RingTrace()
        ring_attention(q, q, q, world_size=P, causal=True, trace=ring)
        ulysses_attention(q, q, q, world_size=P, causal=True, trace=uly)
        kw = dict(seq_len=N, world_size=P, heads=heads, head_dim=DIM)
        rows.append({"P": P, "N": N, "heads": heads,
                     "ring_MiB": ring.bytes_sent(P)[0] / 2 ** 20,
                     "ulysses_MiB": uly.bytes_sent(P)[0] / 2 ** 20,
                     "allgather_MiB": comm_volume("allgather", **kw) / 2 ** 20,
                     "log_equals_formula": ring.bytes_sent(P)[0] == comm_volume("ring", **kw)
                     and uly.bytes_sent(P)[0] == comm_volume("ulysses", **kw)})
    return rows


def _gloo_worker(rank, world, port, cfg, outdir):
    import torch.distributed as dist
    from datetime import timedelta
    from refimpl.ring_dist import ring_attention_dist, shard, ulysses_attention_dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    q, k, v = torch.randn(3, 1, HEADS, cfg["N"], DIM, generator=torch.Generator().manual_seed(0))
    times = {}
    for scheme in ("ring", "ulysses"):
        layout = "zigzag" if scheme == "ring" else "contiguous"
        args = [shard(x, layout) for x in (q, k, v)]
        fn = ((lambda: ring_attention_dist(*args, causal=True, layout=layout)) if scheme == "ring"
              else (lambda: ulysses_attention_dist(*args, causal=True)))
        samples = []
        fn()
        for _ in range(cfg["repeats"]):
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            samples.append(time.perf_counter() - start)
        times[scheme] = statistics.median(samples)
    if rank == 0:
        torch.save(times, Path(outdir) / "times.pt")
    dist.destroy_process_group()


def wall_time(N=4096, worlds=(2, 4), repeats=3):
    """Causal forward wall time: P gloo processes (1 thread each) vs one process (1 thread)."""
    import torch.multiprocessing as mp
    torch.set_num_threads(1)
    q, k, v = torch.randn(3, 1, HEADS, N, DIM, generator=torch.Generator().manual_seed(0))
    rows = [{"setup": "1 process, torch block (materialised scores)", "P": 1,
             "seconds": median_seconds(lambda: block_attention(q, k, v, sm_scale=DIM ** -0.5,
                                                               causal_offset=0), repeats)},
            {"setup": "1 process, torch SDPA", "P": 1,
             "seconds": median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(
                 q, k, v, is_causal=True), repeats)}]
    os.environ["OMP_NUM_THREADS"] = "1"
    for P in tqdm(worlds, desc="gloo"):
        with tempfile.TemporaryDirectory() as outdir, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            mp.start_processes(_gloo_worker, args=(P, port, {"N": N, "repeats": repeats}, outdir),
                               nprocs=P, join=True, start_method="spawn")
            times = torch.load(Path(outdir) / "times.pt")
        rows.append({"setup": f"{P} gloo processes, ring (zigzag)", "P": P, "seconds": times["ring"]})
        rows.append({"setup": f"{P} gloo processes, Ulysses", "P": P, "seconds": times["ulysses"]})
    return rows


def run() -> dict:
    results = {"heads": HEADS, "head_dim": DIM, "cpu_cores": os.cpu_count(),
               "load_balance": load_balance(), "memory": memory(), "communication": communication(),
               "wall_time": wall_time()}
    for key in ("load_balance", "memory", "communication", "wall_time"):
        print(f"-- {key}")
        print_table(results[key])
    write_results("ring", results, plot)
    return results


def plot(results):
    """The four panels of figures/bench_ring.png from the results (also from the JSON)."""
    fig, axes = plt.subplots(2, 2, figsize=(7, 7.4), layout="constrained")
    ax = axes[0, 0]
    lb = results["load_balance"]
    worlds = sorted({r["P"] for r in lb})
    for i, layout in enumerate(LAYOUTS):
        ax.bar([j + 0.25 * (i - 1) for j in range(len(worlds))],
               [r["busiest_over_ideal"] for r in lb if r["layout"] == layout], 0.25, label=layout)
    ax.hlines([(2 * P - 1) / P for P in worlds], [j - 0.42 for j in range(len(worlds))],
              [j + 0.42 for j in range(len(worlds))], colors="k", lw=2,
              label="(2P-1)/P: contiguous\nlimit (derived)")
    ax.set_xticks(range(len(worlds)), [str(P) for P in worlds])
    ax.set_xlabel("P (devices)")
    ax.set_ylabel("busiest device / ideal (causal)")
    ax.set_title("Load balance (simulated)", fontsize=10)
    ax.set_ylim(0, 3.1)
    ax.legend(fontsize=9, ncol=2, loc="upper left", borderaxespad=0.3, handlelength=1.2, columnspacing=0.8)

    ax = axes[0, 1]
    mem = results["memory"]
    seqs = sorted({r["N"] for r in mem})
    for P in sorted({r["P"] for r in mem}):
        ax.loglog(seqs, [r["peak_flash_GiB"] for r in mem if r["P"] == P], "o-",
                  label="flash, 1 device" if P == 1 else f"ring, P={P}")
    ax.loglog(seqs, [r["peak_GiB"] for r in mem if r["P"] == 1], "k--",
              label="1 device, scores\nmaterialised")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("peak memory per device (GiB)")
    ax.set_title(f"Memory, fp32, {HEADS} heads x {DIM}", fontsize=10)
    ax.legend(fontsize=9, loc="upper left")

    ax = axes[1, 0]
    com = results["communication"]
    ps = [r["P"] for r in com]
    for key, label in (("ring_MiB", "ring (pass K/V)"), ("allgather_MiB", "all-gather K/V"),
                       ("ulysses_MiB", "Ulysses (all-to-all)")):
        ax.plot(ps, [r[key] for r in com], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("P (N = 4096 P, 32 heads of 64)")
    ax.set_ylabel("MiB sent per device (forward)")
    ax.set_title("Communication, N and P grow together", fontsize=10)
    ax.legend(fontsize=9)

    ax = axes[1, 1]
    wt = results["wall_time"]
    short = [r["setup"].replace(" gloo processes", " procs").replace("1 process", "1 proc")
             .replace(" (materialised scores)", ", scores") for r in wt]
    ax.barh(short, [1e3 * r["seconds"] for r in wt], color="C2")
    ax.set_xlabel("ms (causal forward, N = 4096)")
    ax.set_title(f"Wall time ({results['cpu_cores']} cores, 1 thread each)", fontsize=10, loc="right")
    return fig
