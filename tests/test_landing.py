"""The landing page's claims table (notebooks/index.md) is generated from the committed JSON results
by refimpl.landing; these tests make sure it cannot drift from them."""
import json
import re
import shutil

import pytest

from refimpl import landing

NUMBER = re.compile(r"^-?\d+(\.\d+)?")


def copy_sources(tmp_path):
    """Copy index.md, the notebooks and every JSON file the tables read (those that exist) under tmp_path."""
    rels = {s for _, sources, *_ in landing.CLAIMS for s in sources} | {landing.INDEX}
    rels |= {f"notebooks/{nb}.ipynb" for nb in landing.CHAPTERS}
    for rel in rels:
        if (landing.ROOT / rel).exists():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(landing.ROOT / rel, tmp_path / rel)
    return tmp_path


def test_index_md_claims_table_is_up_to_date():
    text = (landing.ROOT / landing.INDEX).read_text()
    region = text.split(landing.START + "\n")[1].split(landing.END)[0]
    assert region == landing.claims_table() + "\n", "run: python -m refimpl.landing"
    assert landing.main(["--check"]) == 0


def test_every_measured_value_is_a_number_read_from_its_json():
    rows = landing.claim_rows()
    assert len(rows) == len(landing.CLAIMS) >= 14
    for row in rows:
        present = all((landing.ROOT / s).exists() for s in row["sources"])
        if present:
            m = NUMBER.match(row["measured"])
            assert m, row
            float(m.group())
            assert row["met"] in ("yes", "**no**", "n/a"), row
            assert row["verdict"] in landing.VERDICTS, row
        else:  # only chapter 1's training records may still be on their way
            assert all(s.startswith("refimpl/assets/pointer/") for s in row["sources"]), row
            assert row["measured"] == landing.MISSING


def test_tsp5_record_is_committed_and_measured():
    row = next(r for r in landing.claim_rows() if "TSP n=5" in r["claim"])
    assert row["measured"] != landing.MISSING and row["met"] in ("yes", "**no**")


def test_tampered_json_changes_the_table(tmp_path):
    root = copy_sources(tmp_path)
    assert landing.claims_table(root) == landing.claims_table()
    path = root / "figures/bench_workbench.json"
    data = json.loads(path.read_text())
    data["draft_cost_ratio"] = 3.25
    path.write_text(json.dumps(data))
    tampered = landing.claims_table(root)
    assert tampered != landing.claims_table()
    assert "| 3.2x cheaper | ≥ 8x | **no** |" in tampered
    # and the page built from it is now out of date, which --check reports
    assert landing.main(["--check"], root=root) == 1
    assert landing.main([], root=root) == 0
    assert landing.main(["--check"], root=root) == 0
    assert "3.2x cheaper" in (root / landing.INDEX).read_text()


def test_tampered_pointer_record_changes_its_row(tmp_path):
    root = copy_sources(tmp_path)
    path = root / "refimpl/assets/pointer/tsp5.json"
    data = json.loads(path.read_text())
    for r in data["test"]:
        if r["beam_size"] == 3:
            r["gap"], r["mean_length"] = 0.05, r["mean_optimal"] * 1.05
    path.write_text(json.dumps(data))
    row = next(r for r in landing.claim_rows(root) if "TSP n=5" in r["claim"])
    assert "gap 5.00%" in row["measured"] and row["met"] == "**no**"
    assert row["verdict"] == "not reproduced"


def test_missing_record_reads_not_yet_measured_but_missing_row_fails(tmp_path):
    root = copy_sources(tmp_path)
    (root / "refimpl/assets/pointer/tsp5.json").unlink()
    row = next(r for r in landing.claim_rows(root) if "TSP n=5" in r["claim"])
    assert row["measured"] == landing.MISSING
    record = json.loads((landing.ROOT / "refimpl/assets/pointer/tsp5.json").read_text())
    with pytest.raises(KeyError, match="beam_size=7"):
        landing.pointer_test(record, "tsp", 5, 7)


def test_index_without_markers_is_an_error():
    with pytest.raises(ValueError, match="chapters:start"):
        landing.render_index("# no markers here\n")
    with pytest.raises(ValueError, match="claims:start"):
        landing.render_index(f"{landing.CHAPTERS_START}\n{landing.CHAPTERS_END}\n")


def test_chapter_table_names_files_that_exist_and_the_sidebar_titles():
    table = landing.chapters_table()
    for nb, (code, kernel, tests) in landing.CHAPTERS.items():
        assert (landing.ROOT / "notebooks" / f"{nb}.ipynb").is_file()
        for name in code.split():
            module, package = landing.ROOT / "refimpl" / f"{name}.py", landing.ROOT / "refimpl" / name
            assert module.is_file() or (package / "__init__.py").is_file(), name
        for name in kernel.split():
            assert (landing.ROOT / "refimpl/kernels" / f"{name}.py").is_file(), name
        for name in tests.split():
            assert (landing.ROOT / "tests" / f"test_{name}.py").is_file(), name
    assert "[2. Beam search and diverse beam search](02_beam_search.ipynb)" in table
