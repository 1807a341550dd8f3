"""Pointer Network benchmark: the trained model's decoding against the exact solver.

Vinyals et al. (2015) sell the Ptr-Net as an approximate solver: what it buys is speed, what it
costs is tour length. So the benchmark times, one instance at a time, the trained TSP models'
greedy and beam decoding (``refimpl.pointer.solve``) beside the exact Held-Karp dynamic program,
over a fixed set of fresh instances (seed 30_000 + n, disjoint from training, validation and
test), and reports per method the median and range of instances/s and of the optimality gap
(tour length / optimal length - 1, per instance):

- n = 10: the ``tsp10`` checkpoint (trained at n = 10), 64 instances;
- n = 20: the ``tsp5-10`` checkpoint (trained on 5..10 cities), 32 instances, where Held-Karp's
  2^(n-1) (n-1)^2 operations take seconds per instance.

The pointer step itself (``pointer_log_probs``, Pointer Networks eq. 3) is timed too: with CUDA,
``triton.testing.do_bench`` of the torch reference against the fused Triton kernel; without CUDA
the kernel is not timed (the Triton interpreter runs it in numpy: no speed measurement) and the
torch CPU path is timed alone.
"""
import statistics
import time

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from refimpl.bench import median_seconds, print_table, write_results
from refimpl.pointer import held_karp, load, pointer_log_probs, solve, tour_length

SETS = ({"n": 10, "checkpoint": ("tsp", 10), "instances": 64},
        {"n": 20, "checkpoint": ("tsp", "5-10"), "instances": 32})
BEAMS = (1, 3, 10)
SEED = 30_000


def inputs(B, n, H, layout, device, seed=0):
    """Random keys, query, v and a mask of about half the positions (one per row left open)."""
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if layout == "decoding" else (B, n)
    keys = torch.randn(B, n, H, generator=g) if layout == "decoding" else torch.randn(B, 1, n, H, generator=g)
    query, v = torch.randn(*lead, H, generator=g), torch.randn(H, generator=g) / H ** 0.5
    mask = torch.rand(*lead, n, generator=g) < 0.5
    mask.scatter_(-1, torch.randint(0, n, lead, generator=g)[..., None], False)
    return [t.to(device) for t in (keys, query, v, mask)]


def gpu_rows(B, sizes, H):
    import triton

    from refimpl.kernels.pointer import pointer_log_probs_triton
    rows = []
    for layout in ("decoding", "teacher_forcing"):
        for n in tqdm(sizes, desc=layout):
            args = inputs(B, n, H, layout, "cuda")
            err = (pointer_log_probs_triton(*args) - pointer_log_probs(*args)).nan_to_num(0, 0, 0).abs().max()
            t_ref = triton.testing.do_bench(lambda: pointer_log_probs(*args))
            t_tri = triton.testing.do_bench(lambda: pointer_log_probs_triton(*args))
            rows.append({"layout": layout, "B": B, "n": n, "H": H, "rows": B * (1 if layout == "decoding" else n),
                         "torch_us": 1e3 * t_ref, "triton_us": 1e3 * t_tri, "speedup": t_ref / t_tri,
                         "max_abs_err": float(err)})
    return rows


def cpu_rows(B, sizes, H, repeats):
    rows = []
    for n in tqdm(sizes, desc="reference, CPU"):
        args = inputs(B, n, H, "decoding", "cpu")
        t = median_seconds(lambda: pointer_log_probs(*args), repeats)
        rows.append({"layout": "decoding", "B": B, "n": n, "H": H, "torch_us": 1e6 * t,
                     "rows_per_s": B / t})
    return rows


def per_instance(fn, x, repeats, desc):
    """Run ``fn`` on each instance x[i:i+1] (after one warm-up call): (outputs, seconds each),
    seconds being the median of ``repeats`` runs."""
    fn(x[:1])
    outs, secs = [], []
    for i in tqdm(range(len(x)), desc=desc, leave=False):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn(x[i:i + 1])
            times.append(time.perf_counter() - start)
        outs.append(out)
        secs.append(statistics.median(times))
    return outs, secs


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def decode_rows(sets=SETS, beams=BEAMS, repeats=3):
    """One row per (n, method): instances/s and optimality gap, median and range over the set."""
    rows = []
    for spec in sets:
        n, count = spec["n"], spec["instances"]
        x = torch.rand(count, n, 2, generator=torch.Generator().manual_seed(SEED + n))
        reps = repeats if n <= 12 else 1
        hk, hk_s = per_instance(lambda p: held_karp(p, max_n=n), x, reps, f"Held-Karp n={n}")
        # the optimal tours' lengths by the same float32 sum as the model's (gap 0 when equal)
        optimal = torch.cat([tour_length(x[i:i + 1], o[1]) for i, o in enumerate(hk)])
        rows.append(_row(spec, "Held-Karp (exact)", hk_s, [0.0] * count))
        model = load(*spec["checkpoint"])
        for K in beams:
            tours, secs = per_instance(lambda p: solve(model, p, beam_size=K)[0], x, repeats,
                                       f"beam {K} n={n}")
            lengths = torch.stack([tour_length(x[i:i + 1], t[None])[0] for i, t in enumerate(tours)])
            gaps = (lengths.double() / optimal.double() - 1).tolist()
            rows.append(_row(spec, "greedy" if K == 1 else f"beam {K}", secs, gaps))
    return rows


def _row(spec, method, secs, gaps):
    rate = summary([1 / s for s in secs])
    gap = summary(gaps)
    return {"n": spec["n"], "checkpoint": "".join(map(str, spec["checkpoint"])), "method": method,
            "instances": len(secs), "inst_per_s_median": rate["median"], "inst_per_s_min": rate["min"],
            "inst_per_s_max": rate["max"], "gap_median": gap["median"], "gap_min": gap["min"],
            "gap_max": gap["max"], "gap_mean": statistics.fmean(gaps)}


def plot(results):
    """figures/bench_pointer.png from the results (also from the JSON): the decoding rows."""
    decode = results["decoding"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.2, 3.4))
    methods = list(dict.fromkeys(r["method"] for r in decode))
    sizes = sorted({r["n"] for r in decode})
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        rs = [next(r for r in decode if r["n"] == n and r["method"] == method) for n in sizes]
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(sizes))]
        for ax, key, scale in ((ax1, "inst_per_s", 1), (ax2, "gap", 100)):
            med = [scale * r[f"{key}_median"] for r in rs]
            err = [[m - scale * r[f"{key}_min"] for m, r in zip(med, rs)],
                   [scale * r[f"{key}_max"] - m for m, r in zip(med, rs)]]
            ax.bar(xs, med, width, yerr=err, capsize=2, color=f"C{k}", label=method)
        ax2.plot(xs, [100 * r["gap_mean"] for r in rs], "kD", ms=4,
                 label="mean" if k == 0 else None)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(sizes)), [f"n = {n}" for n in sizes])
        ax.grid(axis="y", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("instances / s (one at a time)")
    ax1.set_title("speed: median, bars = range", fontsize=9)
    ax2.set_ylabel("optimality gap per instance (%)")
    ax2.set_title("gap: median, bars = range, diamonds = mean", fontsize=9)
    mean = [h for h in ax2.get_lines() if h.get_label() == "mean"]
    ax2.legend(mean, ["mean"], fontsize=8, loc="upper left")
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=len(methods),
               fontsize=8, frameon=False)
    fig.suptitle(f"Ptr-Net decoding vs Held-Karp, CPU, {results['environment']['threads']} thread(s)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def run(B: int = 256, sizes=(10, 20, 50), H: int = 128, repeats: int = 5) -> dict:
    cuda = torch.cuda.is_available()
    results = {"B": B, "sizes": list(sizes), "H": H, "masked": True, "repeats": repeats,
               "seed": SEED, "beams": list(BEAMS)}
    if cuda:
        kernel = gpu_rows(B, sizes, H)
    else:
        print("No CUDA: the Triton kernel is not timed (under TRITON_INTERPRET it runs in numpy, "
              "which measures nothing); timing the torch reference on CPU instead.")
        kernel = cpu_rows(B, sizes, H, repeats)
    print_table(kernel)
    decode = decode_rows()
    print_table(decode)
    results.update(device="cuda" if cuda else "cpu", scores=kernel, decoding=decode)
    write_results("pointer", results, plot)
    return results
