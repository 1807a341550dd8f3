"""The mirror rule (DESIGN.md): a function or class that a notebook defines under the
same name as one in ``refimpl`` is the same code, up to docstrings and comments."""
import ast
import difflib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MODULES = sorted((ROOT / "refimpl").rglob("*.py"))


def strip_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def top_level_defs(source: str) -> dict[str, list[str]]:
    defs: dict[str, list[str]] = {}
    for node in strip_docstrings(ast.parse(source)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.setdefault(node.name, []).append(ast.unparse(node))
    return defs


def notebook_source(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            lines += [ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


REFIMPL = {}
for module in MODULES:
    for name, versions in top_level_defs(module.read_text()).items():
        REFIMPL.setdefault(name, []).extend((module.relative_to(ROOT), v) for v in versions)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_definitions_mirror_refimpl(notebook):
    shared = {name: versions for name, versions in top_level_defs(notebook_source(notebook)).items()
              if name in REFIMPL}
    assert shared, f"{notebook.name} defines none of refimpl's functions: nothing ties it to the code"
    for name, versions in shared.items():
        for nb_code in versions:
            if any(nb_code == ref for _, ref in REFIMPL[name]):
                continue
            module, ref = REFIMPL[name][0]
            diff = "\n".join(difflib.unified_diff(ref.splitlines(), nb_code.splitlines(),
                                                  str(module), notebook.name, lineterm=""))
            pytest.fail(f"{notebook.name} defines {name} differently from {module}:\n{diff}")


def test_mirror_check_catches_drift():
    ref = "def f(x):\n    'doc'\n    return x + 1  # comment\n"
    assert top_level_defs(ref) == top_level_defs("def f(x):\n    return x + 1\n")
    assert top_level_defs(ref) != top_level_defs("def f(x):\n    return x + 2\n")
