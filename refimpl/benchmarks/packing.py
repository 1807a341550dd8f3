"""Packing benchmark: prefill time and peak memory of a padded batch, prepacking and padding-free.

For the Prepacking paper's claim (Zhao et al. 2024): its repository reports
5.2x faster prefill and 7.6x less peak GPU memory than padding for a 1.3B
model on MMLU prompts at batch 64 on an A6000. Here: the workbench target on
CPU, prompts cut from the corpus with lengths drawn from three distributions.
Peak memory is the process's resident-set high-water mark during the call
(``/proc/self/clear_refs`` resets it; glibc is told to return big buffers).
"""
import ctypes
import math
import random

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from refimpl.bench import median_seconds, print_table, write_results
from refimpl.data import CharTokenizer, load_corpus
from refimpl.lm import load
from refimpl.packing import pack_prompts, padding_free_prefill

PREPACKING_REPO = {"speedup": 5.2, "memory_saving": 7.6, "gpu": "A6000", "model": "1.3B",
                   "dataset": "MMLU", "batch_size": 64}
METHODS = ("padded", "prepacked", "padding-free")


def sample_lengths(distribution: str, n: int, max_len: int, rng: random.Random, corpus: str) -> list[int]:
    """Prompt lengths in [1, max_len]: uniform, log-normal (long tail) or the corpus' line lengths."""
    if distribution == "uniform":
        return [rng.randint(1, max_len) for _ in range(n)]
    if distribution == "lognormal":
        return [min(max_len, max(1, round(rng.lognormvariate(math.log(24), 0.9)))) for _ in range(n)]
    if distribution == "corpus":
        lines = [len(line) + 1 for line in corpus.splitlines() if line.strip()]
        return [min(max_len, rng.choice(lines)) for _ in range(n)]
    raise ValueError(f"distribution must be uniform, lognormal or corpus, got {distribution!r}")


@torch.no_grad()
def padded_prefill(model, prompts):
    """The usual batch: right-pad to the longest prompt; the causal mask keeps pads out of real tokens."""
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    logits = model(ids)
    return logits[torch.arange(len(prompts)), lengths - 1]


@torch.no_grad()
def prepacked_prefill(model, prompts):
    """Pack (FFD, capacity = longest prompt), one forward with the block-diagonal mask."""
    packed = pack_prompts(prompts)
    logits = model(packed.input_ids, position_ids=packed.position_ids, attn_mask=packed.attn_mask)
    return torch.stack([logits[p.row, p.start + p.length - 1] for p in packed.placements])


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_bytes(fn) -> int:
    """Resident-memory high-water mark of ``fn()`` above the resident memory before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def run(batch_sizes=(16, 64), distributions=("uniform", "lognormal", "corpus"), repeats: int = 3,
        seed: int = 0) -> dict:
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: free big buffers back to the OS
    model = load("target")
    tok, corpus = CharTokenizer.from_corpus(), load_corpus()
    ids = torch.tensor(tok.encode(corpus))
    rng = random.Random(seed)
    fns = {"padded": padded_prefill, "prepacked": prepacked_prefill, "padding-free": padding_free_prefill}
    rows = []
    for dist, B in tqdm([(d, b) for d in distributions for b in batch_sizes], desc="packing"):
        lengths = sample_lengths(dist, B, model.config.block_size, rng, corpus)
        starts = [rng.randrange(len(ids) - n) for n in lengths]
        prompts = [ids[s:s + n] for s, n in zip(starts, lengths)]
        ref = padded_prefill(model, prompts)
        real, Lmax = sum(lengths), max(lengths)
        slots = {"padded": B * Lmax, "prepacked": pack_prompts(prompts).input_ids.numel(), "padding-free": real}
        row = {"distribution": dist, "batch": B, "mean_len": real / B, "max_len": Lmax}
        for m in METHODS:
            fn = fns[m]
            err = (fn(model, prompts) - ref).abs().max().item()
            assert err < 1e-3, f"{m} disagrees with the padded batch by {err}"
            row[f"{m}_ms"] = 1e3 * median_seconds(lambda: fn(model, prompts), repeats)
            row[f"{m}_MB"] = max(peak_bytes(lambda: fn(model, prompts)) for _ in range(2)) / 2**20
            row[f"{m}_eff"] = real / slots[m]
        for m in METHODS[1:]:
            row[f"{m}_speedup"] = row["padded_ms"] / row[f"{m}_ms"]
            row[f"{m}_mem_saving"] = row["padded_MB"] / row[f"{m}_MB"]
        rows.append(row)
    print_table([{k: v for k, v in r.items() if not k.endswith(("_eff", "_MB"))} for r in rows])
    print_table([{k: v for k, v in r.items() if k in ("distribution", "batch") or k.endswith(("_eff", "_MB"))}
                 for r in rows])
    print(f"prepacking repository: {PREPACKING_REPO['speedup']}x time, {PREPACKING_REPO['memory_saving']}x "
          f"memory ({PREPACKING_REPO['model']} model, {PREPACKING_REPO['dataset']}, batch "
          f"{PREPACKING_REPO['batch_size']}, {PREPACKING_REPO['gpu']})")

    B = max(batch_sizes)
    last = [r for r in rows if r["batch"] == B]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    width = 0.27
    for k, (key, label) in enumerate([("ms", "prefill time (ms)"), ("MB", "peak memory (MB)"),
                                      ("eff", "real tokens / computed slots")]):
        ax = axes[k]
        for j, m in enumerate(METHODS):
            ax.bar([i + (j - 1) * width for i in range(len(last))], [r[f"{m}_{key}"] for r in last],
                   width, label=m, color=f"C{j}")
        ax.set_xticks(range(len(last)), [r["distribution"] for r in last])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Prefill of {B} prompts, workbench target, CPU, {torch.get_num_threads()} thread(s)")
    fig.tight_layout()
    results = {"rows": rows, "prepacking_repository": PREPACKING_REPO, "seed": seed, "repeats": repeats}
    write_results("packing", results, fig)
    plt.close(fig)
    return results
