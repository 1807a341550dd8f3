"""Benchmarks: ``python -m refimpl.bench CHAPTER`` prints a table and writes
``figures/bench_CHAPTER.json`` and ``figures/bench_CHAPTER.png``.

Timings are wall-clock medians over repeats, measured side by side in one run
with a fixed thread count; tests never assert them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import statistics
import time
from pathlib import Path

import matplotlib.pyplot as plt
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


def paired_seconds(fns: dict, repeats: int) -> dict:
    """Per function, its seconds in each of ``repeats`` rounds; a round calls every function once,
    back to back (after one warm-up call each), so that the ratio of two functions in one round
    compares adjacent calls and a slow spell of a shared machine hits both alike."""
    for fn in fns.values():
        fn()
    times = {m: [] for m in fns}
    for _ in range(repeats):
        for m, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - start)
    return times


def interleaved_seconds(*fns, repeats: int = 5) -> list[float]:
    """Median seconds of each function over ``paired_seconds``' rounds (a, b, c, a, b, c, ...)."""
    times = paired_seconds(dict(enumerate(fns)), repeats)
    return [statistics.median(times[i]) for i in range(len(fns))]


def passage_starts(n_tokens: int, count: int, phase: float, length: int) -> list[int]:
    """``count`` starts of ``length``-token passages spread evenly over a split of ``n_tokens``
    (the benchmarks' prompt sets); a tuning set at phase 0.5 with a quarter as many passages
    and a reported set at phase 0.25 keep a quarter of the reported spacing apart."""
    span = n_tokens - length
    return [int((i + phase) * span / count) for i in range(count)]


def summary(values) -> dict:
    """Median, interquartile range and range of per-prompt values."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "iqr": [q1, q3], "range": [min(values), max(values)]}


def box_and_dots(ax, data, colors, width, jitter, vertical=True):
    """Per-prompt values drawn as boxes of their quartiles (no fliers) and one dot per prompt,
    spread ``jitter`` either side of the box's centre; ``colors`` one per box."""
    box = ax.boxplot(data, vert=vertical, widths=width, showfliers=False, patch_artist=True,
                     medianprops={"color": "k"})
    for i, (patch, values, color) in enumerate(zip(box["boxes"], data, colors), start=1):
        patch.set(facecolor=color, alpha=0.35)
        offsets = [i + j for j in torch.linspace(-jitter, jitter, len(values)).tolist()]
        ax.plot(*((offsets, values) if vertical else (values, offsets)), ".", ms=3, color=color)


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or "unknown",
            "cuda": torch.cuda.is_available()}


def write_results(chapter: str, results: dict, plot) -> Path:
    """figures/bench_CHAPTER.json: the results with the environment they were measured in; and
    figures/bench_CHAPTER.png, drawn by ``plot`` from that same dict (as ``redraw`` does later)."""
    FIGURES.mkdir(exist_ok=True)
    results = {"environment": environment(), **results}
    path = FIGURES / f"bench_{chapter}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    save_figure(chapter, plot(results))
    return path


def save_figure(chapter: str, fig) -> None:
    fig.savefig(FIGURES / f"bench_{chapter}.png", dpi=100)
    plt.close(fig)


def redraw(chapter: str):
    """The figure of benchmark ``chapter`` drawn again by its ``plot`` from the committed JSON;
    None if that benchmark has not written one."""
    path = FIGURES / f"bench_{chapter}.json"
    if not path.is_file():
        return None
    return importlib.import_module(f"refimpl.benchmarks.{chapter}").plot(json.loads(path.read_text()))


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(width[c]) for c in cols))


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


# one module per chapter under refimpl/benchmarks/, each with a ``run()`` returning its results
BENCHMARKS = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent / "benchmarks")]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapter", choices=BENCHMARKS + ["all"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: one decoding stream per core)")
    parser.add_argument("--plot", action="store_true",
                        help="only redraw figures/bench_CHAPTER.png from its committed JSON")
    args = parser.parse_args(argv)
    names = BENCHMARKS if args.chapter == "all" else [args.chapter]
    if args.plot:
        for name in names:
            fig = redraw(name)
            if fig is None:
                print(f"no figures/bench_{name}.json: run python -m refimpl.bench {name} first")
            else:
                save_figure(name, fig)
                print(f"redrew figures/bench_{name}.png")
        return
    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        print("No CUDA device: timing the torch CPU paths (Triton kernels are timed only on a GPU).")
    for name in names:
        print(f"== {name} ==")
        importlib.import_module(f"refimpl.benchmarks.{name}").run()


if __name__ == "__main__":
    main()
