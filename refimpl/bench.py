"""Benchmarks: ``python -m refimpl.bench CHAPTER`` prints a table and writes
``figures/bench_CHAPTER.json`` and ``figures/bench_CHAPTER.png``.

Timings are wall-clock medians over repeats, measured side by side in one run
with a fixed thread count; tests never assert them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

FIGURES = Path(__file__).resolve().parent.parent / "figures"


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or "unknown",
            "cuda": torch.cuda.is_available()}


def write_results(chapter: str, results: dict, fig) -> Path:
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"bench_{chapter}.json"
    path.write_text(json.dumps({"environment": environment(), **results}, indent=2) + "\n")
    fig.savefig(FIGURES / f"bench_{chapter}.png", dpi=100)
    return path


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(width[c]) for c in cols))


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def bench_workbench(prompt_len: int = 16, new_tokens: int = 128, repeats: int = 5) -> dict:
    """Greedy generation tokens/s, with and without the KV cache, for draft and target."""
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from refimpl.lm import generate, load

    prompt = torch.zeros(1, prompt_len, dtype=torch.long)
    rows = []
    for name in tqdm(["draft", "target"], desc="workbench"):
        model = load(name)
        for use_cache in (True, False):
            sec = median_seconds(lambda: generate(model, prompt, new_tokens, temperature=0,
                                                  use_cache=use_cache), repeats)
            rows.append({"model": name, "kv_cache": use_cache, "params": model.num_parameters(),
                         "tokens_per_s": new_tokens / sec, "ms_per_token": 1e3 * sec / new_tokens})
    print_table(rows)
    cost = {r["model"]: r["ms_per_token"] for r in rows if r["kv_cache"]}
    ratio = cost["target"] / cost["draft"]
    print(f"draft is {ratio:.1f}x cheaper per generated token than target (KV cache, batch 1)")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['model']}\n{'KV cache' if r['kv_cache'] else 'no cache'}" for r in rows]
    ax.bar(labels, [r["tokens_per_s"] for r in rows], color=["C0", "C1", "C0", "C1"])
    ax.set_ylabel("tokens / s (greedy, batch 1)")
    ax.set_title(f"Workbench generation, {new_tokens} tokens, {torch.get_num_threads()} thread(s)")
    fig.tight_layout()
    results = {"prompt_len": prompt_len, "new_tokens": new_tokens, "rows": rows,
               "draft_cost_ratio": ratio}
    write_results("workbench", results, fig)
    plt.close(fig)
    return results


BENCHMARKS = {"workbench": bench_workbench}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapter", choices=sorted(BENCHMARKS) + ["all"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: one decoding stream per core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        print("No CUDA device: timing the torch CPU paths (Triton kernels are timed only on a GPU).")
    for name in sorted(BENCHMARKS) if args.chapter == "all" else [args.chapter]:
        print(f"== {name} ==")
        BENCHMARKS[name]()


if __name__ == "__main__":
    main()
