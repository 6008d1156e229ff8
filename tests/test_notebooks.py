"""The notebooks: their jupytext sources and the paired .ipynb agree, and every notebook runs headless
with its QUICK parameters (papermill), as `make reproduce QUICK=1` does.

notebooks/NN-name.py (jupytext percent format) is each notebook's source; notebooks/NN-name.ipynb is
generated from it by `make notebooks` and is what papermill runs. Quick runs write under build/quick/,
never over the versioned data/results or figures/.
"""

from __future__ import annotations

import re
import shutil
from itertools import zip_longest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.py"))
PAIRING = "ipynb,py:percent"


def pair_differences(source: Path, notebook: Path) -> list[str]:
    """How the cells of ``notebook`` (.ipynb) differ from those its jupytext ``source`` (.py) defines:
    cell type, source text and tags, cell by cell. Empty when the pair is in sync."""
    import jupytext
    import nbformat

    expected = jupytext.read(source).cells
    actual = nbformat.read(notebook, as_version=4).cells
    differences = []
    if len(expected) != len(actual):
        differences.append(f"{len(expected)} cells in {source.name}, {len(actual)} in {notebook.name}")
    for index, (want, have) in enumerate(zip(expected, actual, strict=False)):
        for field, want_value, have_value in (
            ("cell type", want.cell_type, have.cell_type),
            ("source", want.source, have.source),
            ("tags", want.metadata.get("tags", []), have.metadata.get("tags", [])),
        ):
            if want_value == have_value:
                continue
            lines = zip_longest(want_value.splitlines(), have_value.splitlines()) if field == "source" else ()
            first = next(((n, pair) for n, pair in enumerate(lines, 1) if pair[0] != pair[1]), None)
            if first:  # name the first line of the source that differs
                field, (want_value, have_value) = f"source line {first[0]}", first[1]
            differences.append(f"cell {index} {field}: {source.name} has {want_value!r}, "
                               f"{notebook.name} {have_value!r}")
    return differences


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


def test_every_notebook_is_paired_with_its_jupytext_source():
    import jupytext
    import nbformat

    assert [p.stem for p in SOURCES] == [p.stem for p in NOTEBOOKS], \
        "every notebooks/NN-name.ipynb needs its source notebooks/NN-name.py and the reverse"
    for source, notebook in zip(SOURCES, NOTEBOOKS, strict=True):
        assert jupytext.read(source).metadata.get("jupytext", {}).get("formats") == PAIRING, \
            f"{source.name}: its header must pair it (jupytext formats: {PAIRING})"
        assert nbformat.read(notebook, as_version=4).metadata.get("jupytext", {}).get("formats") == PAIRING, \
            f"{notebook.name}: its metadata must pair it (jupytext formats: {PAIRING})"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_is_in_sync_with_its_source(source):
    differences = pair_differences(source, source.with_suffix(".ipynb"))
    assert not differences, (f"{source.stem}.ipynb is out of sync with {source.name}: run `make notebooks` "
                             "and commit both:\n" + "\n".join(differences))


def test_regenerating_an_unchanged_source_rewrites_an_identical_notebook(tmp_path):
    """`make notebooks` (jupytext --to ipynb --update) on the committed pairs changes no byte: same cells,
    same cell ids, same metadata."""
    from jupytext.cli import jupytext as jupytext_cli

    for source in SOURCES:
        shutil.copy(source, tmp_path / source.name)
        shutil.copy(source.with_suffix(".ipynb"), tmp_path / f"{source.stem}.ipynb")
    jupytext_cli(["--quiet", "--to", "ipynb", "--update", *[str(tmp_path / s.name) for s in SOURCES]])
    changed = [s.stem for s in SOURCES
               if (tmp_path / f"{s.stem}.ipynb").read_bytes() != s.with_suffix(".ipynb").read_bytes()]
    assert not changed, f"`make notebooks` would rewrite {changed}: regenerate them and commit"


def test_sync_check_fails_on_an_edited_source_and_passes_once_regenerated(tmp_path):
    from jupytext.cli import jupytext as jupytext_cli

    source = ROOT / "notebooks" / "00-environment.py"
    copy, notebook = tmp_path / source.name, tmp_path / "00-environment.ipynb"
    shutil.copy(source.with_suffix(".ipynb"), notebook)
    text = source.read_text()

    copy.write_text(text.replace("max_tokens = 32", "max_tokens = 33", 1))  # an edited line
    differences = pair_differences(copy, notebook)
    assert len(differences) == 1 and differences[0] == ("cell 1 source line 7: 00-environment.py has 'max_tokens = 33', "
                                                     "00-environment.ipynb 'max_tokens = 32'"), differences

    copy.write_text(text.replace('# %% tags=["parameters"]', "# %%", 1))  # the parameters tag dropped
    assert [d.split(":")[0] for d in pair_differences(copy, notebook)] == ["cell 1 tags"]

    copy.write_text(text + '\n# %% [markdown]\n# a new cell\n')  # a cell added
    assert pair_differences(copy, notebook)[0] == "8 cells in 00-environment.py, 7 in 00-environment.ipynb"

    jupytext_cli(["--quiet", "--to", "ipynb", "--update", str(copy)])  # what `make notebooks` runs
    assert pair_differences(copy, notebook) == []


def test_every_notebook_shares_the_common_parameters_and_setup():
    """The parameters every notebook takes and its setup cell (output paths) are the same everywhere."""
    import nbformat

    common_parameters, common_setup = None, None
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        assert "parameters" in cells[1].metadata.get("tags", []), f"{path.name}: cell 1 is the parameters cell"
        parameters = cells[1].source.splitlines()[:4]
        first, _, setup = cells[2].source.partition("\n")
        assert first == f'EXPERIMENT = "{path.stem}"', f"{path.name}: cell 2 starts by naming its experiment"
        common_parameters = common_parameters or parameters
        common_setup = common_setup or setup
        assert parameters == common_parameters, f"{path.name}: parameters differ from {NOTEBOOKS[0].name}'s"
        assert setup == common_setup, f"{path.name}: setup cell differs from {NOTEBOOKS[0].name}'s"
    assert [line.split("=")[0].strip() for line in common_parameters[1:]] == ["quick", "run_experiments",
                                                                              "model"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_quick(path, tmp_path):
    """On the tiny ``demo`` checkpoint: the smoke test of the mechanics (``make reproduce`` runs the real model)."""
    import papermill

    papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters={"quick": True, "model": "demo"},
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
