"""Terminal client benchmark: client.py in a real pseudo-terminal while its room floods.

Run it:      python tests/bench_client.py               (300 lines/s, then 10 lines/s: about a minute)
             python tests/bench_client.py --rate 146 --seconds 5
             python tests/bench_client.py --plain       (plain line mode instead of the split view)
Not a test:  pytest does not collect it (the name does not match test_*.py). Linux only: it
             reads CPU times from /proc, and the pseudo-terminal needs a Unix.

What it measures
----------------
chat.py runs with its rate limit (and room budget) off. One `python client.py viewer` runs in a
120x40 pseudo-terminal (ptyprocess), and everything it writes is fed to a
terminal emulator (pyte), so "on screen" means what a person would see. Ten
senders (raw WebSocket in a process of their own, reading and discarding what
the server sends them) then flood the lobby at a steady rate, round robin, each
line numbered. While the flood runs, a key is typed every half second (split view). We report:
 - how long after the flood's last line was sent it is on the viewer's screen
   (and when its bytes reached the terminal, to tell the client's lag from
   the emulator's);
 - the client's CPU time over the flood (and until the last line is shown), as
   a share of one core, from /proc/PID/stat;
 - the bytes the client wrote to the terminal per line received;
 - how long a typed key takes to show on the input line.
The targets: at 300 lines/s for 10 s, the last line on screen within 1 s of the
flood's end, client CPU under 25 % of a core and under 600 bytes per line; at
10 lines/s, under 3 %. The machine may be shared, so CPU figures vary between
runs; every load goes to 127.0.0.1 only, is bounded in count and time, and stops
by itself.
"""

from __future__ import annotations  # `float | None` in annotations on Python 3.9

import argparse
import asyncio
import base64
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyte
from ptyprocess import PtyProcess

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ROWS, COLUMNS = 40, 120
SENDERS = 10
KEY_EVERY_SECONDS = 0.5  # a key typed this often during the flood
WAIT_SECONDS = 60.0  # the longest we wait for anything (the last line, a key) before giving up
CLIENT_ENV = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC"}
TARGETS = {300: {"latency": 1.0, "cpu": 25.0, "bytes": 600.0}, 10: {"cpu": 3.0}}


def line_text(number: int, sender: int) -> str:
    """The text of flood line `number`: a typical chat line, numbered so the last one can be found."""
    return f"flood {number:06d} from sender{sender}: a chat line of a typical length, nothing more"


def marker(number: int) -> bytes:
    """What identifies line `number` on the screen and in the terminal's byte stream."""
    return f"flood {number:06d} ".encode()


# ---- the server and the client's CPU ------------------------------------------------


def free_port() -> int:
    """A TCP port nobody is listening on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    """chat.py with its rate limit and room budget off, on port (returns once it accepts connections)."""
    flags = [f"--port={port}", "--rate-per-second=0", "--room-budget=0"]
    server = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    sys.exit(f"bench_client.py: chat.py did not start on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the senders: raw WebSocket, in a process of their own ---------------------------


def handshake(port: int, username: str) -> bytes:
    """A WebSocket opening handshake for username."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws?username={username} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def text_frame(text: str) -> bytes:
    """A masked client text frame (payloads under 64 KiB)."""
    payload, mask = text.encode(), os.urandom(4)
    if len(payload) < 126:
        size = bytes([0x80 | len(payload)])
    else:
        size = bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return b"\x81" + size + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))


async def discard(reader: asyncio.StreamReader) -> None:
    """Read and forget whatever the server sends a sender (so it never counts as a slow reader)."""
    while await reader.read(65536):
        pass


async def flood(port: int, rate: float, seconds: float, go, report) -> None:
    """Connect the senders, say ready, wait for go, then send rate lines a second, round robin."""
    writers, readers = [], []
    for index in range(SENDERS):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(handshake(port, f"sender{index}"))
        await reader.readuntil(b"\r\n\r\n")
        writers.append(writer)
        readers.append(asyncio.create_task(discard(reader)))
    report.put(("ready", time.monotonic()))
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    started = time.monotonic()
    for number in range(int(rate * seconds)):
        delay = started + number / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        writers[number % SENDERS].write(text_frame(line_text(number, number % SENDERS)))
    report.put(("end", time.monotonic()))
    await asyncio.sleep(WAIT_SECONDS)  # keep reading until the benchmark ends this process


def run_senders(port: int, rate: float, seconds: float, go, report) -> None:
    """The senders' process."""
    asyncio.run(flood(port, rate, seconds, go, report))


# ---- the viewer: client.py in a pseudo-terminal, read by a terminal emulator ---------


@dataclass
class Viewer:
    """client.py in a pseudo-terminal; a thread feeds pyte and notes when awaited text shows."""

    proc: PtyProcess
    screen: pyte.Screen
    written: int = 0  # bytes the client wrote to the terminal so far
    awaited: bytes = b""  # the last flood line's marker, once the flood starts
    in_bytes_at: float = 0.0  # when the awaited marker reached the terminal
    on_screen_at: float = 0.0  # when pyte showed it
    keys_typed: int = 0
    key_sent_at: float = 0.0
    key_delays: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls, port: int, plain: bool) -> "Viewer":
        """Start `python client.py viewer` in a ROWS x COLUMNS terminal, and its reader thread."""
        env = {key: value for key, value in os.environ.items() if key not in ("NO_COLOR", "COLUMNS", "LINES")}
        args = [sys.executable, str(ROOT / "client.py"), "viewer", f"--port={port}"]
        proc = PtyProcess.spawn(args + (["--plain"] if plain else []), cwd=str(ROOT),
                                env={**env, **CLIENT_ENV}, dimensions=(ROWS, COLUMNS))
        viewer = cls(proc, pyte.Screen(COLUMNS, ROWS))
        viewer.screen.write_process_input = lambda data: proc.write(data.encode())  # answers blessed
        threading.Thread(target=viewer.read, daemon=True).start()
        return viewer

    def read(self) -> None:
        """The reader thread: feed the emulator, count bytes, time the awaited line and typed keys."""
        stream, tail = pyte.ByteStream(self.screen), b""
        while True:
            try:
                data = self.proc.read(65536)
            except EOFError:
                return
            now = time.monotonic()
            with self.lock:
                self.written += len(data)
                stream.feed(data)
                if self.awaited and not self.in_bytes_at and self.awaited in tail + data:
                    self.in_bytes_at = now
                if self.in_bytes_at and not self.on_screen_at and self.shows(self.awaited.decode()):
                    self.on_screen_at = time.monotonic()
                if self.key_sent_at and self.typed_on_screen() >= self.keys_typed:
                    self.key_delays.append(time.monotonic() - self.key_sent_at)
                    self.key_sent_at = 0.0
            tail = data[-64:]

    def shows(self, text: str) -> bool:
        """Whether text is on the screen (call with the lock held)."""
        return any(text in row for row in self.screen.display)

    def typed_on_screen(self) -> int:
        """How many typed keys (the letter k) the input line shows (call with the lock held)."""
        return self.screen.display[-1].count("k")

    def wait_for(self, text: str) -> None:
        """Wait until text is on the screen."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            with self.lock:
                if self.shows(text):
                    return
            time.sleep(0.02)
        sys.exit(f"bench_client.py: {text!r} never showed on the client's screen")

    def type_key(self) -> None:
        """Type the letter k (not Enter); the reader thread times it until it shows."""
        with self.lock:
            if self.key_sent_at:
                return  # the last one is not on screen yet: that delay is still running
            self.keys_typed += 1
            self.key_sent_at = time.monotonic()
        self.proc.write(b"k")

    def stop(self) -> None:
        """End the client."""
        if self.proc.isalive():
            self.proc.terminate(force=True)
        self.proc.close(force=True)


# ---- one run -------------------------------------------------------------------------


@dataclass
class Result:
    """The figures of one flood."""

    rate: float
    lines: int
    on_screen_after: float  # seconds from the flood's end to the last line on screen
    in_bytes_after: float  # ... to its bytes reaching the terminal
    cpu_percent: float
    bytes_per_line: float
    written: int
    key_delays: list[float]
    server_cpu_percent: float


def measure(rate: float, seconds: float, plain: bool) -> Result:
    """Start a server and a viewer, flood the lobby at rate lines/s for seconds, and measure."""
    port = free_port()
    server = start_server(port)
    viewer = Viewer.start(port, plain)
    context = multiprocessing.get_context("spawn")
    go, report = context.Event(), context.Queue()
    senders = context.Process(target=run_senders, args=(port, rate, seconds, go, report), daemon=True)
    try:
        viewer.wait_for("Connected to")
        senders.start()
        report.get(timeout=WAIT_SECONDS)  # ready
        viewer.wait_for(f"sender{SENDERS - 1} joined")
        time.sleep(1.0)  # let the join notices settle before measuring
        lines = int(rate * seconds)
        with viewer.lock:
            viewer.awaited, written_before = marker(lines - 1), viewer.written
        cpu_before, server_before = cpu_seconds(viewer.proc.pid), cpu_seconds(server.pid)
        started = time.monotonic()
        go.set()
        ended = type_keys_until(viewer, report, typing=not plain)
        deadline = time.monotonic() + WAIT_SECONDS
        while not viewer.on_screen_at and time.monotonic() < deadline:
            time.sleep(0.01)
        if not viewer.on_screen_at:
            sys.exit(f"bench_client.py: the last line was not on screen {WAIT_SECONDS:g} s after the flood")
        finished = max(viewer.on_screen_at, ended)
        cpu = cpu_seconds(viewer.proc.pid) - cpu_before
        server_cpu = cpu_seconds(server.pid) - server_before
        with viewer.lock:
            written = viewer.written - written_before
        return Result(rate, lines, viewer.on_screen_at - ended, viewer.in_bytes_at - ended,
                      100 * cpu / (finished - started), written / lines, written, viewer.key_delays,
                      100 * server_cpu / (finished - started))
    finally:
        if senders.pid is not None:
            senders.kill()
        viewer.stop()
        server.kill()
        server.wait()


def type_keys_until(viewer: Viewer, report, typing: bool) -> float:
    """Type a key every KEY_EVERY_SECONDS until the senders report the flood's end; return that time.

    Plain mode has no input line to watch (the terminal echoes keys between printed lines): no typing.
    """
    while True:
        if typing:
            viewer.type_key()
        try:
            kind, when = report.get(timeout=KEY_EVERY_SECONDS)
        except Exception:  # queue.Empty: the flood goes on
            continue
        if kind == "end":
            return when


# ---- report --------------------------------------------------------------------------


def verdict(value: float, target: float | None) -> str:
    """The target and whether it was met, for one figure."""
    if target is None:
        return ""
    return f"(target < {target:g}: {'met' if value < target else 'MISSED'})"


def print_result(result: Result, seconds: float, plain: bool) -> None:
    """Print one run's figures, with the targets that apply to its rate."""
    targets = TARGETS.get(round(result.rate), {})
    mode = "plain line mode" if plain else "split view"
    lag = verdict(result.on_screen_after, targets.get("latency"))
    cpu = verdict(result.cpu_percent, targets.get("cpu"))
    size = verdict(result.bytes_per_line, targets.get("bytes"))
    print(f"{result.rate:g} lines/s for {seconds:g} s ({result.lines} lines) into #lobby from {SENDERS} "
          f"senders; client.py {mode}, {COLUMNS}x{ROWS}")
    print(f"  last line on screen  {result.on_screen_after:6.2f} s after the flood ended "
          f"(its bytes at the terminal: {result.in_bytes_after:.2f} s) {lag}")
    print(f"  client CPU           {result.cpu_percent:6.1f} % of one core {cpu}")
    print(f"  written to terminal  {result.bytes_per_line:6.0f} bytes per line "
          f"({result.written / 1e6:.2f} MB) {size}")
    keys = sorted(result.key_delays)
    if keys:
        print(f"  a typed key shows in {1000 * keys[len(keys) // 2]:6.0f} ms (median of {len(keys)}), "
              f"{1000 * keys[-1]:.0f} ms at most")
    print(f"  (server CPU {result.server_cpu_percent:.0f} % of one core)")


def main() -> None:
    """Run the floods the command line asks for and print their figures."""
    parser = argparse.ArgumentParser(prog="python tests/bench_client.py",
                                     description=__doc__.split("What it")[0],  # the docstring's top
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, action="append",
                        help="lines per second into the room (repeatable; default: 300, then 10)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each flood lasts (default: 10)")
    parser.add_argument("--plain", action="store_true", help="plain line mode instead of the split view")
    args = parser.parse_args()
    for rate in args.rate or [300.0, 10.0]:
        print_result(measure(rate, args.seconds, args.plain), args.seconds, args.plain)


if __name__ == "__main__":
    main()
