"""The figures the book shows fit its column at their natural size (site/site_test.py checks the
built pages; this catches a too-wide figure without a browser), and the benchmark figures redraw
from their committed JSON (`python -m refimpl.bench CHAPTER --plot`)."""
import matplotlib
import pytest
from PIL import Image

from refimpl.bench import BENCHMARKS, FIGURES, redraw

matplotlib.use("Agg")
COLUMN_PX = 728  # the code and figure column at a 1280 px window (notebooks/_static/book.css)


@pytest.mark.parametrize("png", sorted(FIGURES.glob("*.png")), ids=lambda p: p.name)
def test_figure_fits_the_column(png):
    width = Image.open(png).size[0]
    assert width <= COLUMN_PX, f"{png.name} is {width} px wide; the column shows {COLUMN_PX}"


PLOTTED = [name for name in BENCHMARKS if (FIGURES / f"bench_{name}.json").is_file()]


@pytest.mark.parametrize("name", PLOTTED)
def test_benchmark_figure_redraws_from_its_json(name):
    import matplotlib.pyplot as plt
    fig = redraw(name)
    try:
        assert fig.get_figwidth() * 100 <= COLUMN_PX
        assert fig.axes, "no axes drawn"
    finally:
        plt.close(fig)


def test_every_committed_benchmark_is_redrawn():
    assert set(PLOTTED) == {"packing", "pointer", "ring", "search", "speculative", "workbench"}


def test_write_results_draws_the_figure_from_what_it_writes(tmp_path, monkeypatch):
    import json

    import matplotlib.pyplot as plt

    from refimpl import bench
    monkeypatch.setattr(bench, "FIGURES", tmp_path)
    seen = []

    def plot(results):
        seen.append(results)
        return plt.figure(figsize=(2, 1))
    path = bench.write_results("demo", {"rows": [1, 2]}, plot)
    written = json.loads(path.read_text())
    assert seen == [written] and written["environment"]["threads"] >= 1
    assert (tmp_path / "bench_demo.png").is_file()
    assert bench.redraw("absent") is None
