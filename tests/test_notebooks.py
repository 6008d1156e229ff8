"""Every notebook runs headless with its QUICK parameters (papermill), as `make reproduce QUICK=1` does.

Quick runs write under build/quick/, never over the versioned data/results or figures/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))


def test_every_notebook_has_a_parameters_cell_and_no_outputs():
    import nbformat

    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        assert "quick" in tagged[0].source and "run_experiments" in tagged[0].source, path.name
        assert notebook.cells[0].cell_type == "markdown", f"{path.name}: starts with a markdown cell"
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), \
            f"{path.name}: outputs must be stripped in git"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_quick(path, tmp_path):
    import papermill

    papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters={"quick": True},
                               cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False)
    figures = ROOT / "build" / "quick" / "figures"
    for name in figure_names(path):
        assert (figures / f"{name}.png").is_file(), f"{path.stem} did not write figure {name}.png"
    if path.stem not in ("00-environment",):
        assert figure_names(path), f"{path.stem} names no figure"


def figure_names(path: Path) -> list[str]:
    """The figures a notebook saves: the names of its ``plots.save_figure(fig, "<name>", ...)`` calls."""
    import nbformat

    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    return re.findall(r'save_figure\(\s*fig\s*,\s*"([^"]+)"', source)


def test_every_named_figure_is_committed():
    """figures/ holds the PNG of every figure a notebook names (`make figures` rewrites them from data/results)."""
    missing = [f"{name}.png" for path in NOTEBOOKS for name in figure_names(path)
               if not (ROOT / "figures" / f"{name}.png").is_file()]
    assert not missing, f"figures/ lacks {missing}: run `make figures` and commit the PNGs"
