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
    """Line numbers where a ``$$`` block opens after, or closes before, a non-blank line."""
    lines, bad, inside = markdown.split("\n"), [], False
    for i, line in enumerate(lines):
        s = line.strip()
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
    assert display_math_inside_a_paragraph("$$\na = b\n$$") == []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_display_math_stands_in_its_own_paragraph(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    bad = [(i, line) for i, c in enumerate(cells) if c["cell_type"] == "markdown"
           for line in display_math_inside_a_paragraph("".join(c["source"]))]
    assert not bad, f"display math inside a paragraph at (cell, line) {bad}"
