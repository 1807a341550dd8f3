"""Pointer Network benchmark: the pointer distribution (Vinyals et al. 2015, eq. 3) and decoding.

With CUDA: ``triton.testing.do_bench`` of the torch reference ``pointer_log_probs`` against the
fused Triton kernel, for a batch of B rows of n positions and H = 128, masked, in the decoding
layout (keys [B, n, H], query [B, H]) and the teacher-forcing one (keys [B, 1, n, H], query
[B, T = n, H]). Without CUDA the kernel is not timed (the Triton interpreter runs it in numpy:
no speed measurement) and the torch CPU paths are timed instead: the reference in the decoding
layout, and the throughput of ``refimpl.pointer.solve`` on an untrained TSP model, greedy
(beam 1) against beam 3 (decoding cost does not depend on the weights being trained).
"""
import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from refimpl.bench import median_seconds, print_table, write_results
from refimpl.pointer import PointerConfig, PointerNet, pointer_log_probs, solve


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


def decode_rows(instances, n, beams, repeats):
    torch.manual_seed(0)
    model = PointerNet(PointerConfig("tsp", 128)).eval()
    x = torch.rand(instances, n, 2, generator=torch.Generator().manual_seed(0))
    rows = []
    for K in tqdm(beams, desc="solve"):
        t = median_seconds(lambda: solve(model, x, beam_size=K), repeats)
        rows.append({"beam_size": K, "instances": instances, "n": n, "seconds": t,
                     "instances_per_s": instances / t})
    return rows


def run(B: int = 256, sizes=(10, 20, 50), H: int = 128, instances: int = 64, decode_n: int = 10,
        beams=(1, 3), repeats: int = 5) -> dict:
    cuda = torch.cuda.is_available()
    results = {"B": B, "sizes": list(sizes), "H": H, "masked": True, "repeats": repeats}
    if cuda:
        kernel = gpu_rows(B, sizes, H)
        print_table(kernel)
    else:
        print("No CUDA: the Triton kernel is not timed (under TRITON_INTERPRET it runs in numpy, "
              "which measures nothing); timing the torch reference on CPU instead.")
        kernel = cpu_rows(B, sizes, H, repeats)
        print_table(kernel)
    decode = decode_rows(instances, decode_n, beams, max(1, repeats // 2))
    print_table(decode)
    results.update(device="cuda" if cuda else "cpu", scores=kernel, decoding=decode)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = torch.arange(len(kernel)).float()
    labels = [f"n={r['n']}" + ("" if r["layout"] == "decoding" else "\nteacher forcing") for r in kernel]
    if cuda:
        ax1.bar(x - 0.2, [r["torch_us"] for r in kernel], 0.4, label="torch reference")
        ax1.bar(x + 0.2, [r["triton_us"] for r in kernel], 0.4, label="Triton kernel")
        ax1.legend(fontsize=8)
        ax1.set_title(f"Pointer log-probs, B={B}, H={H}, masked\n({torch.cuda.get_device_name()})", fontsize=9)
    else:
        ax1.bar(x, [r["torch_us"] for r in kernel], 0.5, color="C0")
        ax1.set_title(f"Pointer log-probs, torch reference on CPU\nB={B}, H={H}, masked, "
                      f"{torch.get_num_threads()} thread(s)", fontsize=9)
    ax1.set_xticks(x.tolist(), labels, fontsize=8)
    ax1.set_ylabel("microseconds per call")
    ax2.bar([f"beam {r['beam_size']}" for r in decode], [r["instances_per_s"] for r in decode], 0.5, color="C1")
    ax2.set_ylabel("instances / s")
    ax2.set_title(f"solve(), untrained TSP Ptr-Net (H=128), CPU\n{instances} instances of n={decode_n}",
                  fontsize=9)
    fig.tight_layout()
    write_results("pointer", results, fig)
    plt.close(fig)
    return results
