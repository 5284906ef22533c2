"""The README's "what happens when you send a line" is the path a real line takes.

A real server on a real port, real WebSocket clients: alice sends one line while
Python's profiler records every chat.py function called, until bob and alice have
it. The walk in the README must name exactly those functions, for Part I alone
(`--lesson=1`) and for the shipped server: a new step in the path, or a step the
walk names that no longer runs, fails here.
"""

import re
import sys

import pytest
from conftest import ROOT

import chat

BOTH_LESSONS = True

README = (ROOT / "README.md").read_text()
NAME = re.compile(r"`([A-Za-z_][\w.]*)`")


def walk_section(part: str) -> str:
    """The README's list of steps for one part ("Part I" or "Part II")."""
    walk = README.split("### What happens when you send a line")[1].split("\n## ")[0].split("\n### ")[0]
    part_one, part_two = walk.split("**Part II")
    return part_one if part == "Part I" else part_two


def named_functions(text: str) -> set[str]:
    """The chat.py functions a walk names: `Class.method` or `function` in backticks (not `hello`)."""
    return {name for name in NAME.findall(text) if callable(resolve(name))}


def resolve(name: str):
    """The chat.py object a dotted name stands for, or None."""
    found = chat
    for part in name.split("."):
        found = getattr(found, part, None)
    return found


def expected_path(lesson: int) -> set[str]:
    """Part I's steps; for the shipped server, plus Part II's, less what Part II replaces."""
    part_one = named_functions(walk_section("Part I"))
    if lesson == 1:
        return part_one
    part_two = walk_section("Part II")
    replaced = set(re.findall(r"replaces `([\w.]+)`", part_two))
    return (part_one - replaced) | (named_functions(part_two) - replaced)


@pytest.mark.limits(ping_interval=0)  # no keepalive ping may land in the middle of the recording
@pytest.mark.gen_test
async def test_the_readme_walk_names_every_function_a_chat_line_passes(chat_server, lesson):
    """alice's line, from her frame to bob's and her own echo: exactly the functions the walk names."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.sync()
    await bob.sync()
    called, chat_file = set(), str(ROOT / "chat.py")

    def record(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == chat_file:
            code = frame.f_code
            called.add(getattr(code, "co_qualname", None) or qualified_name(frame))

    sys.setprofile(record)
    try:
        await alice.say("hello")
        await bob.expect("message", text="hello")
        await alice.expect("message", text="hello")
    finally:
        sys.setprofile(None)
    assert called == expected_path(lesson)


def qualified_name(frame) -> str:
    """Class.method for a method's frame, before Python 3.11 gave code objects co_qualname."""
    owner = frame.f_locals.get("self")
    if owner is None:
        return frame.f_code.co_name
    for cls in type(owner).__mro__:
        if frame.f_code.co_name in vars(cls) and getattr(vars(cls)[frame.f_code.co_name], "__code__", None) \
                is frame.f_code:
            return f"{cls.__name__}.{frame.f_code.co_name}"
    return frame.f_code.co_name
