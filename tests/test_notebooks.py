"""Every notebook of the course runs, top to bottom, in small mode (``MINIPAGED_SMALL=1``).

Each ``notebooks/*.ipynb`` (a notebook added later is picked up by the glob) is executed by
nbclient on a copy held in memory, never rewriting the committed file, with ``notebooks/`` as the
working directory, as a reader on a CPU runs it: the kernel imports this checkout's ``minipaged``
and runs the PyTorch references (``TRITON_INTERPRET`` is dropped: the kernels' own tests drive
Triton's interpreter, and a notebook's model would take minutes through it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Each notebook's budget is 60 s in small mode on two CPU cores; the test fails at twice that, so
# that a loaded CI machine does not make it flaky while a notebook that grew too slow still fails.
SECONDS_PER_NOTEBOOK = 120
CELL_TIMEOUT = 300  # a stuck cell fails the test instead of hanging CI


def errors(notebook) -> list[str]:
    """A line per code cell that did not run or whose output is an error."""
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("execution_count") is None:
            found.append(f"cell {index} was not executed")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {index}: {output.get('ename')}: {output.get('evalue')}")
    return found


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_small_mode(path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)  # in memory: the committed file is never written
    # The kernel inherits this process's environment.
    monkeypatch.setenv("MINIPAGED_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the traceback, at the first failing cell
    seconds = time.perf_counter() - start
    assert errors(notebook) == []
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "course.machine()" in first.source, "a notebook's first code cell prints course.machine()"
    assert seconds < SECONDS_PER_NOTEBOOK, f"{path.name} took {seconds:.0f} s in small mode"


def test_errors_finds_error_outputs_and_unexecuted_cells():
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("1", execution_count=1),
        nbformat.v4.new_code_cell("x", execution_count=2, outputs=[
            nbformat.v4.new_output("error", ename="NameError", evalue="x", traceback=[])]),
        nbformat.v4.new_code_cell("2"),
        nbformat.v4.new_markdown_cell("text"),
    ])
    assert errors(notebook) == ["cell 1: NameError: x", "cell 2 was not executed"]
