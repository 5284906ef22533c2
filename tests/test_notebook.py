"""The demo notebook: it runs headless in a fresh kernel, any cell can run again, and it is committed with its outputs."""

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "demo.ipynb"
CELL_TIMEOUT_SECONDS = 60
ALICES_REPLY = "#lobby  alice: carol, slow down!"

# Run in the notebook's kernel before its cells: counts the servers chat.serve() starts
# and chat.shutdown() stops, and the most that were running at once.
COUNT_SERVERS = """
import chat
_test_serve, _test_shutdown = chat.serve, chat.shutdown
_test_servers = {"started": [], "stopped": 0, "most_at_once": 0}

def _test_counting_serve(*args, **kwargs):
    result = _test_serve(*args, **kwargs)
    _test_servers["started"].append(result[2])
    running = len(_test_servers["started"]) - _test_servers["stopped"]
    _test_servers["most_at_once"] = max(_test_servers["most_at_once"], running)
    return result

async def _test_counting_shutdown(*args, **kwargs):
    _test_servers["stopped"] += 1
    await _test_shutdown(*args, **kwargs)

chat.serve, chat.shutdown = _test_counting_serve, _test_counting_shutdown
"""

# Run in the notebook's kernel while its alice is connected: a stranger asks for her name.
SOMEONE_ELSE_AS_ALICE = """
try:
    await Client("alice").open()
except Refused as refusal:
    print(refusal)
"""


def read_notebook() -> nbformat.NotebookNode:
    """demo.ipynb as committed, outputs included."""
    return nbformat.read(NOTEBOOK, as_version=4)


def committed_cells() -> list:
    """The cells of demo.ipynb as committed, outputs included."""
    return read_notebook().cells


def committed_code_cells() -> list:
    """The code cells of demo.ipynb as committed, outputs included."""
    return [cell for cell in committed_cells() if cell.cell_type == "code"]


def new_client(notebook: nbformat.NotebookNode) -> NotebookClient:
    """A headless runner for the notebook, in the project folder (where chat.py is)."""
    return NotebookClient(notebook, timeout=CELL_TIMEOUT_SECONDS, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}})


def code_cell_under(cells: list, heading: str) -> int:
    """The index of the first code cell after the markdown cell that starts with `heading`."""
    start = next(index for index, cell in enumerate(cells)
                 if cell.cell_type == "markdown" and cell.source.startswith(heading))
    return next(index for index in range(start, len(cells)) if cells[index].cell_type == "code")


def output_text(cell) -> str:
    """A code cell's outputs as plain text: what it printed and the text twin of what it displayed."""
    return "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "")
                   for output in cell.outputs)


def column(table: str, name: str) -> list[str]:
    """One user's column of a plain-text transcript table ("alice | bob | carol")."""
    header, *rows = [line.split(" | ") for line in table.splitlines()]
    return [row[header.index(name)] for row in rows]


def carols_act_3_column(cells: list) -> list[str]:
    """What act 3's transcript (the table the cell displays) shows under carol."""
    outputs = cells[code_cell_under(cells, "## Act 3")].outputs
    table = [output for output in outputs if output.output_type == "display_data"][-1]
    return column(table.data["text/plain"], "carol")


@pytest.fixture(scope="module")
def fresh_run() -> nbformat.NotebookNode:
    """demo.ipynb executed top to bottom in a fresh kernel; any error fails here."""
    notebook = read_notebook()
    new_client(notebook).execute()  # raises CellExecutionError, with the cell and its traceback
    return notebook


def test_the_demo_notebook_runs_top_to_bottom_in_a_fresh_kernel_and_its_assertions_hold(fresh_run):
    """demo.ipynb starts its own server, proves resume, the rate limit and room isolation, and stops the server."""
    assert "already stopped" not in output_text(fresh_run.cells[code_cell_under(fresh_run.cells, "## Stop")])


def test_in_act_3_carol_receives_alices_reply_after_her_refusal(fresh_run):
    """Refused is not blocked: carol's column shows her rate_limited error, then alice's reply."""
    for cells in (fresh_run.cells, committed_cells()):
        carol = [line for line in carols_act_3_column(cells) if line]
        assert carol[-2].startswith("error rate_limited") and carol[-1] == ALICES_REPLY


def test_every_cell_runs_again_in_order_with_one_server_and_the_earlier_users_saying_goodbye():
    """Run up to carol's drop, then every cell again, then all once more: no error, never two servers."""
    notebook = read_notebook()
    cells = notebook.cells
    start, act_1 = code_cell_under(cells, "## Start"), code_cell_under(cells, "## Act 1")
    drop, stop = code_cell_under(cells, "## Act 2"), code_cell_under(cells, "## Stop")
    after_start = [index for index, cell in enumerate(cells) if cell.cell_type == "code" and index > start]
    # The test's own cells, after the notebook's: a spy on chat.serve/shutdown, a stranger, a probe.
    count_servers, someone_else_as_alice, print_servers = range(len(cells), len(cells) + 3)
    cells += [nbformat.v4.new_code_cell(COUNT_SERVERS), nbformat.v4.new_code_cell(SOMEONE_ELSE_AS_ALICE),
              nbformat.v4.new_code_cell("import json; print(json.dumps(_test_servers))")]
    client = new_client(notebook)
    with client.setup_kernel():
        def run(index: int) -> str:
            """Run one cell in this kernel; return what it printed and displayed."""
            client.execute_cell(cells[index], index)  # raises CellExecutionError on any error
            return output_text(cells[index])

        run(count_servers)
        first_port = re.search(r"port (\d+)", run(start)).group(1)
        for index in [index for index in after_start if index <= drop]:  # carol is away, the server up
            run(index)

        # Again, from the top: the running server is reused, and alice, bob and carol
        # (carol's session held) say goodbye before their names are taken again.
        assert f"still running on port {first_port}: reusing it" in run(start)
        for index in after_start:
            said = run(index)
            if index == act_1:
                for name in ("alice", "bob", "carol"):
                    assert f"The name {name} is still taken by the {name} of an earlier run" in said
                assert "alice was refused: The username 'alice' is taken" in run(someone_else_as_alice)
        assert carols_act_3_column(cells)[-1] == ALICES_REPLY
        assert json.loads(run(print_servers)) == {"started": [int(first_port)], "stopped": 1, "most_at_once": 1}

        # After the last cell stopped it: the stop cell knows, and the first cell starts a new one.
        assert "already stopped" in run(stop)
        assert "The server is up on port" in run(start)
        for index in after_start:
            run(index)
        assert carols_act_3_column(cells)[-1] == ALICES_REPLY
        servers = json.loads(run(print_servers))
        assert (len(servers["started"]), servers["stopped"], servers["most_at_once"]) == (2, 2, 1)


def test_act_headings_are_numbered_as_the_story_lists_them_and_nothing_else_is_numbered():
    """"## Act 2: carol comes back" for item 2 of the story; the text says "act 2", never "act two"."""
    cells = committed_cells()
    story = dict(re.findall(r"^(\d)\. \*\*(.+?)\.?\*\*", cells[0].source, re.M))
    headings = [re.match(r"#+ (.*)", line).group(1) for cell in cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("#")]
    acts = [re.match(r"Act (\d): (.*)", heading).groups() for heading in headings if heading.startswith("Act")]
    assert list(story) == ["1", "2", "3", "4"]
    assert acts == list(story.items())
    assert [heading for heading in headings if re.match(r"\d", heading)] == []
    text = "\n".join(cell.source for cell in cells)
    assert re.findall(r"(?i)\bacts? (?:one|two|three|four)\b", text) == []
    assert set(re.findall(r"(?i)\bacts? (\d)", text)) <= set(story)


def test_the_committed_notebook_holds_the_outputs_of_one_clean_run():
    """Every code cell of the committed demo.ipynb ran once, in order, and none failed."""
    cells = committed_code_cells()
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    assert not [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert sum(len(cell.outputs) for cell in cells) >= len(cells) // 2


def test_the_committed_outputs_name_no_folder_of_the_machine_they_ran_on():
    """Outputs are the same on every machine: no /work, /tmp or /root paths."""
    outputs = str([cell.outputs for cell in committed_code_cells()])
    assert [folder for folder in ("/work", "/tmp", "/root", "/home") if folder in outputs] == []


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


def test_the_notebook_uses_only_chats_public_names():
    """chat.serve, chat.shutdown, chat.CrowdLimits and chat.log; never the manager's insides."""
    source = "\n".join(cell.source for cell in committed_code_cells())
    assert set(re.findall(r"\bchat\.(\w+)", source)) <= {"serve", "shutdown", "CrowdLimits", "log"}
    assert re.findall(r"\bmanager\.\w+", source) == []


def test_the_committed_notebook_says_how_to_join_its_server():
    """The first output says how to join the notebook's own server: the terminal command and the web page."""
    first_output = committed_code_cells()[0].outputs[0].text
    port = re.search(r"python client\.py \S+ --port=(\d+)", first_output).group(1)
    assert f"http://localhost:{port}/" in first_output
