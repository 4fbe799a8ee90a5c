"""Execute every walkthrough in notebooks/ top to bottom (as a reader would), so they never rot.

Each notebook runs in a fresh kernel with the repo root as working directory and must finish without
an error within its time limit on a 2-core CPU. NOTEBOOK_SMALL=1 makes them quicker without skipping a cell:
notebooks 01 and 02 train a toy world with a tenth of the default training (cached under runs/cache like any
other), 02 compares the variants at 2 GFLOP instead of 10 with 2 held-out evaluations instead of 8, and 03 times
each method's update without a warm-up.

Run: python -m pytest -q tests/test_notebooks.py
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, "notebooks/ should hold the three walkthroughs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_SMALL", "1")  # the kernel inherits this process's environment
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
