"""Every notebook runs top to bottom in tiny mode (QBH_TINY=1), so none of them can rot."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NB_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("0*.ipynb"))


def test_the_four_notebooks_exist_and_match_their_builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebooks", NB_DIR / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert [p.name for p in NOTEBOOKS] == list(builder.NOTEBOOKS)
    for path in NOTEBOOKS:
        committed = [c.source for c in nbformat.read(path, as_version=4).cells]
        built = [c.source for c in builder.build(path.name, builder.NOTEBOOKS[path.name]).cells]
        assert committed == built, f"{path.name} differs from build_notebooks.py; rerun it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_tiny_mode(path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("QBH_TINY", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "every notebook shows at least one figure inline"
    assert os.environ["QBH_TINY"] == "1"
