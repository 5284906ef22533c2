"""The demo notebook: it runs headless in a fresh kernel, and is committed with its outputs."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "demo.ipynb"
CELL_TIMEOUT_SECONDS = 60


def committed_code_cells() -> list:
    """The code cells of demo.ipynb as committed, outputs included."""
    return [cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]


def test_the_demo_notebook_runs_top_to_bottom_in_a_fresh_kernel_and_its_assertions_hold():
    """demo.ipynb starts its own server, proves room isolation and stops the server, without an error."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_SECONDS, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error


def test_the_committed_notebook_holds_the_outputs_of_one_clean_run():
    """Every code cell of the committed demo.ipynb ran once, in order, and none failed."""
    cells = committed_code_cells()
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    assert not [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert sum(len(cell.outputs) for cell in cells) >= len(cells) // 2


def test_the_committed_notebook_shows_no_resume_token():
    """Resume tokens are secrets: the committed outputs never print one."""
    outputs = str([cell.outputs for cell in committed_code_cells()])
    assert "token" not in outputs
