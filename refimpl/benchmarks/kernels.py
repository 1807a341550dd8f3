"""Kernel benchmark, GPU only: each Triton kernel against the torch path it replaces.

``python -m refimpl.benchmarks.kernels`` (the last step of ``make gpu-check``) times with
``triton.testing.do_bench`` (the median of CUDA-event timings, after a warm-up call that also
compiles the kernel):

- flash attention against ``F.scaled_dot_product_attention`` (causal; fp16, bf16, fp32),
- varlen attention against ``refimpl.packing.varlen_attention`` (one SDPA call per group of similar lengths),
- the diverse-beam-search step against ``refimpl.search.group_candidates``,
- speculative verification against ``refimpl.kernels.speculative.verify_reference``,
- the pointer log-probs against ``refimpl.pointer.pointer_log_probs``,
- the ring-attention block against ``refimpl.ring.block_attention``,

prints a table and writes ``figures/bench_kernels_gpu.json`` and ``.png``. Each row also keeps
the largest difference from the torch result (for verification: how many tokens differ).
Without CUDA it says that it needs a GPU and exits 1; ``python -m refimpl.bench all`` prints
the same line and goes on to the other benchmarks.
"""
from __future__ import annotations

import sys

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import triton
from tqdm.auto import tqdm

from refimpl.bench import print_table, write_results

NEEDS_GPU = ("The kernel benchmark needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is "
             "False here): the Triton interpreter on CPU measures nothing.")


def timed(kernel, shape, torch_fn, triton_fn, error):
    """One row: the median milliseconds of both paths and the largest difference."""
    t_torch = triton.testing.do_bench(torch_fn, return_mode="median")
    t_triton = triton.testing.do_bench(triton_fn, return_mode="median")
    return {"kernel": kernel, "shape": shape, "torch_ms": t_torch, "triton_ms": t_triton,
            "speedup": t_torch / t_triton, "max_abs_err": float(error)}


def max_diff(a, b):
    return (a.float() - b.float()).nan_to_num(0.0, 0.0, 0.0).abs().max()


def attention_rows(dev):
    from refimpl.kernels.attention import flash_attention
    B, H = 4, 16
    for dtype, T, D in [(torch.float16, 1024, 64), (torch.float16, 4096, 64), (torch.float16, 4096, 128),
                        (torch.bfloat16, 4096, 128), (torch.float32, 4096, 64)]:
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype) for _ in range(3))

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def ours():
            return flash_attention(q, k, v, causal=True)[0]
        yield timed("attention", f"B={B} H={H} T=S={T} D={D} {str(dtype)[6:]} causal", sdpa, ours,
                    max_diff(ours(), sdpa()))


def varlen_rows(dev):
    from refimpl.kernels.packing import varlen_flash_attention
    from refimpl.packing import varlen_attention
    H, D = 16, 64
    lengths = torch.randint(16, 1025, (32,), generator=torch.Generator().manual_seed(0))
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()]).to(dev)
    q, k, v = (torch.randn(int(lengths.sum()), H, D, device=dev, dtype=torch.float16) for _ in range(3))

    def torch_path():
        return varlen_attention(q, k, v, cu)

    def ours():
        return varlen_flash_attention(q, k, v, cu)
    yield timed("varlen", f"32 sequences of 16..1024, N={len(q)} H={H} D={D} fp16 causal",
                torch_path, ours, max_diff(ours(), torch_path()))


def search_rows(dev):
    from refimpl.kernels.search import group_candidates as triton_candidates
    from refimpl.search import group_candidates
    for N, Bg, V in [(8, 4, 50257), (8, 16, 50257), (8, 4, 128256)]:
        logits = 3 * torch.randn(N, Bg, V, device=dev)
        running = -5 * torch.rand(N, Bg, device=dev)
        counts = torch.randint(0, 3, (N, V), device=dev).float()

        def torch_path():
            return group_candidates(logits, running, counts, 0.5, 2 * Bg)

        def ours():
            return triton_candidates(logits, running, counts, 0.5, 2 * Bg)
        yield timed("search", f"N={N} Bg={Bg} V={V} k={2 * Bg} fp32", torch_path, ours,
                    max_diff(ours()[0], torch_path()[0]))


def speculative_rows(dev):
    from refimpl.kernels.speculative import verify, verify_reference
    B, g, V = 64, 4, 50257
    p = (3 * torch.randn(B, g + 1, V, device=dev)).softmax(-1)
    q = (3 * torch.randn(B, g, V, device=dev)).softmax(-1)
    draft = torch.multinomial(q.view(-1, V), 1).view(B, g)
    u, v = torch.rand(B, g, device=dev), torch.rand(B, device=dev)
    for block_v in (128, 1024):
        def torch_path():
            return verify_reference(draft, q, p, u, v)

        def ours():
            return verify(draft, q, p, u, v, block_v=block_v)
        differ = sum(int((a != b).sum()) for a, b in zip(ours(), torch_path()))
        yield timed("speculative", f"B={B} g={g} V={V} fp32 block_v={block_v}", torch_path, ours, differ)


def pointer_rows(dev):
    from refimpl.benchmarks.pointer import inputs
    from refimpl.kernels.pointer import pointer_log_probs_triton
    from refimpl.pointer import pointer_log_probs
    B, H = 256, 128
    for n in (50, 200, 1000):
        args = inputs(B, n, H, "decoding", dev)

        def torch_path():
            return pointer_log_probs(*args)

        def ours():
            return pointer_log_probs_triton(*args)
        yield timed("pointer", f"B={B} n={n} H={H} masked", torch_path, ours, max_diff(ours(), torch_path()))


def ring_rows(dev):
    from refimpl.kernels.ring import ring_block_attention
    from refimpl.ring import block_attention
    B, H, T, D = 1, 16, 2048, 64
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.float16) for _ in range(3))
    for offset in (None, 0):
        def torch_path():
            return block_attention(q, k, v, sm_scale=D ** -0.5, causal_offset=offset)[0]

        def ours():
            return ring_block_attention(q, k, v, sm_scale=D ** -0.5, causal_offset=offset)[0]
        mask = "no mask" if offset is None else "causal"
        yield timed("ring block", f"B={B} H={H} T=S={T} D={D} fp16 {mask}", torch_path, ours,
                    max_diff(ours(), torch_path()))


CASES = [attention_rows, varlen_rows, search_rows, speculative_rows, pointer_rows, ring_rows]


def figure(rows, device_name):
    """Horizontal bars: the speedup of each kernel over its torch path, log scale."""
    colour = {k: f"C{i}" for i, k in enumerate(dict.fromkeys(r["kernel"] for r in rows))}
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    speedups = [r["speedup"] for r in rows]
    # bars from 1: right of the line the kernel is faster, left of it slower
    ax.barh(y, [s - 1 for s in speedups], left=1, color=[colour[r["kernel"]] for r in rows])
    for yi, s in zip(y, speedups):
        ax.text(s, yi, f" {s:.2g}x ", va="center", ha="left" if s >= 1 else "right", fontsize=7)
    ax.set_yticks(y, [f"{r['kernel']}: {r['shape']}" for r in rows], fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(min(0.5, min(speedups) / 2), max(2.0, max(speedups) * 2))
    ax.set_xlabel("speedup of the Triton kernel over the torch path (torch ms / Triton ms)")
    ax.set_title(f"Triton kernels against their torch paths, do_bench medians ({device_name})", fontsize=9)
    fig.tight_layout()
    return fig


def run() -> dict:
    if not torch.cuda.is_available():
        print(NEEDS_GPU, "Skipped; `make gpu-check` runs it on a machine with one.")
        return {}
    torch.manual_seed(0)
    rows = [r for case in tqdm(CASES, desc="kernels") for r in case("cuda")]
    print_table(rows)
    results = {"device": torch.cuda.get_device_name(), "rows": rows}
    write_results("kernels_gpu", results, lambda r: figure(r["rows"], r["device"]))
    return results


def main() -> int:
    if not torch.cuda.is_available():
        print(NEEDS_GPU, file=sys.stderr)
        return 1
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
