"""The README stays true to the code: tour anchors, flags, codes and the test command."""

import ast
import dataclasses
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import chat

README = (ROOT / "README.md").read_text()
CHAT_LINES = (ROOT / "chat.py").read_text().splitlines()
BANNER = re.compile(r"# ---- (\d+)\. (.+?) -+$")
TOUR_LINK = re.compile(r"^\| \[(\d+)\. ([^\]]+)\]\((chat\.py[^)]*)\)", re.M)
CHAT_PY_LINK = re.compile(r"\]\((chat\.py[^)]*)\)")


def banners() -> dict[int, tuple[str, int]]:
    """chat.py's section banners: number -> (title, line number)."""
    found = {}
    for line_number, line in enumerate(CHAT_LINES, start=1):
        match = BANNER.fullmatch(line)
        if match:
            found[int(match.group(1))] = (match.group(2), line_number)
    return found


def test_chat_py_sections_are_numbered_in_order():
    """The banners run 1, 2, 3, ... top to bottom, as the module docstring's map does."""
    numbers = list(banners())
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 8
    for number, (title, _line) in banners().items():
        assert re.search(rf"^ ?{number}\. {re.escape(title.split(':')[0])}", chat.__doc__, re.MULTILINE)


def test_the_tour_names_every_section_of_chat_py_by_its_banner():
    """Each section of chat.py has a row in the README's tour, in order, titled as its banner."""
    linked = [(int(number), title) for number, title, _ in TOUR_LINK.findall(README)]
    assert linked == [(number, title) for number, (title, _) in banners().items()]


def test_links_to_chat_py_carry_no_line_numbers():
    """Links into chat.py resolve to the file and carry no #L anchor, so a student's edit breaks none."""
    targets = CHAT_PY_LINK.findall(README)
    assert targets and set(targets) == {"chat.py"}


def chat_flags() -> list[str]:
    """The flags chat.py defines: one per Limits field, and the others its --help lists."""
    parser_flags = re.findall(r"^  (--[a-z0-9-]+)", subprocess.run(
        [sys.executable, str(ROOT / "chat.py"), "--help"], capture_output=True, text=True, check=True).stdout, re.M)
    assert {f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(chat.CrowdLimits)} <= set(parser_flags)
    return [flag[2:].replace("-", "_") for flag in parser_flags if flag != "--help"]


@pytest.mark.parametrize("flag", chat_flags())
def test_every_flag_is_in_the_readme_table(flag):
    """The flags table lists each of chat.py's flags."""
    assert f"| `--{flag.replace('_', '-')}` |" in README


@pytest.mark.parametrize("name", [name for name in dir(chat) if name.startswith("CLOSE_")])
def test_every_close_code_is_in_the_readme_table(name):
    """The close codes table lists each close code chat.py uses."""
    assert f"| {getattr(chat, name)} |" in README


SOURCE = "\n".join(CHAT_LINES)


@pytest.mark.parametrize("code", sorted(set(re.findall(r'(?:Refusal|error_event)\(\s*"(\w+)"', SOURCE))))
def test_every_error_code_is_in_the_readme(code):
    """Each `error` code the server can send is documented."""
    assert f"`{code}`" in README


def test_ci_runs_the_readme_test_command():
    """`.ci/run` installs what the README's test command installs, then runs its pytest."""
    assert "pip install -r requirements-test.txt && python -m pytest" in README
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -r requirements-test.txt" in ci_script
    assert "\npython -m pytest\n" in ci_script


def test_the_server_command_installs_only_what_the_server_and_client_need():
    """The README's first command installs requirements.txt: no test or notebook tools."""
    assert "pip install -r requirements.txt && python chat.py --port=8888" in README
    server_requirements = (ROOT / "requirements.txt").read_text()
    for tool in ("pytest", "nbclient", "ipykernel", "notebook", "selenium", "hypothesis"):
        assert tool not in server_requirements


def test_every_function_and_class_in_chat_py_has_a_docstring():
    """chat.py reads as a lesson: each function and class says what it is for."""
    tree = ast.parse("\n".join(CHAT_LINES))
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    missing = [f"{node.name} (line {node.lineno})" for node in ast.walk(tree)
               if isinstance(node, kinds) and not ast.get_docstring(node)]
    assert missing == []


def test_no_project_file_cites_a_document_the_repository_does_not_contain():
    """The README is the only spec users have: nothing points them at notes they cannot open."""
    cited = re.compile("|".join(["SPEC" + r"\.md", "seed-" + "spec", "STYLE" + r"\.md", "PERF-" + "NOTES",
                                 "TESTING-" + "NOTES", r"\bthe " + r"spec\b"]), re.IGNORECASE)
    files = [ROOT / "README.md", ROOT / "chat.py", ROOT / "client.py", *sorted((ROOT / "tests").glob("*.py"))]
    files += [path for path in [ROOT / "chat.html", ROOT / "demo.ipynb"] if path.exists()]
    assert [path.name for path in files if cited.search(path.read_text(encoding="utf-8"))] == []


def test_the_first_screen_gets_a_class_chatting():
    """A newcomer's first section: install and start, what to read out, both clients, the test command."""
    first = README.split("\n## ", 2)[1]
    assert first.startswith("A class chatting in five minutes")
    for step in ("pip install -r requirements.txt && python chat.py --port=8888", "Tell the class to open",
                 "python client.py", "in a browser", "Ctrl-C", "pip install -r requirements-test.txt"):
        assert step in first, step
    assert "**Contents:**" in first


def test_the_readme_names_limits_as_welcome_sends_them():
    """welcome.limits uses the flags' names; the old aliases are gone from the code and the README."""
    for old in ("max_message_chars", "idle_timeout_seconds", "resume_grace_seconds"):
        assert old not in README and old not in SOURCE
