"""notebooks/README.md's map: every row points at code that exists and a notebook that exists, every
document has its rows, and every heading it cites is the document's own text.

The map has one table per document under "## The map", each headed `### NNN · ...`, with the columns
doc | heading | step / diagram | code | notebook | notes.
"""
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
README = NOTEBOOKS / "README.md"
SEEDS = Path("/work/shared/seeds")  # the documents; only on the machines that have them, not in CI

# Rows found when the map was made: one per numbered step and per figure of each document.
MIN_ROWS = {"000": 43, "001": 36, "003": 72, "004": 79}
COLUMNS = ["doc", "heading", "step / diagram", "code", "notebook", "notes"]
NONE = "—"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def map_rows() -> list[dict[str, str]]:
    """Every row of every table after "## The map", as {column: text}."""
    text = README.read_text(encoding="utf-8")
    assert "\n## The map\n" in text, "notebooks/README.md has no '## The map' section"
    rows, document = [], None
    for line in text.split("\n## The map\n", 1)[1].splitlines():
        if line.startswith("## "):
            break
        if line.startswith("### "):
            document = line[4:].split()[0]
        elif line.startswith("|"):
            cells = _cells(line)
            if cells == COLUMNS or set("".join(cells)) <= set("-: "):
                continue  # header or separator
            assert len(cells) == len(COLUMNS), f"row with {len(cells)} cells, not {len(COLUMNS)}: {line}"
            row = dict(zip(COLUMNS, cells))
            assert row["doc"] == document, f"row of document {row['doc']} in the table of {document}: {line}"
            rows.append(row)
    return rows


ROWS = map_rows()


def code_names(cell: str) -> list[str]:
    """The dotted names in a code cell (`sd_scratch.x.y`, comma separated), or [] for —."""
    if cell == NONE:
        return []
    names = re.findall(r"`([^`]+)`", cell)
    assert names and all(n.startswith("sd_scratch.") or n == "sd_scratch" for n in names), cell
    return names


def notebook_names(cell: str) -> list[str]:
    """The notebooks a notebook cell links to, or [] for —."""
    if cell == NONE:
        return []
    names = re.findall(r"\]\(([^)]+\.ipynb)\)", cell)
    assert names, f"notebook cell should be {NONE} or links to .ipynb files: {cell!r}"
    return names


def resolve(dotted: str):
    """Import the longest importable module prefix of `dotted`, then getattr the rest."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        module_name = ".".join(parts[:n])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise  # the module exists but imports something missing: a real error
            continue
        for attribute in parts[n:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def document_file(document: str) -> Path:
    matches = sorted(SEEDS.glob(f"{document}_*.txt"))
    assert len(matches) == 1, f"expected one file {document}_*.txt in {SEEDS}, found {matches}"
    return matches[0]


def test_every_document_has_its_rows():
    counts = {d: sum(row["doc"] == d for row in ROWS) for d in MIN_ROWS}
    assert all(counts[d] >= n for d, n in MIN_ROWS.items()), counts
    assert {row["doc"] for row in ROWS} == set(MIN_ROWS)


def test_every_row_is_filled_in():
    for row in ROWS:
        assert row["heading"] and row["step / diagram"], row
        # a row without code says why in its notes
        assert code_names(row["code"]) or row["notes"], row


@pytest.mark.parametrize("name", sorted({n for row in ROWS for n in code_names(row["code"])}))
def test_code_name_resolves(name):
    resolve(name)


@pytest.mark.parametrize("name", sorted({n for row in ROWS for n in notebook_names(row["notebook"])}))
def test_notebook_exists(name):
    assert (NOTEBOOKS / name).is_file(), f"notebooks/{name} is named in the map but does not exist"


def test_the_notebook_list_links_existing_files():
    text = README.read_text(encoding="utf-8").split("\n## The map\n")[0]
    listed = re.findall(r"\]\((\d\d_[a-z0-9_]+\.ipynb)\)", text)
    assert len(listed) == 11 and len(set(listed)) == 11, listed
    mapped = {n for row in ROWS for n in notebook_names(row["notebook"])}
    assert mapped <= set(listed), mapped - set(listed)
    missing = [n for n in listed if not (NOTEBOOKS / n).is_file()]
    assert not missing, f"listed in notebooks/README.md but not in notebooks/: {missing}"


@pytest.mark.parametrize("document", sorted(MIN_ROWS))
def test_cited_headings_are_in_the_document(document):
    """Each part of `A › B` occurs verbatim in the document, so a reader's search finds it."""
    if not SEEDS.is_dir():
        pytest.skip(f"the documents ({SEEDS}) are not on this machine")
    text = document_file(document).read_text(encoding="utf-8")
    missing = sorted({part for row in ROWS if row["doc"] == document
                      for part in row["heading"].split(" › ") if part not in text})
    assert not missing, f"{document}: headings not found verbatim: {missing}"
