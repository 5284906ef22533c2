"""Helpers for the client's end-to-end tests: a server process, and a client in a pseudo-terminal.

A `Screen` runs `client.py` in a real pseudo-terminal (ptyprocess) and reads what it
draws through a terminal emulator (pyte), so a test can assert what a person would
see. A background thread feeds the emulator; pyte's replies to the terminal queries
blessed makes at start-up go back to the client, as a real terminal's would.

Every wait polls with a short timeout: nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyte
import pytest
import tornado.web
import tornado.websocket
from wcwidth import wcswidth

try:  # pseudo-terminals are a Unix thing: on Windows the tests that need one skip
    import termios

    from ptyprocess import PtyProcess
except ImportError:
    termios = PtyProcess = None
NO_PTY = "needs a pseudo-terminal (ptyprocess and termios), which this system does not have"

ROOT = Path(__file__).resolve().parent.parent
WAIT_SECONDS = 5.0
POLL_SECONDS = 0.02
CLIENT_ENV = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC"}


def wait_for(predicate: Callable[[], object], timeout: float = WAIT_SECONDS,
             what: Callable[[], str] = lambda: "") -> object:
    """Poll until predicate() is truthy and return its value; fail after timeout seconds.

    `what` describes the wait in the failure message; it is called only on failure,
    so it can show the state at that moment (the screen, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() or predicate}")
        time.sleep(POLL_SECONDS)


def client_env(**extra: str) -> dict:
    """The environment a client runs in: a UTF-8 xterm, UTC, no NO_COLOR."""
    env = {key: value for key, value in os.environ.items() if key not in ("NO_COLOR", "COLUMNS", "LINES")}
    return {**env, **CLIENT_ENV, **extra}


class PlainClient:
    """client.py in plain line mode with its stdin open: it prints what arrives until told to stop."""

    def __init__(self, username: str, port: int, env: dict | None = None, python: str = sys.executable,
                 flags: tuple[str, ...] = (), **popen_options):
        """Start the client and wait until it is in the lobby."""
        self.proc = subprocess.Popen([python, str(ROOT / "client.py"), username, f"--port={port}", *flags],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env or client_env(), cwd=ROOT, **popen_options)
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for_line(r"^\* Now in #lobby")

    def _read(self) -> None:
        """Background thread: collect stdout lines."""
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: str) -> str:
        """Wait until a printed line matches the regular expression; return it."""
        def match() -> str | None:
            """The first matching line so far, if any."""
            return next((line for line in list(self.output) if re.search(pattern, line)), None)
        return wait_for(match, timeout=WAIT_SECONDS * 2, what=lambda: f"a line like {pattern!r} in {self.output}")

    def say(self, line: str) -> None:
        """Type one line."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def end_input(self) -> int:
        """Close stdin, as Ctrl-D would; return the exit code."""
        self.proc.stdin.close()
        return self.exit_code()

    def exit_code(self) -> int:
        """Wait for the client to exit; its exit code."""
        return self.proc.wait(timeout=WAIT_SECONDS * 2)


def start_server(port: int, *flags: str) -> subprocess.Popen:
    """Start `python chat.py --port=N FLAGS` and return once it accepts connections."""
    from conftest import wait_for_port  # the shared helper; conftest is importable from tests/

    process = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), f"--port={port}", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    wait_for_port(port, process)
    return process


def stop_server(process: subprocess.Popen) -> None:
    """Kill a server process (if it still runs) and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=WAIT_SECONDS)


class Screen:
    """One client.py in a pseudo-terminal, and the screen a person would see."""

    def __init__(self, *args: str, rows: int = 24, cols: int = 100):
        """Start `python client.py ARGS` in a terminal of rows x cols."""
        if PtyProcess is None:
            pytest.skip(NO_PTY)
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()  # everything the client wrote, for checks pyte cannot make
        self.lock = threading.Lock()
        self.proc = PtyProcess.spawn([sys.executable, str(ROOT / "client.py"), *args],
                                     cwd=str(ROOT), env=client_env(), dimensions=(rows, cols))
        # blessed asks the terminal questions at start-up; pyte's answers must reach it.
        self.screen.write_process_input = lambda data: self.proc.write(data.encode())
        self.hanging_up = threading.Event()  # set by hang_up(): the reader stops, the terminal goes
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        """Background thread: feed everything the client writes to the emulator (until hang_up)."""
        while not self.hanging_up.is_set():
            try:
                if not select.select([self.proc.fd], [], [], POLL_SECONDS)[0]:
                    continue
                data = self.proc.read(65536)
            except (EOFError, OSError, ValueError):  # the client ended, or close() closed the terminal
                return
            with self.lock:
                self.raw += data
                self.stream.feed(data)

    # -- what a person sees --

    def lines(self) -> list[str]:
        """The screen, one string per row."""
        with self.lock:
            return list(self.screen.display)

    def text(self) -> str:
        """The screen as one string."""
        return "\n".join(self.lines())

    def header(self) -> str:
        """The top row."""
        return self.lines()[0]

    def input_line(self) -> str:
        """The bottom row."""
        return self.lines()[-1]

    def shows(self, text: str) -> bool:
        """Whether text appears anywhere on the screen."""
        return text in self.text()

    def wait_for_text(self, text: str, timeout: float = WAIT_SECONDS) -> None:
        """Wait until text appears on the screen."""
        wait_for(lambda: self.shows(text), timeout, lambda: f"{text!r} on screen:\n{self.text()}")

    def cursor_hidden(self) -> bool:
        """Whether the terminal's cursor is hidden."""
        with self.lock:
            return self.screen.cursor.hidden

    # -- what a person does --

    def type(self, text: str) -> None:
        """Type keys (no Enter)."""
        self.proc.write(text.encode())

    def send(self, line: str) -> None:
        """Type a line and press Enter."""
        self.type(line + "\r")

    def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal, as dragging the window corner would."""
        with self.lock:
            self.screen.resize(rows, cols)
        self.proc.setwinsize(rows, cols)

    # -- the end --

    def wait_exit(self, timeout: float = WAIT_SECONDS) -> int:
        """Wait for the client to exit; return its exit status."""
        wait_for(lambda: not self.proc.isalive(), timeout, lambda: f"the client to exit:\n{self.text()}")
        self.reader.join(timeout)
        return self.proc.exitstatus

    def terminal_modes(self) -> list:
        """The pseudo-terminal's termios modes (echo, canonical input ...), as the client left them."""
        return termios.tcgetattr(self.proc.fd)

    def hang_up(self) -> None:
        """Close the terminal, as its window's close button does: the kernel sends the client SIGHUP,
        and the client's writes to the terminal fail from then on."""
        self.hanging_up.set()
        self.reader.join(WAIT_SECONDS)
        self.proc.fileobj.close()

    def close(self) -> None:
        """Stop the client if it still runs."""
        if self.proc.isalive():
            self.proc.terminate(force=True)
        self.hanging_up.set()  # the reader stops before the terminal it reads is closed
        self.reader.join(WAIT_SECONDS)
        self.proc.close(force=True)


def display_width(text: str) -> int:
    """Columns a row of the screen takes (wide characters count two)."""
    return wcswidth(text)


class ScriptedServer:
    """A stand-in chat server in a thread: every login gets the events a test scripts.

    It echoes each line back as a message from the logged-in user, as chat.py does,
    and answers /help with HELP_EVENT (the client asks for it after logging in). Tests use it to send what the
    real server never would (control characters, say), or a refusal the real one
    sends only in a situation that is slow to set up. The first logins get the
    `refusals` (each an error event, then a close with `refusal_close`), one each.
    """

    def __init__(self, events: list[dict], refusals: list[dict] = (), refusal_close: int = 4002):
        """Start listening on a free port, in a thread with its own loop."""
        from conftest import free_port

        self.port, self.events = free_port(), events
        self.refusals, self.refusal_close = list(refusals), refusal_close
        self.logins: list[dict] = []  # each login's query: username, token ...
        self.lines: list[str] = []  # every line the clients sent, in order
        self.started = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self.thread.start()
        assert self.started.wait(WAIT_SECONDS), "the scripted server did not start"

    async def _serve(self) -> None:
        """The server's own loop: listen until stop()."""
        events, scripted = self.events, self

        class Scripted(tornado.websocket.WebSocketHandler):
            """One login: a refusal, or the scripted events and then an echo for every line."""

            def open(self) -> None:
                """Send the refusal or the script."""
                scripted.logins.append({key: self.get_argument(key) for key in self.request.query_arguments})
                if scripted.refusals:
                    self.write_message(json.dumps(scripted.refusals.pop(0)))
                    self.close(scripted.refusal_close)
                    return
                for event in events:
                    self.write_message(json.dumps(event))

            def on_message(self, line: str) -> None:
                """Echo the line, as chat.py would; answer /help."""
                scripted.lines.append(line)
                if line == "/help":
                    self.write_message(json.dumps(HELP_EVENT))
                    return
                echo = {"type": "message", "timestamp": "2026-11-25T19:48:04.123Z", "room": "lobby",
                        "username": events[0]["username"], "text": line}
                self.write_message(json.dumps(echo))

        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        server = tornado.web.Application([(r"/ws", Scripted)]).listen(self.port, "127.0.0.1")
        self.started.set()
        await self.stopping.wait()
        server.stop()

    def stop(self) -> None:
        """Stop listening and end the thread."""
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(WAIT_SECONDS)


# What a hostile server could send: every field carries something that would drive
# a terminal (clear screen, set the title with OSC ... BEL, C1 CSI, bidi override).
HOSTILE = "\x1b[2J\x1b]0;PWNED\x07\x9b31m\u202eevil\x7f"
HOSTILE_EVENTS = [
    {"type": "welcome", "username": "carol" + HOSTILE, "room": "lobby", "rooms": ["lobby", "x" + HOSTILE],
     "token": "t", "limits": {"max_message_length": 500}},
    {"type": "joined", "room": "lobby", "users": ["bob" + HOSTILE, "carol"], "user_count": 2},
    {"type": "message", "timestamp": HOSTILE, "username": "bob" + HOSTILE, "room": "lobby", "text": "hi " + HOSTILE},
    {"type": "system", "timestamp": "2026-11-25T19:48:04Z", "text": "notice " + HOSTILE, "room": "lobby"},
    {"type": "error", "code": "bad" + HOSTILE, "text": "refused " + HOSTILE},
    {"type": "rooms", "rooms": [{"name": "r" + HOSTILE, "users": HOSTILE}]},
]


# The reply to /help of a server whose command table has a command chat.py does not (a student's).
HELP_EVENT = {"type": "help", "commands": [
    {"usage": "/join <room>", "description": "join (or create) a room"},
    {"usage": "/help", "description": "show this list of commands"},
    {"usage": "/topic <text>", "description": "set the room's topic"},
]}


# A plain login as carol, for a scripted server.
CAROL_EVENTS = [
    {"type": "welcome", "username": "carol", "room": "lobby", "rooms": ["lobby"], "token": "t"},
    {"type": "joined", "room": "lobby", "users": ["carol"], "user_count": 1},
]


def held_refusal(retry_after: float) -> dict:
    """The refusal of a name whose session the server holds for resume, as chat.py words it."""
    return {"type": "error", "code": "username_taken", "held": True, "retry_after": retry_after,
            "text": "The username 'carol' is taken: someone with that name is reconnecting. Pick another."}


class Proxy:
    """A TCP relay between a client and the server that a test can make lose data, as a failing link does.

    While `losing` is set, whatever the server sends is thrown away (the server
    believes it delivered it); `cut()` then ends every relayed connection without
    a WebSocket close frame, as a dead Wi-Fi link ends up doing. New connections
    are relayed faithfully again.
    """

    def __init__(self, server_port: int):
        """Listen on a free port of our own, relaying to server_port."""
        self.server_port = server_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.losing = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        """Relay each new connection in two threads, one per direction."""
        while True:
            try:
                client_side, _ = self.listener.accept()
            except OSError:
                return  # the proxy was closed
            server_side = socket.create_connection(("127.0.0.1", self.server_port))
            self.losing.clear()
            self.sockets += [client_side, server_side]
            threading.Thread(target=self._pump, args=(client_side, server_side, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server_side, client_side, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_server: bool) -> None:
        """Copy bytes one way until either side closes; from the server, drop them while losing."""
        try:
            while data := source.recv(65536):
                if not (from_server and self.losing.is_set()):
                    target.sendall(data)
        except OSError:
            pass  # cut() closed the sockets under us

    def cut(self) -> None:
        """End every relayed connection at once, with no close frame either way."""
        sockets, self.sockets = self.sockets, []
        for each in sockets:
            try:
                each.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            each.close()

    def close(self) -> None:
        """Stop relaying."""
        self.cut()
        self.listener.close()
