"""The figures the book shows fit its column at their natural size (site/site_test.py checks the
built pages; this catches a too-wide figure without a browser), and the benchmark figures redraw
from their committed JSON (`python -m refimpl.bench CHAPTER --plot`)."""
import importlib
import json

import matplotlib
import pytest
from PIL import Image

from refimpl.bench import BENCHMARKS, FIGURES

matplotlib.use("Agg")
COLUMN_PX = 728  # the code and figure column at a 1280 px window (notebooks/_static/book.css)


@pytest.mark.parametrize("png", sorted(FIGURES.glob("*.png")), ids=lambda p: p.name)
def test_figure_fits_the_column(png):
    width = Image.open(png).size[0]
    assert width <= COLUMN_PX, f"{png.name} is {width} px wide; the column shows {COLUMN_PX}"


PLOTTED = [name for name in BENCHMARKS
           if hasattr(importlib.import_module(f"refimpl.benchmarks.{name}"), "plot")
           and (FIGURES / f"bench_{name}.json").is_file()]


@pytest.mark.parametrize("name", PLOTTED)
def test_benchmark_figure_redraws_from_its_json(name):
    import matplotlib.pyplot as plt
    results = json.loads((FIGURES / f"bench_{name}.json").read_text())
    fig = importlib.import_module(f"refimpl.benchmarks.{name}").plot(results)
    try:
        assert fig.get_figwidth() * 100 <= COLUMN_PX
        assert fig.axes, "no axes drawn"
    finally:
        plt.close(fig)


def test_the_benchmarks_with_a_plot_are_found():
    assert {"ring", "search", "speculative"} <= set(PLOTTED)
