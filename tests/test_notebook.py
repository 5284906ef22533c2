"""The demo notebook: it runs headless in a fresh kernel, and is committed with its outputs."""

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "demo.ipynb"
CELL_TIMEOUT_SECONDS = 60


def committed_cells() -> list:
    """The cells of demo.ipynb as committed, outputs included."""
    return nbformat.read(NOTEBOOK, as_version=4).cells


def committed_code_cells() -> list:
    """The code cells of demo.ipynb as committed, outputs included."""
    return [cell for cell in committed_cells() if cell.cell_type == "code"]


def test_the_demo_notebook_runs_top_to_bottom_in_a_fresh_kernel_and_its_assertions_hold():
    """demo.ipynb starts its own server, proves resume, the rate limit and room isolation, and stops the server."""
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


def test_every_code_cell_follows_a_markdown_cell_that_says_what_to_expect():
    """One story: a markdown cell comes before each code cell."""
    cells = committed_cells()
    assert cells[0].cell_type == "markdown"
    assert [index for index, cell in enumerate(cells)
            if cell.cell_type == "code" and cells[index - 1].cell_type != "markdown"] == []


def test_the_notebook_waits_for_events_and_never_sleeps():
    """No code cell sleeps: every wait is for an event, with a timeout."""
    assert [cell.source for cell in committed_code_cells() if "sleep" in cell.source] == []


def test_only_the_helper_cell_reaches_into_a_connection():
    """Story cells pull the plug through drop_connection(), never through the socket's internals."""
    assert [cell.source for cell in committed_code_cells()
            if ".protocol" in cell.source and "def drop_connection" not in cell.source] == []


def test_the_committed_notebook_says_how_to_join_its_server():
    """The first output says how to join the notebook's own server: the terminal command and the web page."""
    first_output = committed_code_cells()[0].outputs[0].text
    port = re.search(r"python client\.py \S+ --port=(\d+)", first_output).group(1)
    assert f"http://localhost:{port}/" in first_output
