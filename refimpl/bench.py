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


def interleaved_seconds(*fns, repeats: int = 5) -> list[float]:
    """Median seconds of each function, timed in turn (a, b, c, a, b, c, ...) after one warm-up
    call each, so that a slow spell of a shared machine hits them all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(median_seconds(fn, 1, warmup=0))
    return [statistics.median(t) for t in times]


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or "unknown",
            "cuda": torch.cuda.is_available()}


def write_results(chapter: str, results: dict, fig) -> Path:
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"bench_{chapter}.json"
    path.write_text(json.dumps({"environment": environment(), **results}, indent=2) + "\n")
    save_figure(chapter, fig)
    return path


def save_figure(chapter: str, fig) -> None:
    fig.savefig(FIGURES / f"bench_{chapter}.png", dpi=100)


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
                        help="only redraw figures/bench_CHAPTER.png from its JSON (benchmarks with a plot())")
    args = parser.parse_args(argv)
    if args.plot:
        for name in BENCHMARKS if args.chapter == "all" else [args.chapter]:
            module = importlib.import_module(f"refimpl.benchmarks.{name}")
            if hasattr(module, "plot"):
                save_figure(name, module.plot(json.loads((FIGURES / f"bench_{name}.json").read_text())))
                print(f"redrew figures/bench_{name}.png")
        return
    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        print("No CUDA device: timing the torch CPU paths (Triton kernels are timed only on a GPU).")
    for name in BENCHMARKS if args.chapter == "all" else [args.chapter]:
        print(f"== {name} ==")
        importlib.import_module(f"refimpl.benchmarks.{name}").run()


if __name__ == "__main__":
    main()
