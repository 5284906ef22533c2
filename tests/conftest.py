"""Shared test helpers: a real chat server on a free port, and a chat client per user.

pytest-tornado starts `chat.make_app(manager, socket_class)` on a free port for every
test that asks for `http_server` (the `chat_server` fixture does). By default that is
the full server (`python chat.py`); a test module that sets `BOTH_LESSONS = True` runs
each of its tests twice, also against Part I alone (`python chat.py --lesson=1`).
Limits come from `@pytest.mark.limits(...)`, so a test can shrink a limit to make
itself fast:

    @pytest.mark.limits(max_message_length=10)
    @pytest.mark.gen_test
    async def test_something(chat_server):
        alice = await chat_server.join("alice")
        await alice.say("hello")
        assert (await alice.expect("message"))["text"] == "hello"

Every wait has a short timeout, so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import tornado.websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import chat  # importable thanks to the line above

WAIT_SECONDS = 5.0  # generous: waits end as soon as the event arrives


def pytest_configure(config):
    """Register the markers these tests use."""
    config.addinivalue_line("markers", "limits(**fields): chat.CrowdLimits for this test's server")
    config.addinivalue_line("markers", "lesson(n): test only this lesson's server (in a BOTH_LESSONS module)")


def pytest_runtest_setup(item):
    """CHAT_SKIP_BROWSER_TESTS="why" skips the tests that need a browser, saying why.

    The CI workflow sets it on runners without chromium and chromium-driver (macOS,
    Windows); elsewhere under CI a missing browser fails the browser tests instead.
    """
    reason = os.environ.get("CHAT_SKIP_BROWSER_TESTS")
    if reason and "browser" in item.fixturenames:
        pytest.skip(reason)


def pytest_generate_tests(metafunc):
    """Run a module's server tests on both lessons' servers when it says BOTH_LESSONS = True."""
    if "lesson" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_LESSONS", False):
        only = metafunc.definition.get_closest_marker("lesson")
        lessons = [only.args[0]] if only else [1, 2]
        metafunc.parametrize("lesson", lessons, ids=[{1: "part1", 2: "full"}[n] for n in lessons])


class ChatClient:
    """One user's WebSocket connection, as a test sees it: send lines, read events."""

    def __init__(self, ws: tornado.websocket.WebSocketClientConnection, username: str):
        self.ws, self.username = ws, username
        self.welcome: dict | None = None
        self.received: list[dict] = []  # every event read so far, in order
        self.ended = False  # read_message() has said the connection is closed

    async def say(self, line: str) -> None:
        """Send one typed line (chat text or a /command)."""
        await self.ws.write_message(line)

    async def next_event(self, timeout: float = WAIT_SECONDS) -> dict | None:
        """The next event from the server, or None once the connection has closed."""
        if self.ended:
            return None  # reading past the end would only wait
        frame = await asyncio.wait_for(self.ws.read_message(), timeout)
        if frame is None:
            self.ended = True
            return None
        self.received.append(json.loads(frame))
        return self.received[-1]

    async def expect(self, event_type: str, timeout: float = WAIT_SECONDS, **fields) -> dict:
        """Read events until one of `event_type` (with these field values) arrives; fail on close."""
        seen = []
        while True:
            event = await self.next_event(timeout)
            assert event is not None, f"{self.username}: closed while waiting for {event_type}; saw {seen}"
            if event["type"] == event_type and all(event.get(k) == v for k, v in fields.items()):
                return event
            seen.append(event)

    async def events_until(self, event_type: str) -> list[dict]:
        """Every event up to and including the next one of `event_type`."""
        events = []
        while not events or events[-1]["type"] != event_type:
            event = await self.next_event()
            assert event is not None, f"{self.username}: closed while waiting for {event_type}"
            events.append(event)
        return events

    async def sync(self) -> list[dict]:
        """Everything the server sent this user so far (a /rooms round trip marks the end).

        The server handles one callback at a time and each connection's frames
        stay in order, so anything queued for us before our /rooms arrives first.
        """
        await self.say("/rooms")
        return (await self.events_until("rooms"))[:-1]

    async def closed(self, timeout: float = WAIT_SECONDS) -> tuple[int | None, str | None]:
        """Read until the server closes the connection; returns (close code, reason)."""
        while await self.next_event(timeout) is not None:
            pass
        return self.ws.close_code, self.ws.close_reason

    def drop(self) -> None:
        """Vanish without a close frame, as a crashed laptop or a pulled cable would."""
        self.ws.protocol.stream.close()

    def quit(self) -> None:
        """Leave politely, with a close frame."""
        self.ws.close(1000, "bye")


class ChatServer:
    """The server under test: its address, its room manager, and ways to connect."""

    def __init__(self, port: int, manager: chat.RoomManager):
        self.port, self.manager = port, manager

    def url(self, username: str | None = None, token: str | None = None) -> str:
        """The WebSocket URL, with whatever query a test wants."""
        query = urlencode({key: value for key, value in (("username", username), ("token", token))
                           if value is not None})
        return f"ws://127.0.0.1:{self.port}/ws" + (f"?{query}" if query else "")

    async def connect(self, username: str | None, token: str | None = None) -> ChatClient:
        """Open a WebSocket as `username`; nothing is read yet."""
        ws = await tornado.websocket.websocket_connect(self.url(username, token))
        return ChatClient(ws, username or "")

    async def join(self, username: str, token: str | None = None) -> ChatClient:
        """Connect and read the welcome and the lobby's `joined`: the user is in."""
        client = await self.connect(username, token)
        client.welcome = await client.expect("welcome")
        await client.expect("joined")
        return client


@pytest.fixture
def limits(request) -> chat.CrowdLimits:
    """The server's limits: the defaults, changed by a `limits` marker."""
    marker = request.node.get_closest_marker("limits")
    return chat.CrowdLimits(**(marker.kwargs if marker else {}))


@pytest.fixture
def lesson() -> int:
    """Which server to test: 2 is `python chat.py`, 1 is Part I alone (see BOTH_LESSONS)."""
    return 2


@pytest.fixture
def manager(limits, lesson) -> chat.RoomManager:
    """The room manager behind the server under test."""
    return chat.LESSONS[lesson].manager(limits)


@pytest.fixture
def app(manager, lesson):
    """The Tornado application pytest-tornado serves on `http_port`."""
    return chat.web_app(manager, lesson)


@pytest.fixture
def chat_server(http_server, http_port, manager) -> ChatServer:
    """A real chat server listening on a free port for this test."""
    return ChatServer(http_port, manager)


# ---- a server in its own process, for signals and whole-program behaviour ----


# Below the ports Linux (32768+), macOS and Windows (49152+) hand to outgoing connections:
# a port picked here cannot be taken by some client's connect() before our server binds it.
TEST_PORTS = range(20000, 32000)


def free_port() -> int:
    """A TCP port nobody is listening on right now, outside the systems' ephemeral ranges."""
    for port in random.sample(TEST_PORTS, 200):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue  # in use: try another
            return port
    raise AssertionError("no free TCP port found between 20000 and 32000")


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Return once something accepts connections on `port`; fail if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited early: {process.communicate()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listening on port {port} after {timeout} s")


async def wait_until(condition, what: str, timeout: float = WAIT_SECONDS) -> None:
    """Poll `condition()` on the loop until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"after {timeout} s still not: {what}"
        await asyncio.sleep(0.01)


async def assert_graceful_stop(process: subprocess.Popen, port: int, press) -> None:
    """alice and bob are online; `press(process)` gets each the shutdown notice and 1001, and exit status 0."""
    server = ChatServer(port, manager=None)  # in another process: only its address is known here
    alice = await server.join("alice")
    bob = await server.join("bob")
    press(process)
    for client in (alice, bob):
        await client.expect("system", event="shutdown")
        assert (await client.closed())[0] == 1001
    await wait_until(lambda: process.poll() is not None, "the server process exited",
                     timeout=WAIT_SECONDS * 2)
    assert process.returncode == 0
    assert "closed 2 connections" in process.stdout.read()


@pytest.fixture
def chat_process():
    """Start `python chat.py FLAGS...` on a free port; returns (process, port). Killed at the end."""
    processes = []

    def start(*flags: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "chat.py"), f"--port={port}", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, cwd=ROOT)
        processes.append(process)
        wait_for_port(port, process)
        return process, port

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()  # SIGTERM stops the server gracefully, so under coverage it saves its data
        try:
            reap(process, timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            reap(process)


def reap(process: subprocess.Popen, timeout: float | None = None) -> None:
    """Wait for the process to end, reading what is left of its output."""
    if process.stdout is not None and not process.stdout.closed:  # wait_for_port may have read it
        process.communicate(timeout=timeout)
    else:
        process.wait(timeout=timeout)
