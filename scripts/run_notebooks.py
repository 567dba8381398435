"""Execute the step-through notebooks from a clean kernel and save them with their outputs.

    python scripts/run_notebooks.py                          # every notebooks/*.ipynb, in place
    python scripts/run_notebooks.py notebooks/06_*.ipynb     # some of them
    python scripts/run_notebooks.py --check                  # run, report, write nothing

Each notebook runs in its own fresh Python kernel with `notebooks/` as the working directory, as a
reader's Jupyter would run it; the first cell that raises stops it and the script exits 1. Outputs
(the pictures) are committed, so the notebooks show their results when browsing the repository;
run this after changing the package or the built-in model. Needs the `notebooks` extra.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 600  # no single cell may take longer; the budget is 3 minutes a notebook


def execute(path: Path, write: bool = True) -> float:
    """Run `path` top to bottom in a new kernel; return the seconds it took. Raises on the first error."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    began = time.time()
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    seconds = time.time() - began
    notebook.metadata.pop("widgets", None)
    if write:
        nbformat.write(notebook, path)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    p.add_argument("--check", action="store_true", help="execute only; do not save the outputs")
    args = p.parse_args(argv)
    try:
        import nbclient  # noqa: F401
    except ImportError:
        print("error: running notebooks needs the notebooks extra: pip install -e '.[notebooks]'", file=sys.stderr)
        return 2
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    if not paths:
        print(f"error: no notebooks found in {NOTEBOOKS}", file=sys.stderr)
        return 2
    failed = []
    for path in paths:
        try:
            seconds = execute(path, write=not args.check)
            print(f"{path.name:<40} {seconds:6.1f} s")
        except Exception as err:  # nbclient's CellExecutionError carries the cell and the traceback
            failed.append(path.name)
            print(f"{path.name:<40} FAILED\n{err}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
