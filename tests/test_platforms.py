"""chat.py, the notebook and client.py wherever a class has Python: Windows, macOS, Python 3.9 to 3.13.

Windows cannot run here, so most of these tests run the programs in a Python that
looks like Windows to them: `standin/sitecustomize.py` hides the Unix-only modules
from chat.py and client.py and makes the loop refuse to watch signals and stdin
(NotImplementedError), as Windows' loop does. On Windows itself the same tests run
without the stand-in. macOS's open-file limit is handed to `resource` the same way.
The oldest supported Python (3.9, macOS's python3) runs the programs when this
machine has it, and the CI workflow runs every test on it and on the newest, on
Linux, macOS and Windows.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, WAIT_SECONDS, ChatServer, assert_graceful_stop, free_port, wait_for_port
from screen import PlainClient, Screen, client_env, termios, wait_for

STANDIN = ROOT / "tests" / "standin"
ON_WINDOWS = sys.platform == "win32"  # the real thing: no stand-in needed, and no SIGINT to send
OLDEST = (3, 9)
# On Windows, a program started in a process group of its own can be sent Ctrl-Break.
NEW_GROUP = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if ON_WINDOWS else {}
# The stand-in's SIGBREAK (Ctrl-Break), played by a signal nothing else sends to these programs.
STANDIN_SIGBREAK = getattr(signal, "SIGTTIN", None)


def windows_env(**extra: str) -> dict:
    """The environment of a program that should meet Windows: the stand-in here, the real thing on Windows."""
    env = client_env(**extra)
    if not ON_WINDOWS:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STANDIN), env.get("PYTHONPATH")]))
        env["STANDIN_WINDOWS"] = "1"
    return env


def ctrl_break(process: subprocess.Popen) -> None:
    """Press Ctrl-Break for this process: Windows' CTRL_BREAK_EVENT, or the stand-in's SIGBREAK."""
    process.send_signal(signal.CTRL_BREAK_EVENT if ON_WINDOWS else STANDIN_SIGBREAK)


@pytest.fixture
def processes():
    """Programs a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.fixture
def start_server(processes):
    """Start `python chat.py` on a free port in the given environment; returns (process, port)."""
    def start(env: dict, *flags: str, python: str = sys.executable) -> tuple[subprocess.Popen, int]:
        port = free_port()
        process = subprocess.Popen([python, str(ROOT / "chat.py"), f"--port={port}", *flags],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env, cwd=ROOT, **NEW_GROUP)
        processes.append(process)
        wait_for_port(port, process, timeout=30)
        return process, port
    return start


@pytest.fixture
def plain_clients(processes):
    """Start plain-mode clients; every one is stopped at the end of the test."""
    def start(username: str, port: int, env: dict, python: str = sys.executable) -> PlainClient:
        client = PlainClient(username, port, env, python, ("--host=127.0.0.1", "--plain"), **NEW_GROUP)
        processes.append(client.proc)
        return client
    return start


# ---- the stand-in itself ------------------------------------------------------------------------

PROBE = """
import asyncio, json, sys
facts = {}
for name in ("resource", "termios", "fcntl", "tty"):
    try:
        exec("import " + name)  # an import statement, as the product's code has
        facts[name] = "imported"
    except ImportError:
        facts[name] = "missing"
import signal
facts["SIGWINCH"] = hasattr(signal, "SIGWINCH")
facts["SIGBREAK"] = hasattr(signal, "SIGBREAK")

async def loop_methods():
    loop = asyncio.get_running_loop()
    for name, call in (("add_signal_handler", lambda: loop.add_signal_handler(signal.SIGINT, print)),
                       ("add_reader", lambda: loop.add_reader(sys.stdin.fileno(), print))):
        try:
            call()
            facts[name] = "works"
        except NotImplementedError:
            facts[name] = "NotImplementedError"
asyncio.run(loop_methods())
print(json.dumps(facts))
"""


@pytest.mark.skipif(ON_WINDOWS, reason="on Windows the tests meet the real thing, not the stand-in")
def test_the_standin_shows_chat_py_what_windows_has_and_leaves_other_code_alone():
    """Code in chat.py's file cannot import termios and the like and its loop refuses signals; other code can."""
    as_chat_py = f"exec(compile({PROBE!r}, {str(ROOT / 'chat.py')!r}, 'exec'), {{'__file__': {str(ROOT / 'chat.py')!r}}})"
    product = subprocess.run([sys.executable, "-c", as_chat_py], input="", capture_output=True, text=True,
                             env=windows_env(), cwd=ROOT, timeout=30, check=True)
    other = subprocess.run([sys.executable, "-c", PROBE], input="", capture_output=True, text=True,
                           env=windows_env(), cwd=ROOT, timeout=30, check=True)
    assert product.stdout.strip() == ('{"resource": "missing", "termios": "missing", "fcntl": "missing", '
                                      '"tty": "missing", "SIGWINCH": false, "SIGBREAK": true, '
                                      '"add_signal_handler": "NotImplementedError", "add_reader": "NotImplementedError"}')
    assert other.stdout.strip() == ('{"resource": "imported", "termios": "imported", "fcntl": "imported", '
                                    '"tty": "imported", "SIGWINCH": true, "SIGBREAK": false, '
                                    '"add_signal_handler": "works", "add_reader": "works"}')


# ---- the server where the loop cannot watch signals (Windows) -------------------------------------


@pytest.mark.skipif(ON_WINDOWS, reason="Windows cannot send Ctrl-C to one process; the Ctrl-Break test covers it")
@pytest.mark.gen_test(timeout=60)
async def test_ctrl_c_stops_the_server_gracefully_where_the_loop_cannot_watch_signals(start_server):
    """SIGINT with Windows' loop: every client gets the shutdown notice and 1001; the server exits 0."""
    process, port = start_server(windows_env())
    await assert_graceful_stop(process, port, lambda server: server.send_signal(signal.SIGINT))


@pytest.mark.gen_test(timeout=60)
async def test_ctrl_break_stops_the_server_gracefully_on_windows(start_server):
    """Ctrl-Break (SIGBREAK, Windows only) stops the server as Ctrl-C does: notice, 1001, exit 0."""
    process, port = start_server(windows_env())
    await assert_graceful_stop(process, port, ctrl_break)


def test_plain_clients_chat_and_rooms_stay_apart_on_windows(start_server, plain_clients):
    """With Windows' modules and loop, plain clients chat in #general, and carol in the lobby hears none of it."""
    _, port = start_server(windows_env())
    bob = plain_clients("bob", port, windows_env())
    carol = plain_clients("carol", port, windows_env())
    bob.say("/join general")
    bob.wait_for_line(r"^\* Now in #general")
    alice = subprocess.run([sys.executable, str(ROOT / "client.py"), "alice", "--host=127.0.0.1", f"--port={port}"],
                           input="/join general\nhello from alice\n", capture_output=True, text=True,
                           env=windows_env(), cwd=ROOT, timeout=30, check=False)
    assert alice.returncode == 0, alice.stderr
    assert re.search(r"#general <alice> hello from alice", alice.stdout)
    bob.wait_for_line(r"#general <alice> hello from alice$")
    carol.say("carol was here")  # the server handles lines in order: alice's came first
    carol.wait_for_line(r"#lobby <carol> carol was here$")
    assert not [line for line in carol.output if "hello from alice" in line or "#general" in line]


def test_ctrl_break_ends_a_plain_client_with_a_goodbye_on_windows(start_server, plain_clients):
    """Ctrl-Break in plain mode (no add_signal_handler) closes politely: exit 0, and bob hears carol leave at once."""
    _, port = start_server(windows_env())
    bob = plain_clients("bob", port, windows_env())
    carol = plain_clients("carol", port, windows_env())
    bob.wait_for_line(r"carol joined #lobby")
    ctrl_break(carol.proc)
    assert carol.exit_code() == 0
    bob.wait_for_line(r"carol left")  # a dropped connection would be held for 30 s, silently


@pytest.mark.skipif(ON_WINDOWS, reason="Windows cannot send Ctrl-C to one process; the Ctrl-Break test covers it")
def test_ctrl_c_ends_a_plain_client_with_a_goodbye_where_the_loop_cannot_watch_signals(start_server, plain_clients):
    """Ctrl-C (SIGINT) in plain mode with Windows' loop: exit 0, and bob hears carol leave at once."""
    _, port = start_server(windows_env())
    bob = plain_clients("bob", port, windows_env())
    carol = plain_clients("carol", port, windows_env())
    bob.wait_for_line(r"carol joined #lobby")
    carol.proc.send_signal(signal.SIGINT)
    assert carol.exit_code() == 0
    bob.wait_for_line(r"carol left")


@pytest.mark.skipif(ON_WINDOWS, reason="test_notebook.py runs the notebook on Windows itself")
def test_the_demo_notebook_runs_where_chat_py_cannot_import_the_unix_only_modules():
    """demo.ipynb's `import chat`, its server and its isolation proof work with Windows' modules and loop."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "demo.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=windows_env())  # raises CellExecutionError, with the cell and its traceback, on any error


# ---- the split view where the loop cannot watch stdin or SIGWINCH ---------------------------------


@pytest.fixture
def windows_screen(monkeypatch, start_server, plain_clients):
    """carol's split view in a real pseudo-terminal, meeting Windows' modules and loop; and bob, in plain mode."""
    if ON_WINDOWS:
        pytest.skip("needs a pseudo-terminal, which Windows does not have")
    _, port = start_server(windows_env(), "--rate-per-second=0")
    for name, value in windows_env().items():  # Screen starts the client in this test's environment
        monkeypatch.setenv(name, value)
    bob = plain_clients("bob", port, windows_env())
    carol = Screen("carol", "--host=127.0.0.1", f"--port={port}")
    yield carol, bob
    carol.close()


def test_the_split_view_reads_keys_in_a_thread_where_the_loop_cannot_watch_stdin(windows_screen):
    """Typed keys reach the input line and Enter sends the line, read by the key thread."""
    carol, bob = windows_screen
    carol.wait_for_text("connected")
    carol.type("hello from the key thread")
    wait_for(lambda: "hello from the key thread" in carol.input_line(), what=carol.text)
    carol.type("\r")
    bob.wait_for_line(r"<carol> hello from the key thread$")
    carol.wait_for_text("carol │ hello from the key thread")


def test_the_split_view_redraws_after_a_resize_without_sigwinch(windows_screen):
    """With no SIGWINCH to tell it, the client notices the new size by looking, and redraws for it."""
    carol, _ = windows_screen
    carol.wait_for_text("Users (2)")  # the login's last event is drawn: nothing else would redraw now
    carol.resize(12, 50)  # the emulator crops the old picture; only a redraw fits the header to 50 columns
    wait_for(lambda: carol.header().startswith(" #lobby · carol") and carol.header().rstrip().endswith("connected")
             and carol.input_line().startswith("#lobby ›") and "Rooms" not in carol.text(), what=carol.text)


def test_ctrl_c_leaves_the_split_view_and_restores_the_terminal_where_the_loop_cannot_watch_signals(windows_screen):
    """Ctrl-C: the client leaves with exit status 0 and the terminal echoes and edits lines again."""
    carol, bob = windows_screen
    carol.wait_for_text("connected")
    carol.type("\x03")
    assert carol.wait_exit(timeout=WAIT_SECONDS * 2) == 0
    bob.wait_for_line(r"carol left")
    modes = carol.terminal_modes()[3]
    left_fullscreen = carol.raw.rfind(b"\x1b[?1049l") > carol.raw.rfind(b"\x1b[?1049h")
    assert left_fullscreen and not carol.cursor_hidden() and modes & termios.ECHO and modes & termios.ICANON


def test_the_help_says_there_is_no_ctrl_z_suspend_on_windows():
    """client.py --help offers Ctrl-Z only where the system can suspend a program."""
    result = subprocess.run([sys.executable, str(ROOT / "client.py"), "--help"], capture_output=True, text=True,
                            env=windows_env(), cwd=ROOT, timeout=30, check=True)
    assert "no Ctrl-Z suspend on this system" in result.stdout
    assert "Ctrl-Z suspends" not in result.stdout


# ---- macOS: the open-file limit --------------------------------------------------------------------


def limits_env(tmp_path: Path, soft: str, hard: str, most: int) -> tuple[dict, Path]:
    """An environment whose `resource` reports (soft, hard) and accepts soft limits up to `most`."""
    log = tmp_path / "accepted-limits"
    log.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(STANDIN), os.environ.get("PYTHONPATH")])),
           "STANDIN_RLIMIT": f"{soft},{hard},{most}", "STANDIN_RLIMIT_LOG": str(log)}
    return env, log


async def chat_works(port: int) -> None:
    """alice logs in and her line comes back to her."""
    alice = await ChatServer(port, manager=None).join("alice")
    await alice.say("still here")
    assert (await alice.expect("message"))["text"] == "still here"


def stop(process: subprocess.Popen) -> str:
    """Stop the server with SIGTERM; check it exits 0; everything it printed."""
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=WAIT_SECONDS * 2)
    assert process.returncode == 0, output
    return output


needs_resource = pytest.mark.skipif(ON_WINDOWS, reason="Windows has no `resource` module and no limit to raise")


@needs_resource
@pytest.mark.parametrize(("soft", "hard", "most", "raised_to"), [
    ("256", "inf", 10240, 10240),  # macOS: an infinite hard limit, and a cap (OPEN_MAX) it does not report
    ("1024", "4096", 4096, 4096),  # Linux: the hard limit is the cap
], ids=["macos", "linux"])
@pytest.mark.gen_test(timeout=60)
async def test_the_server_raises_the_open_file_limit_as_far_as_the_system_allows(
        start_server, tmp_path, soft, hard, most, raised_to):
    """At start the soft limit goes up to the most the system accepts, and no further; the server runs."""
    env, log = limits_env(tmp_path, soft, hard, most)
    process, port = start_server(env)
    await chat_works(port)
    assert log.read_text().split() == [str(raised_to), hard]  # the hard limit stays as it was
    assert "Traceback" not in stop(process)


@needs_resource
@pytest.mark.gen_test(timeout=60)
async def test_the_server_starts_when_the_system_refuses_to_raise_the_open_file_limit(start_server, tmp_path):
    """Every raise refused (ValueError, as macOS gives): the server keeps its 256 files and runs."""
    env, log = limits_env(tmp_path, "256", "inf", most=0)
    process, port = start_server(env)
    await chat_works(port)
    assert log.read_text() == ""
    assert "Traceback" not in stop(process)


# ---- Python 3.9, the oldest supported (macOS's python3) --------------------------------------------


def python_version(executable: str) -> tuple[int, int] | None:
    """The (major, minor) version of a Python interpreter, or None if it does not run."""
    try:
        result = subprocess.run([executable, "-c", "import sys; print(*sys.version_info[:2])"],
                                capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    return tuple(int(part) for part in result.stdout.split()) if result.returncode == 0 else None


def interpreters(version: tuple[int, int]) -> list[str]:
    """The Pythons of this version on this machine: `pythonX.Y` on the PATH, or installed by pyenv."""
    name = "python%d.%d" % version
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = [shutil.which(name)] + sorted(glob.glob(os.path.join(pyenv_root, "versions", "%d.%d.*" % version,
                                                                      "bin", name)))
    return [path for path in candidates if path and python_version(path) == version]


def venv_python(venv: Path) -> Path:
    """The interpreter of a virtual environment."""
    return venv / ("Scripts/python.exe" if ON_WINDOWS else "bin/python")


@pytest.fixture(scope="module")
def python39(request) -> str:
    """A Python 3.9 with requirements.txt installed: this one, or a virtual environment made once and kept.

    The environment lives in pytest's cache (.pytest_cache), made from the first
    Python 3.9 found; making it installs requirements.txt, so it needs the package
    index once. Under CI only the job's own Python exists, and the workflow's
    Python 3.9 jobs run every test on 3.9 anyway.
    """
    if sys.version_info[:2] == OLDEST:
        return sys.executable
    if os.environ.get("CI"):
        pytest.skip("under CI only the job's own Python is installed; the Python 3.9 jobs run every test on 3.9")
    found = interpreters(OLDEST)
    if not found:
        pytest.skip("no Python 3.9 on this machine (python3.9 on the PATH, or `pyenv install 3.9`)")
    requirements = (ROOT / "requirements.txt").read_bytes()
    name = f"python3.9-{hashlib.sha256(requirements).hexdigest()[:12]}"
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider: make it afresh
    venv = cache.mkdir(name) if cache else request.getfixturevalue("tmp_path_factory").mktemp(name)
    ready = venv / "ready"
    if not ready.exists():
        made = subprocess.run([found[0], "-m", "venv", "--clear", str(venv)], capture_output=True, text=True,
                              timeout=300, check=False)
        if made.returncode == 0:
            made = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--quiet",
                                   "--disable-pip-version-check", "-r", str(ROOT / "requirements.txt")],
                                  capture_output=True, text=True, timeout=600, check=False)
        if made.returncode != 0:
            pytest.skip(f"could not install requirements.txt for {found[0]} (offline?): "
                        f"{(made.stderr.strip().splitlines() or ['no message'])[-1]}")
        ready.touch()
    return str(venv_python(venv))


@pytest.mark.parametrize("program", ["chat.py", "client.py"])
def test_chat_py_and_client_py_show_their_help_on_python_3_9(python39, program):
    """`python3.9 chat.py --help` and `python3.9 client.py --help` work: the oldest Python can run both."""
    result = subprocess.run([python39, str(ROOT / program), "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, check=False)
    assert python_version(python39) == OLDEST
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout and not result.stderr


def test_two_users_chat_through_the_server_on_python_3_9(python39, start_server, plain_clients):
    """Server and clients all on Python 3.9: alice's line reaches bob, and her own echo comes back."""
    _, port = start_server(client_env(), python=python39)
    bob = plain_clients("bob", port, client_env(), python=python39)
    alice = subprocess.run([python39, str(ROOT / "client.py"), "alice", "--host=127.0.0.1", f"--port={port}"],
                           input="hello from Python 3.9\n", capture_output=True, text=True,
                           env=client_env(), cwd=ROOT, timeout=60, check=False)
    assert alice.returncode == 0, alice.stderr
    assert re.search(r"#lobby <alice> hello from Python 3\.9$", alice.stdout, re.MULTILINE)
    bob.wait_for_line(r"#lobby <alice> hello from Python 3\.9$")


# ---- older Pythons: one sentence, not a traceback -----------------------------------------------

# Runs a program's source as an older Python would get to run it: sys.version_info
# says 3.8, and every library the program uses is gone, so an import before the
# version check would end in a traceback instead of the sentence.
AS_PYTHON_3_8 = """
import sys
sys.version_info = (3, 8, 18, "final", 0)
for name in ("asyncio", "argparse", "dataclasses", "blessed", "tornado", "wcwidth"):
    sys.modules[name] = None
path = sys.argv[1]
sys.argv = [path, "--help"]
exec(compile(open(path, encoding="utf-8").read(), path, "exec"), {"__name__": "__main__", "__file__": path})
"""


@pytest.mark.parametrize("program", ["chat.py", "client.py"])
def test_an_older_python_gets_one_sentence_and_no_traceback(program):
    """On Python 3.8 each program says in one sentence that it needs 3.9, before importing anything."""
    result = subprocess.run([sys.executable, "-c", AS_PYTHON_3_8, str(ROOT / program)], capture_output=True,
                            text=True, cwd=ROOT, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert re.fullmatch(rf"{re.escape(program)} needs Python 3\.9 or newer; this is Python 3\.8\. [^\n]+\n",
                        result.stderr)


@pytest.mark.parametrize("version", [(3, 8), (3, 7)], ids=["3.8", "3.7"])
@pytest.mark.parametrize("program", ["chat.py", "client.py"])
def test_a_real_older_python_gets_the_sentence(program, version):
    """A real Python 3.8 or 3.7 (if this machine has one) gets the sentence: the files parse there."""
    if os.environ.get("CI"):
        pytest.skip("under CI only the job's own Python is installed")
    found = interpreters(version)
    if not found:
        pytest.skip("no Python %d.%d on this machine" % version)
    result = subprocess.run([found[0], str(ROOT / program), "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{program} needs Python 3.9 or newer; this is Python %d.%d." % version)
    assert "Traceback" not in result.stderr and "Error" not in result.stderr


# ---- the CI workflow ------------------------------------------------------------------------------

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def readme_test_command() -> str:
    """The README's test command (its first section): the shell block that runs pytest."""
    first = (ROOT / "README.md").read_text(encoding="utf-8").split("## A class chatting in five minutes", 1)[1]
    first = first.split("\n## ", 1)[0]
    return next(block for block in re.findall(r"^```sh\n(.*?)\n```", first, re.DOTALL | re.MULTILINE)
                if "pytest" in block)


def supported_pythons() -> list[str]:
    """The Python versions pyproject.toml lists (its classifiers), oldest first."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    versions = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text)
    return sorted(versions, key=lambda version: tuple(map(int, version.split("."))))


def test_pyproject_requires_the_oldest_python_it_lists():
    """requires-python and the classifiers agree that 3.9 is the oldest Python (the one the programs check for)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^requires-python = ">=(3\.\d+)"$', text, re.MULTILINE).group(1) == supported_pythons()[0]
    assert supported_pythons()[0] == "%d.%d" % OLDEST


def test_the_workflow_runs_the_readme_test_command_on_three_systems_with_the_oldest_and_newest_python():
    """ci.yml: ubuntu, macOS and Windows, each with the oldest and the newest Python, run the README's command."""
    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    [job] = workflow["jobs"].values()
    matrix = job["strategy"]["matrix"]
    assert job["runs-on"] == "${{ matrix.os }}"
    assert sorted(matrix["os"]) == ["macos-latest", "ubuntu-latest", "windows-latest"]
    assert matrix["python"] == [supported_pythons()[0], supported_pythons()[-1]]
    setup = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "${{ matrix.python }}"
    # The README's command: make a venv, activate it (the one part that differs on Windows), install, test.
    make_venv, activate, *rest = [part.strip() for part in readme_test_command().split("&&")]
    assert (make_venv, activate) == ("python3 -m venv .venv", ". .venv/bin/activate")
    [script] = [step["run"] for step in job["steps"] if "pytest" in step.get("run", "")]
    lines = script.splitlines()
    assert lines[0] == "python -m venv .venv"
    assert activate in lines[1] and ". .venv/Scripts/activate" in lines[1]
    assert lines[2:] == [" && ".join(rest)]


def test_the_workflow_skips_the_browser_tests_only_where_the_runner_has_no_chromium():
    """CHAT_SKIP_BROWSER_TESTS is set, with its sentence, on the runners other than Linux and empty on Linux."""
    [job] = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))["jobs"].values()
    [step] = [step for step in job["steps"] if "pytest" in step.get("run", "")]
    assert re.fullmatch(r"\$\{\{ runner\.os != 'Linux' && '[^']+' \|\| '' \}\}",
                        step["env"]["CHAT_SKIP_BROWSER_TESTS"])
