"""Packing benchmark: prefill time and peak memory of a padded batch, prepacking and padding-free.

For the Prepacking paper's claim (Zhao et al. 2024): its repository reports
5.2x faster prefill and 7.6x less peak GPU memory than padding for a 1.3B
model on MMLU prompts at batch 64 on an A6000. Here: the workbench target on
CPU, prompts cut from the corpus with lengths drawn from three distributions.
Each setting (distribution, batch size) is measured on ``BATCHES`` batches drawn
independently; a row reports the median over its batches with the quartiles and
the range of the gains, and keeps every batch's numbers. Peak memory is the
process's resident-set high-water mark during the call
(``/proc/self/clear_refs`` resets it; glibc is told to return big buffers).
"""
import ctypes
import functools
import math
import random
import statistics

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from refimpl.bench import box_and_dots, paired_seconds, print_table, summary, write_results
from refimpl.data import CharTokenizer, load_corpus
from refimpl.lm import load
from refimpl.packing import pack_prompts, padding_free_prefill

BATCHES = 10  # batches drawn per setting: 160 prompts at batch 16, 640 at batch 64
PREPACKING_REPO = {"speedup": 5.2, "memory_saving": 7.6, "gpu": "A6000", "model": "1.3B",
                   "dataset": "MMLU", "batch_size": 64}
# "per-sequence" is padding-free with one SDPA call per sequence (group_size=1), the
# chapter's first version: the same work as "padding-free", more Python and smaller calls.


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


def per_sequence_prefill(model, prompts):
    """Padding-free prefill whose attention makes one SDPA call per sequence."""
    return padding_free_prefill(model, prompts, group_size=1)


PREFILLS = {"padded": padded_prefill, "prepacked": prepacked_prefill,
            "padding-free": padding_free_prefill, "per-sequence": per_sequence_prefill}
METHODS = tuple(PREFILLS)


def time_batch(model, prompts, repeats: int) -> dict:
    """Times of every method on one batch: medians over rounds, and the medians of the per-round
    ratios. Run under ``mallopt_for_timing()``, not the memory measurement's setting."""
    ref = padded_prefill(model, prompts)
    lengths = [len(p) for p in prompts]
    real = sum(lengths)
    slots = {"padded": len(prompts) * max(lengths), "prepacked": pack_prompts(prompts).input_ids.numel(),
             "padding-free": real, "per-sequence": real}
    row = {"mean_len": real / len(prompts), "max_len": max(lengths)}
    fns = {m: functools.partial(fn, model, prompts) for m, fn in PREFILLS.items()}
    for m, fn in fns.items():
        err = (fn() - ref).abs().max().item()
        assert err < 1e-3, f"{m} disagrees with the padded batch by {err}"
    times = paired_seconds(fns, repeats)
    for m in METHODS:
        row[f"{m}_ms"] = 1e3 * statistics.median(times[m])
        row[f"{m}_eff"] = real / slots[m]
    for m in METHODS[1:]:
        row[f"{m}_speedup"] = statistics.median(a / b for a, b in zip(times["padded"], times[m]))
    row["padding-free_vs_prepacked"] = statistics.median(
        a / b for a, b in zip(times["prepacked"], times["padding-free"]))
    return row


SPREAD = ("_speedup", "_mem_saving", "_vs_prepacked")  # the keys whose spread a row reports


def setting_row(distribution: str, batch: int, per_batch: list[dict]) -> dict:
    """One setting's row: the median over its batches of every per-batch number, the quartiles
    (``_iqr``) and range (``_range``) of the gains, and the per-batch numbers themselves."""
    row = {"distribution": distribution, "batch": batch, "batches": len(per_batch)}
    for key in per_batch[0]:
        s = summary([b[key] for b in per_batch])
        row[key] = s["median"]
        if key.endswith(SPREAD):
            row[f"{key}_iqr"], row[f"{key}_range"] = s["iqr"], s["range"]
    return {**row, "per_batch": per_batch}


def memory_batch(model, prompts, row: dict) -> dict:
    """Adds each method's resident-memory high-water mark (MB) and saving over padded to ``row``.
    Needs ``mallopt_for_memory()`` first, so that freed buffers go back to the OS."""
    for m, fn in PREFILLS.items():
        # resident memory grows by pages: count at least one (a tiny model may add none)
        peak = max(4096, *(peak_bytes(lambda: fn(model, prompts)) for _ in range(2)))
        row[f"{m}_MB"] = peak / 2**20
    for m in METHODS[1:]:
        row[f"{m}_mem_saving"] = row["padded_MB"] / row[f"{m}_MB"]
    return row  # the keys *_MB and *_mem_saving


def mallopt_for_memory():
    """M_MMAP_THRESHOLD = 64 KiB: every bigger buffer is a fresh mmap, returned to the OS when freed,
    so that the resident high-water mark sees each call's own peak. It makes allocation slow
    (page faults on every buffer), and more so for a method with many mid-sized buffers."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)


def mallopt_for_timing():
    """Buffers up to 32 MiB from the heap again, and no trimming below 64 MiB: what glibc's
    dynamic threshold settles at after a few large frees, so allocation stays cheap."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


def plot(results):
    """figures/bench_packing.png from the results (also from the JSON): on top, every batch's
    speed-up and memory saving of prepacking over padding, per setting; below, time, memory and
    efficiency of each method at the largest batch size (medians over its batches)."""
    fig = plt.figure(figsize=(7, 7.2), layout="constrained")
    upper, lower = fig.subfigures(2, 1, height_ratios=(1, 1.1))
    rows = results["rows"]
    names = [f"{r['distribution']}, {r['batch']}" for r in rows]
    for ax, key, label in zip(upper.subplots(1, 2), ("prepacked_speedup", "prepacked_mem_saving"),
                              ("prefill speed-up", "peak-memory saving")):
        box_and_dots(ax, [[b[key] for b in r["per_batch"]] for r in rows],
                     [f"C{i // 2}" for i in range(len(rows))], width=0.6, jitter=0.2)
        ax.set_xticks(range(1, len(rows) + 1), names, fontsize=8, rotation=30, ha="right",
                      rotation_mode="anchor")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_ylabel(f"prepacking's {label}\nover padding (x)", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    upper.suptitle(f"One dot per batch ({results['batches']} per setting: distribution, batch "
                   "size); box: quartiles", fontsize=10)
    batch = max(r["batch"] for r in rows)
    last = [r for r in rows if r["batch"] == batch]
    axes = lower.subplots(1, 3)
    width = 0.2
    for k, (key, label) in enumerate([("ms", "prefill time (ms)"), ("MB", "peak memory (MB)"),
                                      ("eff", "real tokens / computed slots")]):
        ax = axes[k]
        for j, m in enumerate(METHODS):
            ax.bar([i + (j - 1.5) * width for i in range(len(last))], [r[f"{m}_{key}"] for r in last],
                   width, label=m, color=f"C{j}")
        ax.set_xticks(range(len(last)), [r["distribution"] for r in last], fontsize=9,
                      rotation=25, ha="right", rotation_mode="anchor")
        ax.tick_params(axis="y", labelsize=9)
        ax.set_ylabel(label, fontsize=9)
    lower.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=len(METHODS),
                 fontsize=9, frameon=False, handlelength=1.2, columnspacing=1.0)
    lower.suptitle(f"Prefill of {batch} prompts, workbench target, CPU, "
                   f"{results['environment']['threads']} thread(s); medians over the batches",
                   fontsize=10)
    return fig


def draw_batches(distribution: str, batch: int, count: int, rng: random.Random, ids, corpus: str,
                 max_len: int) -> list[list[torch.Tensor]]:
    """``count`` batches of ``batch`` prompts cut from the corpus at random places, with lengths
    drawn from ``distribution`` (``sample_lengths``)."""
    out = []
    for _ in range(count):
        lengths = sample_lengths(distribution, batch, max_len, rng, corpus)
        starts = [rng.randrange(len(ids) - n) for n in lengths]
        out.append([ids[s:s + n] for s, n in zip(starts, lengths)])
    return out


def run(batch_sizes=(16, 64), distributions=("uniform", "lognormal", "corpus"), repeats: int = 1,
        batches: int = BATCHES, seed: int = 0) -> dict:
    model = load("target")
    tok, corpus = CharTokenizer.from_corpus(), load_corpus()
    ids = torch.tensor(tok.encode(corpus))
    rng = random.Random(seed)
    settings = [(d, b, draw_batches(d, b, batches, rng, ids, corpus, model.config.block_size))
                for d in distributions for b in batch_sizes]
    mallopt_for_memory()  # first, while the heap is empty
    memory = [[memory_batch(model, prompts, {}) for prompts in drawn]
              for _, _, drawn in tqdm(settings, desc="packing: memory")]
    mallopt_for_timing()  # the memory setting would slow every allocation
    rows = []
    for (dist, B, drawn), mem in zip(tqdm(settings, desc="packing: time"), memory):
        per_batch = [{**time_batch(model, prompts, repeats), **m} for prompts, m in zip(drawn, mem)]
        rows.append(setting_row(dist, B, per_batch))
    print_table([{k: v for k, v in r.items() if k.endswith(("_ms", "speedup", "_vs_prepacked"))
                  or k in ("distribution", "batch")} for r in rows])
    print_table([{k: v for k, v in r.items() if k in ("distribution", "batch") or k.endswith(("_eff", "_MB"))}
                 for r in rows])
    print(f"prepacking repository: {PREPACKING_REPO['speedup']}x time, {PREPACKING_REPO['memory_saving']}x "
          f"memory ({PREPACKING_REPO['model']} model, {PREPACKING_REPO['dataset']}, batch "
          f"{PREPACKING_REPO['batch_size']}, {PREPACKING_REPO['gpu']})")
    results = {"rows": rows, "prepacking_repository": PREPACKING_REPO, "seed": seed, "repeats": repeats,
               "batches": batches,
               "timing": f"{batches} batches per setting; per batch, {repeats} round(s) of every method "
                         "once, back to back, after a warm-up call each, with glibc's default allocator; "
                         "memory measured first, with M_MMAP_THRESHOLD 64 KiB; rows: medians over the "
                         "batches"}
    write_results("packing", results, plot)
    return results
