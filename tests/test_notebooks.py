"""Every notebook in notebooks/ runs top to bottom from a clean kernel (scripts/run_notebooks.py)."""
from pathlib import Path

import pytest

from scripts.run_notebooks import NOTEBOOKS, execute

pytest.importorskip("nbclient", reason="the notebooks extra is not installed")

NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_notebooks_are_there():
    assert len(NOTEBOOK_PATHS) == 11, [p.name for p in NOTEBOOK_PATHS]


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path):
    execute(path, write=False)


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_outputs(path: Path):
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "run scripts/run_notebooks.py and commit"
    assert any(o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for c in code for o in c.outputs), "no picture in the outputs"
