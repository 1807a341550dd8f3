"""Source-level checks on the notebooks' markdown that no output comparison would catch.

Display math must stand in its own paragraph: JupyterLab renders ``text\\n$$...$$\\ntext`` as
intended, but the published site (MyST) pairs the dollar signs wrongly and runs the following
prose together as italic math.
"""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def display_math_inside_a_paragraph(markdown: str) -> list[int]:
    """Line numbers where a ``$$`` block opens after, or closes before, a non-blank line, or
    where a ``$$`` stands alone on its line: the book attaches the delimiters to the math
    (``$$first line`` ... ``last line$$``), the one form the project's site checks accept."""
    lines, bad, inside = markdown.split("\n"), [], False
    for i, line in enumerate(lines):
        s = line.strip()
        if s == "$$":
            bad.append(i)
        opens = not inside and s.startswith("$$")
        closes = (inside or opens) and s.endswith("$$") and (inside or len(s) > 2)
        if opens and i > 0 and lines[i - 1].strip():
            bad.append(i)
        if closes and i + 1 < len(lines) and lines[i + 1].strip():
            bad.append(i)
        inside = (inside or opens) and not closes
    return bad


def test_the_check_finds_math_run_into_prose():
    assert display_math_inside_a_paragraph("Text:\n$$a = b.$$\nMore text.") == [1, 1]
    assert display_math_inside_a_paragraph("Text:\n\n$$a\n= b$$\nmore") == [3]
    assert display_math_inside_a_paragraph("Text:\n\n$$a = b$$\n\nMore, and $x$ inline.") == []
    assert display_math_inside_a_paragraph("$$a\n= b$$") == []
    assert display_math_inside_a_paragraph("$$\na = b\n$$") == [0, 2]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_display_math_stands_in_its_own_paragraph(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    bad = [(i, line) for i, c in enumerate(cells) if c["cell_type"] == "markdown"
           for line in display_math_inside_a_paragraph("".join(c["source"]))]
    assert not bad, f"display math inside a paragraph at (cell, line) {bad}"


# ---- the chapter shape (DESIGN.md, Notebooks) ----

MAX_CELL_LINES = 30


def code_lines(source: str) -> int:
    """Non-blank lines that are not comments: what the 30-line rule counts."""
    return sum(1 for line in source.split("\n") if line.strip() and not line.strip().startswith("#"))


def test_code_lines_counts_what_the_rule_counts():
    assert code_lines("x = 1\n\n# a comment\n    # indented comment\ny = 2  # trailing\n") == 2


def cells_of(notebook, kind):
    return [(i, c) for i, c in enumerate(json.loads(notebook.read_text())["cells"]) if c["cell_type"] == kind]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_no_code_cell_is_over_30_lines(notebook):
    long = [(i, code_lines("".join(c["source"]))) for i, c in cells_of(notebook, "code")
            if code_lines("".join(c["source"])) > MAX_CELL_LINES]
    assert not long, f"code cells over {MAX_CELL_LINES} non-blank, non-comment lines (cell, lines): {long}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_the_kernel_is_shown_checked_and_timed_on_cuda(notebook):
    code = ["".join(c["source"]) for _, c in cells_of(notebook, "code")]
    assert any("@triton.jit" in src for src in code), "no cell defines the chapter's Triton kernel"
    assert any("torch.cuda.is_available()" in src and "do_bench" in src for src in code), \
        "no cell times the kernel with do_bench when CUDA is present"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_end_the_chapter_with_a_checked_worked_solution(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    start = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                  and "## Exercises" in "".join(c["source"])), None)
    assert start is not None, "no '## Exercises' section"
    text = "".join(cells[start]["source"]).split("## Exercises", 1)[1]
    items = [line for line in text.split("\n") if line[:1].isdigit() and line.split(".")[0].isdigit()]
    assert len(items) >= 4, f"{len(items)} exercises; at least 4"
    solutions = [c for c in cells[start:] if c["cell_type"] == "code"
                 and "hide-input" in c.get("metadata", {}).get("tags", [])]
    assert solutions, "no worked solution in a collapsed (hide-input) code cell after the exercises"
    assert any("assert" in "".join(c["source"]) for c in solutions), \
        "the worked solution checks nothing: it needs an assert against an independent computation"
    assert not any("nbval-ignore-output" in c.get("metadata", {}).get("tags", []) for c in solutions)


# ---- what fits the book's column (site/site_test.py measures the built pages) ----

# Code and printed output are set in the theme's 14 px monospace, 8.4 px a character: the
# narrowest code box (a collapsed cell at an 800 px window; the 1280 px column is widened by
# notebooks/_static/book.css) holds 79.
MAX_LINE_CHARS = 79


def text_outputs(cell) -> list[str]:
    """Printed text a cell's stored outputs show (streams, and text/plain where no richer form is:
    an image, HTML or a widget, whose text/plain fallback neither the site nor JupyterLab shows)."""
    out, richer = [], {"image/png", "text/html", "application/vnd.jupyter.widget-view+json"}
    for o in cell.get("outputs", []):
        data = o.get("data", {})
        if o.get("output_type") == "stream":
            out.append("".join(o["text"]))
        elif "text/plain" in data and not richer & set(data):
            out.append("".join(data["text/plain"]))
    return out


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_code_lines_fit_the_column(notebook):
    long = [(i, len(line)) for i, c in cells_of(notebook, "code")
            for line in "".join(c["source"]).split("\n") if len(line) > MAX_LINE_CHARS]
    assert not long, f"code lines over {MAX_LINE_CHARS} characters (cell, length): {long}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_printed_output_fits_the_column(notebook):
    long = [(i, len(line)) for i, c in cells_of(notebook, "code") for text in text_outputs(c)
            for line in text.split("\n") if len(line) > MAX_LINE_CHARS]
    assert not long, f"printed lines over {MAX_LINE_CHARS} characters (cell, length): {long}"
