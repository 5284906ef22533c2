"""Capacity benchmark: backpressure in three steps, on loopback.

Three servers, three ways to send one event to every member of a room:
  tornado  plain Tornado: write_message() to every handler, nothing bounded
  part1    chat.py --lesson=1 (Part I): write_message(), and a client whose
           unsent output passes --max-backlog is dropped
  part2    chat.py (Part II): the frame built once per event, the same bytes
           written to every member's socket, within the same bound

Run it:      python tests/bench.py            (the full run: about 5 minutes on 2 cores)
             python tests/bench.py --quick    (small sizes: a smoke run in about 30 seconds)
             python tests/bench.py --only idle --connections 2000 --servers tornado,part2
Not a test:  pytest does not collect it (the name does not match test_*.py).

What it measures
----------------
 1. Fan-out: N receivers and 1 sender in one room. The sender keeps at most W
    messages in flight (it waits until the receivers, on average, are within W
    messages of it) and we count deliveries per second at the receivers.
 2. Latency under a paced load: C clients each send R messages per second to one
    room for S seconds. Every message carries its send time in its text; a sample
    of receivers reads it back. We report p50/p99/max, whether every delivery
    arrived (each client expects every message, its own echo included), how
    many clients the server dropped, and the server's peak memory (VmHWM): a
    server that cannot keep up queues the difference somewhere.
 3. Idle connections: C clients connect and stay quiet. We report handshakes per
    second, the server's memory per connection (RSS after minus RSS before,
    divided by C) and check GET /status (chat.py: all C in `lobby`).
Each workload runs on each server, each run on a fresh server process. The
plain Tornado server is defined below (`--baseline-server` runs it): every
message re-broadcast with write_message to every handler. chat.py runs with
every limit that would throttle the load switched off. Part I and Part II are
printed as ratios to plain Tornado's figures, so they compare across machines.
Fan-out and idle run twice per server, alternating, and the better run counts:
on a shared machine, noise only ever slows a run down. Part I tells the whole
lobby about every arrival (Part II's section 10 stops that), so C idle users
cost it C*C/2 notices: its idle run stops at 1,000 users (PART1_IDLE_LIMIT).

Why it is built this way
------------------------
A Python client that parses every frame costs about as much CPU as the server
that sent it, so such a benchmark measures itself. Here the load side never
parses frames: after the handshake a receiver counts `"type":"message"` in the
raw byte stream (bytes.count, a carried tail for tokens split across reads),
and only the latency sample (every 10th client) runs a regular expression.
Receivers live in worker processes (multiprocessing, one epoll loop each, plain
sockets, recv_into one buffer). Receivers outside the latency sample read every
5-50 ms, so one recv carries several frames. With 2+ CPUs the server is pinned
to the first CPU and the load to the others, and every run prints both sides'
CPU time (from /proc/PID/stat), and other processes' share (from /proc/stat),
so a reader can see which side was the limit and whether the machine was busy.
On loopback some TCP work (ACKs) lands on whichever CPU reads, so how often
receivers read moves a little kernel time between the sides; both servers get
the same treatment. Every load is bounded in count and in time, uses
127.0.0.1 only, and stops by itself.

Sections
--------
 1. Settings           sizes, targets, command line
 2. Baseline server    the plain write_message broadcast server
 3. Wire helpers       handshake request, masked client frames, token counting
 4. Processes          CPU, memory, pinning, open-file limit, server start/stop
 5. Load workers       one epoll loop per process: connect, count, pace
 6. Workloads          fan-out, paced latency, idle connections
 7. Report             ratios, targets, main
"""

import argparse
import heapq
import http.client
import json
import math
import multiprocessing
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parent.parent
CHAT_PY = ROOT / "chat.py"
HOST = "127.0.0.1"

# ---- 1. Settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one benchmark run."""

    fanout_sizes: tuple = (100, 1000)  # receivers per fan-out run
    fanout_warmup_seconds: float = 1.0
    fanout_seconds: float = 8.0  # measured time per fan-out run
    window_messages: int = 64  # fan-out messages in flight (a few KB per receiver)
    paced_clients: int = 200
    paced_rate: float = 2.0  # messages per second per client
    paced_seconds: float = 10.0
    paced_drain_seconds: float = 5.0  # wait this long after the last send for stragglers
    sample_every: int = 10  # every k-th paced client measures latency
    idle_connections: int = 10_000
    connects_in_flight: int = 100  # handshakes under way at once, all workers (listen backlog is 128)
    repeats: int = 2  # fan-out and idle runs per server; the best counts (noise only slows a run down)
    workers: int = 2
    quick: bool = False


QUICK = {"fanout_sizes": (50, 200), "fanout_warmup_seconds": 0.3, "fanout_seconds": 1.0, "paced_clients": 40,
         "paced_seconds": 2.0, "paced_drain_seconds": 2.0, "sample_every": 4, "idle_connections": 500,
         "repeats": 1, "quick": True}

# Part II's targets, as ratios to plain Tornado (or absolute where it says so).
FANOUT_TARGET_RATIO, FANOUT_STRETCH_RATIO = 2.3, 3.5
P99_TARGET_MS = 50.0
MEMORY_TARGET_RATIO = 1.2  # at most, per connection
HANDSHAKE_TARGET_RATIO = 0.8  # at least

# chat.py with every limit that would throttle a benchmark switched off. The
# announce limit keeps its default: rooms over 100 get no join/leave notices.
CHAT_FLAGS = ["--rate-per-second=0", "--max-connections=0", "--room-capacity=0", "--idle-timeout=0",
              "--ping-interval=0", "--resume-grace=0", "--room-budget=0"]


@dataclass(frozen=True)
class ServerKind:
    """One of the three servers: its name (--servers), its column, how it sends."""

    name: str
    column: str
    send_path: str
    chat_flags: tuple = ()  # for chat.py; () for the plain Tornado server


SERVER_KINDS = (  # the three steps, in the order a class meets them
    ServerKind("tornado", "Tornado", "write_message to every handler, unbounded"),
    ServerKind("part1", "Part I", "write_message, bounded by --max-backlog", ("--lesson=1", *CHAT_FLAGS)),
    ServerKind("part2", "Part II", "one frame, the same bytes to every socket", tuple(CHAT_FLAGS)),
)
KINDS = {kind.name: kind for kind in SERVER_KINDS}
PART1_IDLE_LIMIT = 1000  # 1,000 arrivals: 500,000 join notices, about 25 s of server CPU
WORKLOADS = ("fanout", "latency", "idle")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; --help shows the module docstring's method summary."""
    parser = argparse.ArgumentParser(
        prog="python tests/bench.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("Sections")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs: a smoke run")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help="comma-separated workloads to run: fanout, latency, idle (default: all)")
    parser.add_argument("--connections", type=int, help="idle connections C (default 10000; --quick 500)")
    parser.add_argument("--fanout-sizes", help="comma-separated receiver counts (default 100,1000)")
    parser.add_argument("--fanout-seconds", type=float, help="measured seconds per fan-out run (default 8)")
    parser.add_argument("--window", type=int, help="fan-out messages in flight (default 64)")
    parser.add_argument("--paced-clients", type=int, help="clients in the latency run (default 200)")
    parser.add_argument("--paced-seconds", type=float, help="seconds of paced sending (default 10)")
    parser.add_argument("--repeat", type=int, help="fan-out and idle runs per server, best kept (default 2)")
    parser.add_argument("--workers", type=int, help="load worker processes (default: load CPUs, at least 2)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the load to CPUs")
    parser.add_argument("--servers", default=",".join(KINDS),
                        help="comma-separated servers to run: tornado, part1, part2 (default: all; "
                        "ratios need tornado)")
    parser.add_argument("--chat-py", type=Path, default=CHAT_PY,
                        help="the chat server of part1 and part2 (default: chat.py beside tests/; "
                        "or a patched copy)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' log files")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = comma_list(parser, "--only", args.only, WORKLOADS)
    chosen = comma_list(parser, "--servers", args.servers, KINDS)
    args.servers = [kind for kind in SERVER_KINDS if kind.name in chosen]  # always in step order
    return args


def comma_list(parser: argparse.ArgumentParser, flag: str, value: str, choices) -> list[str]:
    """The names in a comma-separated flag value; an unknown name stops with a usage error."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = set(names) - set(choices)
    if unknown:
        parser.error(f"{flag}: unknown name(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(choices)}")
    return names


def settings_from_args(args: argparse.Namespace, load_cpus: int) -> Settings:
    """Defaults, then --quick, then the explicit flags."""
    settings = Settings(workers=max(2, load_cpus))
    if args.quick:
        settings = replace(settings, **QUICK)
    overrides = {
        "idle_connections": args.connections, "fanout_seconds": args.fanout_seconds,
        "window_messages": args.window, "paced_clients": args.paced_clients,
        "paced_seconds": args.paced_seconds, "workers": args.workers, "repeats": args.repeat,
        "fanout_sizes": args.fanout_sizes and tuple(int(n) for n in args.fanout_sizes.split(",")),
    }
    return replace(settings, **{key: value for key, value in overrides.items() if value})


# ---- 2. Baseline server ----------------------------------------------------------------
# The textbook Tornado chat server: a set of handlers, and every message sent to
# every handler with write_message (a frame built and an asyncio task started per
# recipient). Same URL, same event shape as chat.py's `message`, no limits, no log
# line per message, Nagle left on (Tornado's default). Only this mode imports tornado.


def run_baseline_server(port: int) -> None:
    """Serve the baseline on 127.0.0.1:port until SIGTERM or SIGINT."""
    import asyncio
    from datetime import UTC, datetime

    import tornado.web
    import tornado.websocket

    raise_open_file_limit(0)
    clients: set = set()

    class BroadcastSocket(tornado.websocket.WebSocketHandler):
        """One client: joins the set on open, leaves it on close."""

        def check_origin(self, origin: str) -> bool:
            """Any origin."""
            return True

        def open(self) -> None:
            """Remember the client."""
            self.username = self.get_query_argument("username", "")
            clients.add(self)

        def on_message(self, message: str) -> None:
            """Send the message, as a JSON `message` event, to every client (the sender too)."""
            now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            event = {"type": "message", "timestamp": now, "username": self.username, "room": "lobby",
                     "text": message}
            text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            for client in list(clients):
                try:
                    client.write_message(text)
                except tornado.websocket.WebSocketClosedError:
                    pass  # closing meanwhile: on_close removes it

        def on_close(self) -> None:
            """Forget the client."""
            clients.discard(self)

    class StatusHandler(tornado.web.RequestHandler):
        """GET /status: how many clients are connected."""

        def get(self) -> None:
            """Reply with the connection count."""
            self.write({"connections": len(clients)})

    async def serve() -> None:
        """Listen, then wait for a stop signal."""
        app = tornado.web.Application([(r"/ws", BroadcastSocket), (r"/status", StatusHandler)])
        app.listen(port, HOST)
        stop = asyncio.Event()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signal_number, stop.set)
        await stop.wait()

    asyncio.run(serve())


# ---- 3. Wire helpers -------------------------------------------------------------------

MESSAGE_TOKEN = b'"type":"message"'  # one per `message` event, in both servers' JSON
TOKEN_TAIL = len(MESSAGE_TOKEN) - 1  # bytes carried to the next read: a split token still counts once
# Paced messages start with "L<send time> "; the sample of receivers reads that back.
LATENCY_PATTERN = re.compile(rb'"text":"L(\d+\.\d+) ')
LATENCY_TAIL = 48  # longer than any partial match of LATENCY_PATTERN
RECV_BYTES = 64 * 1024  # recv(n) allocates n bytes first: above ~128 KB that is an mmap per call
WEBSOCKET_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key; we do not check the answer


class BenchError(Exception):
    """The benchmark could not run a workload (server refused, died, timed out)."""


def handshake_request(port: int, username: str) -> bytes:
    """The HTTP upgrade request a browser would send for /ws?username=NAME."""
    return (f"GET /ws?username={username} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {WEBSOCKET_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()


def client_frame(text: str) -> bytes:
    """One masked text frame, as a client must send it (RFC 6455, section 5.3)."""
    payload = text.encode()
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, 0x80 | length)
    else:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    key = os.urandom(4)
    keystream = (key * (length // 4 + 1))[:length]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(keystream, "little")
    return header + key + masked.to_bytes(length, "little")


def split_handshake(head: bytes) -> bytes | None:
    """The bytes after a complete `101` response, or None while the response is incomplete."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None
    if not head.startswith(b"HTTP/1.1 101"):
        status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        raise BenchError(f"handshake refused: {status_line}")
    return head[end + 4:]


def open_client(port: int, username: str) -> socket.socket:
    """A blocking client connection, past the handshake (for the sender and warm-ups)."""
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(handshake_request(port, username))
    head = b""
    while split_handshake(head) is None:
        chunk = sock.recv(RECV_BYTES)
        if not chunk:
            raise BenchError(f"{username}: connection closed during the handshake")
        head += chunk
    sock.settimeout(None)  # blocking from now on, so MSG_DONTWAIT reads do not wait
    return sock


def drain(sock: socket.socket) -> None:
    """Read and discard whatever has arrived, without waiting."""
    while True:
        try:
            if not sock.recv(RECV_BYTES, socket.MSG_DONTWAIT):
                raise BenchError("the server closed the sender's connection")
        except BlockingIOError:
            return


# ---- 4. Processes: CPU, memory, pinning, servers ---------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/PID/stat (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process from /proc/PID/status: now (VmRSS) or at its peak (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no {field} for process {pid}")


def raise_open_file_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE to the hard limit (and the hard limit to `needed` if allowed); returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            pass  # not privileged: the hard limit it is
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def plan_cpus(no_pin: bool) -> tuple[set | None, set | None]:
    """The server's CPU and the load's CPUs: first CPU vs the rest, or no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def get_status(port: int) -> dict:
    """GET /status from a server, as JSON (http.client: no proxy settings apply)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", "/status")
        response = connection.getresponse()
        return json.loads(response.read())
    finally:
        connection.close()


class ServerProcess:
    """One server under test, in its own process, its output going to a log file."""

    def __init__(self, kind: ServerKind, cpus: set | None, log_dir: Path, chat_py: Path = CHAT_PY):
        self.kind, self.port = kind.name, free_port()
        if kind.chat_flags:
            command = [sys.executable, str(chat_py), f"--port={self.port}", f"--address={HOST}",
                       *kind.chat_flags]
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "--baseline-server",
                       f"--port={self.port}"]
        self.log_path = log_dir / f"{kind.name}-{self.port}.log"
        # The log goes to a file, never a pipe: a full pipe would stall the server.
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, cwd=ROOT)
        if cpus:
            os.sched_setaffinity(self.process.pid, cpus)
        self.wait_until_ready()

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def wait_until_ready(self, timeout_seconds: float = 15.0) -> None:
        """Poll GET /status until the server answers."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.kind} exited with {self.process.returncode}: {self.log_tail()}")
            try:
                get_status(self.port)
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"{self.kind} did not answer on port {self.port} within {timeout_seconds:g} s")

    def log_tail(self) -> str:
        """The last lines of the server's log, for error messages."""
        return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after 5 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        """Use it in a with-block: the server stops at the end."""
        return self

    def __exit__(self, *exc_info) -> None:
        """Stop the server."""
        self.stop()


# ---- 5. Load workers -------------------------------------------------------------------
# Each worker process runs one epoll loop over plain non-blocking sockets. It
# connects its share of clients (a bounded number of handshakes in flight), then
# reads everything that arrives and counts message tokens. The main process sees
# the counts through shared memory and talks to workers through a pipe:
# worker -> main: ("ready"), then ("done", results) for paced and idle, then ("final").


@dataclass
class WorkerSpec:
    """What one load worker does."""

    index: int
    mode: str  # "fanout": count; "paced": send on a schedule and count; "idle": connect after start, stay
    port: int
    clients: list  # (global index, username) pairs
    cpus: set | None
    connects_in_flight: int
    total_clients: int = 0  # paced: all workers together
    period_seconds: float = 0.0  # paced: time between one client's messages
    messages_per_client: int = 0
    sample_every: int = 0  # paced: clients whose global index is a multiple of this measure latency
    lazy_read_seconds: float = 0.05  # after the start, clients outside the latency sample are read this often
    run_seconds: float = 60.0  # paced and idle: give up this long after the start


@dataclass(eq=False, slots=True)
class Client:
    """One simulated client on a worker: its socket and what it has seen."""

    index: int
    username: str
    sock: socket.socket
    poller: object  # the epoll set it is registered in
    head: bytes | None = b""  # the handshake response so far; None once open
    tail: bytes = b""  # end of the last read, for a token split across reads
    latency_tail: bytes | None = None  # set for the latency sample only
    delivered: int = 0
    sent: int = 0


class LoadWorker:
    """The event loop of one worker process.

    Two epoll sets: `prompt` sockets are read as soon as data arrives (handshakes,
    the latency sample); once the workload starts, all others are `lazy`, read
    every spec.lazy_read_seconds, so that one recv carries many frames and the
    load side stays cheap. Their counts are exact either way.
    """

    def __init__(self, spec: WorkerSpec, pipe, shared: dict):
        self.spec, self.pipe, self.shared = spec, pipe, shared
        self.prompt, self.lazy = select.epoll(), select.epoll()
        self.buffer = bytearray(RECV_BYTES)  # every recv lands here: no allocation per read
        self.next_lazy_read = 0.0
        self.clients: dict[int, Client] = {}  # keyed by file descriptor
        self.pending = deque(spec.clients)
        self.connecting = self.opened = self.lost = self.delivered = self.send_failures = 0
        self.last_open = 0.0
        self.latencies: list[float] = []

    def run(self) -> None:
        """Connect (except idle), report ready, wait for the start, do the mode's work, wait for stop."""
        if self.spec.mode != "idle":
            self.connect_all(time.monotonic() + 60)
        self.pipe.send(("ready", {}))
        while not self.shared["start_at"].value or time.monotonic() < self.shared["start_at"].value:
            self.poll(self.prompt, 0.005)
        started = self.shared["start_at"].value
        if self.spec.mode == "idle":
            self.connect_all(started + self.spec.run_seconds)
            self.pipe.send(("done", {"opened": self.opened, "finished": self.last_open}))
        else:
            self.make_lazy()
        if self.spec.mode == "paced":
            self.pipe.send(("done", self.run_paced(started)))
        while not self.shared["stop"].value:
            self.tick(0.05)
        self.pipe.send(("final", {"delivered": self.delivered, "lost": self.lost}))

    # -- connecting --

    def connect_all(self, deadline: float) -> None:
        """Open every client of this worker, a bounded number of handshakes at a time."""
        while self.opened < len(self.spec.clients):
            while self.pending and self.connecting < self.spec.connects_in_flight:
                self.open_client(*self.pending.popleft())
            self.poll(self.prompt, 0.05)
            if time.monotonic() > deadline:
                raise BenchError(f"only {self.opened} of {len(self.spec.clients)} clients connected in time")

    def open_client(self, index: int, username: str) -> None:
        """Connect one socket (instant on loopback) and send its upgrade request."""
        sock = socket.create_connection((HOST, self.spec.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.send(handshake_request(self.spec.port, username))
        client = Client(index, username, sock, self.prompt)
        if self.spec.sample_every and index % self.spec.sample_every == 0:
            client.latency_tail = b""
        self.clients[sock.fileno()] = client
        self.prompt.register(sock.fileno(), select.EPOLLIN)
        self.connecting += 1

    def make_lazy(self) -> None:
        """Move every client outside the latency sample to the lazy set."""
        for fd, client in self.clients.items():
            if client.latency_tail is None:
                self.prompt.unregister(fd)
                self.lazy.register(fd, select.EPOLLIN)
                client.poller = self.lazy

    # -- reading --

    def tick(self, timeout: float) -> None:
        """Read the lazy set if due, then wait on the prompt set until `timeout` or the next lazy read."""
        now = time.monotonic()
        if now >= self.next_lazy_read:
            self.next_lazy_read = now + self.spec.lazy_read_seconds
            self.poll(self.lazy, 0)
        self.poll(self.prompt, max(0.0, min(timeout, self.next_lazy_read - time.monotonic())))

    def poll(self, poller, timeout: float) -> None:
        """Wait up to `timeout` for input, read every ready socket once, publish the count."""
        for fd, _ in poller.poll(timeout):
            client = self.clients.get(fd)
            if client is not None:
                self.read(client)
        self.shared["counts"][self.spec.index] = self.delivered

    def read(self, client: Client) -> None:
        """One recv: finish the handshake, then count (and maybe time) message events."""
        try:
            size = client.sock.recv_into(self.buffer)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if not size:
            self.forget(client)
        elif client.head is None and client.latency_tail is None and size >= TOKEN_TAIL:
            self.count_in_buffer(client, size)  # the common case, without copying the data
        else:
            self.count(client, bytes(self.buffer[:size]))

    def count_in_buffer(self, client: Client, size: int) -> None:
        """Count message tokens in self.buffer[:size], and in the seam with the previous read."""
        buffer = self.buffer
        seam = client.tail + buffer[:TOKEN_TAIL]  # holds only tokens split across the two reads
        found = seam.count(MESSAGE_TOKEN) + buffer.count(MESSAGE_TOKEN, 0, size)
        client.tail = bytes(buffer[size - TOKEN_TAIL:size])
        client.delivered += found
        self.delivered += found

    def count(self, client: Client, data: bytes) -> None:
        """Finish a handshake if under way, count message tokens; the latency sample also reads send times."""
        if client.head is not None:
            rest = split_handshake(client.head + data)
            if rest is None:
                client.head += data
                return
            client.head, data = None, rest
            self.connecting -= 1
            self.opened += 1
            self.last_open = time.monotonic()
        chunk = client.tail + data
        found = chunk.count(MESSAGE_TOKEN)
        client.tail = chunk[-TOKEN_TAIL:]
        client.delivered += found
        self.delivered += found
        if client.latency_tail is not None:
            now = time.monotonic()
            chunk = client.latency_tail + data
            end = 0
            for match in LATENCY_PATTERN.finditer(chunk):
                self.latencies.append(now - float(match.group(1)))
                end = match.end()
            client.latency_tail = chunk[max(end, len(chunk) - LATENCY_TAIL):]

    def forget(self, client: Client) -> None:
        """The server closed a connection: drop it and count it as lost."""
        if client.head is not None:
            raise BenchError(f"{client.username}: closed during the handshake")
        client.poller.unregister(client.sock.fileno())
        del self.clients[client.sock.fileno()]
        client.sock.close()
        self.lost += 1

    # -- paced sending --

    def run_paced(self, started: float) -> dict:
        """Each client sends on its own schedule, evenly spread; stop when all arrived or time is up."""
        spec = self.spec
        schedule = [(started + spec.period_seconds * client.index / spec.total_clients, client.index, client)
                    for client in self.clients.values()]
        heapq.heapify(schedule)
        expected = len(self.clients) * spec.total_clients * spec.messages_per_client
        deadline = started + spec.run_seconds
        while (schedule or self.delivered < expected) and time.monotonic() < deadline:
            now = time.monotonic()
            while schedule and schedule[0][0] <= now:
                due, index, client = heapq.heappop(schedule)
                line = f"L{time.monotonic():.6f} paced message {client.sent} from {client.username}"
                self.send_line(client, line)
                if client.sent < spec.messages_per_client:
                    heapq.heappush(schedule, (due + spec.period_seconds, index, client))
            self.tick(schedule[0][0] - time.monotonic() if schedule else 0.05)
        return {"delivered": self.delivered, "expected": expected, "latencies": self.latencies,
                "send_failures": self.send_failures, "lost": self.lost}

    def send_line(self, client: Client, line: str) -> None:
        """Send one chat line now; a full socket buffer counts as a failed send."""
        client.sent += 1
        frame = client_frame(line)
        try:
            if client.sock.send(frame) != len(frame):
                raise BenchError(f"{client.username}: partial send")  # would corrupt the stream
        except (BlockingIOError, ConnectionError):
            self.send_failures += 1


def worker_main(spec: WorkerSpec, pipe, shared: dict) -> None:
    """Entry point of a worker process: pin it, run it, report any failure."""
    try:
        if spec.cpus:
            os.sched_setaffinity(0, spec.cpus)
        LoadWorker(spec, pipe, shared).run()
    except BaseException as error:  # noqa: BLE001 - the main process must hear about every failure
        pipe.send(("error", f"worker {spec.index}: {error}"))


class LoadPool:
    """The worker processes of one workload, and their shared counters."""

    def __init__(self, settings: Settings, mode: str, port: int, usernames: list[str], cpus: set | None,
                 **extra):
        context = multiprocessing.get_context("fork")  # fast, and nothing is threaded here
        count = max(1, min(settings.workers, len(usernames)))
        self.shared = {"counts": context.Array("q", count, lock=False),  # message events counted, per worker
                       "start_at": context.Value("d", 0.0, lock=False),  # time.monotonic() to begin at
                       "stop": context.Value("i", 0, lock=False)}
        self.pipes, self.processes = [], []
        for index in range(count):
            clients = [(i, name) for i, name in enumerate(usernames) if i % count == index]  # interleaved
            spec = WorkerSpec(index, mode, port, clients, cpus, max(1, settings.connects_in_flight // count),
                              total_clients=len(usernames), **extra)
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=worker_main, args=(spec, writer, self.shared), daemon=True)
            process.start()
            writer.close()
            self.pipes.append(reader)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [process.pid for process in self.processes]

    def collect(self, kind: str, timeout_seconds: float) -> list[dict]:
        """One `kind` report from every worker; a worker's error becomes a BenchError."""
        deadline = time.monotonic() + timeout_seconds
        reports = []
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"a load worker sent no '{kind}' within {timeout_seconds:g} s")
            what, report = pipe.recv()
            if what == "error":
                raise BenchError(report)
            if what != kind:
                raise BenchError(f"a load worker sent '{what}', expected '{kind}'")
            reports.append(report)
        return reports

    def start(self, delay_seconds: float = 0.05) -> float:
        """Tell the workers to begin at one shared moment (time.monotonic is system-wide); returns it."""
        started = time.monotonic() + delay_seconds
        self.shared["start_at"].value = started
        return started

    def delivered(self) -> int:
        """Message events counted by all workers so far."""
        return sum(self.shared["counts"])

    def finish(self) -> list[dict]:
        """Tell the workers to stop; returns their final reports."""
        self.shared["stop"].value = 1
        return self.collect("final", 10)

    def __enter__(self) -> Self:
        """Use it in a with-block: the workers stop at the end."""
        return self

    def __exit__(self, *exc_info) -> None:
        """Stop the workers (if not yet); their sockets close as they exit."""
        self.shared["stop"].value = 1
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()


# ---- 6. Workloads ----------------------------------------------------------------------


@dataclass
class Usage:
    """CPU seconds used over some wall time: the server, the load side (workers + this process), the rest."""

    wall: float
    server_cpu: float
    load_cpu: float
    other_cpu: float  # everything else running on the machine meanwhile

    def describe(self) -> str:
        """E.g. 'server CPU 99%, load CPU 41%: server-bound'."""
        server, load, other = (cpu / self.wall for cpu in (self.server_cpu, self.load_cpu, self.other_cpu))
        verdict = ("server-bound" if server >= SATURATED else "load-bound" if load >= SATURATED
                   else "neither side saturated")
        busy = f"; other processes {other:.0%} (noisy)" if other >= BUSY_ELSEWHERE else ""
        return f"server CPU {server:.0%}, load CPU {load:.0%}: {verdict}{busy}"


SATURATED = 0.9  # a side using this share of a CPU is the limit
BUSY_ELSEWHERE = 0.10  # other processes using this share of a CPU make a measurement noisy


def machine_cpu_seconds() -> float:
    """CPU time all CPUs have spent busy (not idle, not waiting for I/O), from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS  # minus idle and iowait


class Meter:
    """Snapshots of wall time and CPU, for a Usage over an interval."""

    def __init__(self, server: ServerProcess, pool: LoadPool):
        self.server_pid, self.load_pids = server.pid, [os.getpid(), *pool.pids]
        self.mark()

    def reading(self) -> tuple[float, float, float, float]:
        """(now, server CPU, load CPU, all CPU)."""
        return (time.monotonic(), cpu_seconds(self.server_pid), sum(map(cpu_seconds, self.load_pids)),
                machine_cpu_seconds())

    def mark(self) -> None:
        """Start the interval now."""
        self.start = self.reading()

    def usage(self) -> Usage:
        """CPU used since the mark."""
        wall, server, load, machine = (b - a for a, b in zip(self.start, self.reading()))
        return Usage(wall, server, load, max(0.0, machine - server - load))


@dataclass
class Result:
    """One workload on one server: the figures, how the CPU was used, problems seen."""

    figures: dict
    usage: Usage | None = None
    problems: list = field(default_factory=list)


def progress(label: str) -> None:
    """Start a progress line; the workload finishes it."""
    print(f"  {label} ... ", end="", flush=True)


def run_fanout(settings: Settings, server: ServerProcess, receivers: int, cpus: set | None) -> Result:
    """N receivers, one sender keeping at most W messages in flight: deliveries per second."""
    names = [f"r{i}" for i in range(receivers)]
    # Receivers read every 100 us per receiver (5-50 ms), so one recv carries several frames.
    lazy_read = min(max(receivers * 100e-6, 0.005), 0.05)
    with LoadPool(settings, "fanout", server.port, names, cpus, lazy_read_seconds=lazy_read) as pool:
        pool.collect("ready", 60)
        sender = open_client(server.port, "sender")
        meter = Meter(server, pool)
        pool.start(0)
        sent = send_windowed(settings, sender, pool, receivers, settings.fanout_warmup_seconds, 0)
        meter.mark()
        delivered_before = pool.delivered()
        sent = send_windowed(settings, sender, pool, receivers, settings.fanout_seconds, sent)
        usage = meter.usage()
        rate = (pool.delivered() - delivered_before) / usage.wall
        sender.close()
        lost = sum(report["lost"] for report in pool.finish())
    result = Result({"rate": rate, "rate_per_cpu": rate * usage.wall / max(usage.server_cpu, 1e-9),
                     "messages": sent}, usage)
    if lost:
        result.problems.append(f"{lost} receivers closed by the server")
    print(f"{rate:,.0f} deliveries/s ({result.figures['rate_per_cpu']:,.0f} per server CPU-second; "
          f"{usage.describe()})" + "".join(f"; {p}" for p in result.problems), flush=True)
    return result


def send_windowed(settings: Settings, sender: socket.socket, pool: LoadPool, receivers: int,
                  seconds: float, sent: int) -> int:
    """Send for `seconds`, while the receivers are on average within W messages; returns the total sent."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        allowed = pool.delivered() // receivers + settings.window_messages
        if sent < allowed:
            lines = (f"fan-out message {number:07d} abcdefghijklmnopqrstuvwxyz"
                     for number in range(sent, allowed))
            sender.sendall(b"".join(map(client_frame, lines)))
            sent = allowed
        else:
            time.sleep(0.001)
        drain(sender)  # the sender's echoes, so the server never sees it as a slow reader
    return sent


def run_latency(settings: Settings, server: ServerProcess, cpus: set | None) -> Result:
    """C clients each sending R messages/s for S seconds: delivered count and latency percentiles."""
    clients, rate = settings.paced_clients, settings.paced_rate
    per_client = round(settings.paced_seconds * rate)
    names = [f"p{i}" for i in range(clients)]
    run_seconds = settings.paced_seconds + settings.paced_drain_seconds
    with LoadPool(settings, "paced", server.port, names, cpus, period_seconds=1 / rate,
                  messages_per_client=per_client, sample_every=settings.sample_every,
                  run_seconds=run_seconds, lazy_read_seconds=0.025) as pool:
        pool.collect("ready", 60)
        meter = Meter(server, pool)
        pool.start(0.2)
        reports = pool.collect("done", run_seconds + 30)
        usage = meter.usage()
        peak = rss_bytes(server.pid, "VmHWM")  # a fresh server process: its peak is this run's
    delivered = sum(report["delivered"] for report in reports)
    expected = sum(report["expected"] for report in reports)
    latencies = sorted(latency for report in reports for latency in report["latencies"])
    figures = {"delivered": delivered, "expected": expected, "samples": len(latencies),
               "p50": percentile(latencies, 0.5) * 1000, "p99": percentile(latencies, 0.99) * 1000,
               "max": percentile(latencies, 1.0) * 1000, "peak_memory": peak}
    result = Result(figures, usage)
    lost = sum(report["lost"] for report in reports)
    failures = sum(report["send_failures"] for report in reports)
    figures["dropped"] = lost
    if lost or failures:
        result.problems.append(f"{lost} connections closed by the server, {failures} sends failed")
    print(f"delivered {delivered:,}/{expected:,}; latency p50 {figures['p50']:.1f} ms, "
          f"p99 {figures['p99']:.1f} ms, max {figures['max']:.1f} ms, server peak memory "
          f"{peak / 2**20:,.0f} MB ({len(latencies):,} samples; "
          f"{usage.describe()})"
          + "".join(f"; {p}" for p in result.problems), flush=True)
    return result


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted list (nan if empty)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def run_idle(settings: Settings, server: ServerProcess, cpus: set | None) -> Result:
    """C quiet clients: handshakes per second, memory per connection, and /status agrees."""
    count = min(settings.idle_connections, PART1_IDLE_LIMIT) if server.kind == "part1" else \
        settings.idle_connections
    for index in range(20):  # warm-up: the first connections load code the rest reuse
        open_client(server.port, f"warm{index}").close()
    time.sleep(0.3)
    rss_before = rss_bytes(server.pid)
    names = [f"idle{i}" for i in range(count)]
    with LoadPool(settings, "idle", server.port, names, cpus, run_seconds=120) as pool:
        pool.collect("ready", 30)
        meter = Meter(server, pool)
        started = pool.start(0.05)
        reports = pool.collect("done", 150)
        usage = meter.usage()
        elapsed = max(report["finished"] for report in reports) - started
        time.sleep(0.5)  # let the last welcome frames go out
        rss_after = rss_bytes(server.pid)
        status = get_status(server.port)
    in_lobby = next((room["users"] for room in status.get("rooms", []) if room["name"] == "lobby"), None)
    figures = {"count": count, "handshakes": count / elapsed,
               "handshakes_per_cpu": count / max(usage.server_cpu, 1e-9),
               "memory": (rss_after - rss_before) / count,
               "connections": status["connections"], "in_lobby": in_lobby}
    result = Result(figures, replace(usage, wall=elapsed))
    lobby = f", {in_lobby:,} in lobby" if in_lobby is not None else ""
    print(f"{figures['handshakes']:,.0f} handshakes/s ({figures['handshakes_per_cpu']:,.0f} per server "
          f"CPU-second), {figures['memory'] / 1024:.1f} KB per connection "
          f"(/status: {status['connections']:,} connections{lobby}; {result.usage.describe()})", flush=True)
    return result


# ---- 7. Report, targets, main ----------------------------------------------------------


def ratio(ours: Result | None, theirs: Result | None, name: str) -> float:
    """ours / theirs for one figure; nan without both, or when they ran at different sizes."""
    if not ours or not theirs or not theirs.figures[name]:
        return math.nan
    if ours.figures.get("count") != theirs.figures.get("count"):
        return math.nan  # Part I's capped idle run
    return ours.figures[name] / theirs.figures[name]


def shown(result: Result | None, name: str, spec: str, scale: int = 1) -> str:
    """One figure of a result, formatted for the table; "-" when the run is missing."""
    if not result:
        return "-"
    value = result.figures[name]
    return format(value / scale if scale != 1 else value, spec)


class Report:
    """The results table (a column per server, then ratios to plain Tornado) and the targets."""

    def __init__(self, results: dict[str, dict[str, Result]], kinds: list[ServerKind]):
        self.results, self.kinds = results, kinds
        # Ratios are to plain Tornado, so they need it in the run.
        self.compared = [kind for kind in kinds if kind.name != "tornado"] if "tornado" in results else []
        self.targets: list[tuple[bool, str]] = []

    def get(self, kind: str, key: str) -> Result | None:
        """The best run of one workload on one server, if it ran."""
        return self.results.get(kind, {}).get(key)

    def header(self) -> None:
        """The column headings."""
        self.row("", [kind.column for kind in self.kinds], [f"{kind.column}/T" for kind in self.compared])

    def row(self, label: str, cells: list[str], ratios: list = ()) -> None:
        """One table line: a cell per server, then the ratios."""
        times = [ratio if isinstance(ratio, str) else "" if math.isnan(ratio) else f"{ratio:.2f}x"
                 for ratio in ratios]
        print(f"  {label:42}" + "".join(f"{cell:>17}" for cell in cells) + "".join(f"{t:>11}" for t in times))

    def figure(self, label: str, key: str, name: str, spec: str, scale: int = 1) -> dict[str, float]:
        """A table line for one figure on every server, with ratios; returns the ratios by server."""
        baseline = self.get("tornado", key)
        ratios = {kind.name: ratio(self.get(kind.name, key), baseline, name) for kind in self.compared}
        self.row(label, [shown(self.get(kind.name, key), name, spec, scale) for kind in self.kinds],
                 list(ratios.values()))
        return ratios

    def plain(self, label: str, key: str, cell: Callable[[Result], str]) -> None:
        """A table line without ratios (figures where one server may be overloaded and another not)."""
        results = [self.get(kind.name, key) for kind in self.kinds]
        self.row(label, [cell(result) if result else "-" for result in results])

    def target(self, ok: bool, text: str) -> None:
        """Remember a target and whether it was met."""
        self.targets.append((ok, text))


def report_fanout(report: Report, receivers: int) -> None:
    """Fan-out rows, and Part II's target against plain Tornado."""
    key = f"fanout{receivers}"
    times = report.figure(f"fan-out N={receivers}: deliveries/s", key, "rate", ",.0f").get("part2", math.nan)
    per_cpu = report.figure("  per server CPU-second", key, "rate_per_cpu", ",.0f").get("part2", math.nan)
    if not math.isnan(times):
        stretch = f"; stretch {FANOUT_STRETCH_RATIO}x met too" if times >= FANOUT_STRETCH_RATIO else ""
        report.target(times >= FANOUT_TARGET_RATIO, f"fan-out N={receivers}: Part II {times:.2f}x Tornado >= "
                      f"{FANOUT_TARGET_RATIO}x (per server CPU-second: {per_cpu:.2f}x){stretch}")


def report_latency(report: Report, settings: Settings) -> None:
    """Paced-load rows, and Part II's everything-delivered, p99 target."""
    report.plain(f"paced {settings.paced_clients} x {settings.paced_rate:g} msg/s: delivered", "latency",
                 lambda result: f"{result.figures['delivered']:,}/{result.figures['expected']:,}")
    report.plain("  clients dropped by the server", "latency",
                 lambda result: f"{result.figures['dropped']:,}")
    for name in ("p50", "p99", "max"):
        report.plain(f"  latency {name}, ms", "latency", lambda result: f"{result.figures[name]:,.1f}")
    report.plain("  server memory at its peak, MB", "latency",
                 lambda result: f"{result.figures['peak_memory'] / 2**20:,.0f}")
    ours = report.get("part2", "latency")
    if ours:
        figures = ours.figures
        everything = figures["delivered"] == figures["expected"] and not ours.problems
        report.target(everything and figures["p99"] < P99_TARGET_MS,
                      f"paced load: Part II delivered {figures['delivered']:,} of {figures['expected']:,}, "
                      f"p99 {figures['p99']:.1f} ms < {P99_TARGET_MS:g} ms")


def report_idle(report: Report, count: int) -> None:
    """Idle-connection rows, and Part II's memory, handshake and lobby targets."""
    report.plain("idle: connections C", "idle", lambda result: f"{result.figures['count']:,}")
    handshakes = report.figure("  handshakes/s", "idle", "handshakes", ",.0f").get("part2", math.nan)
    report.figure("  per server CPU-second", "idle", "handshakes_per_cpu", ",.0f")
    memory = report.figure("  memory per connection, KB", "idle", "memory", ".1f", 1024)
    memory = memory.get("part2", math.nan)
    report.plain("  in lobby (GET /status)", "idle",
                 lambda result: "-" if result.figures["in_lobby"] is None else
                 f"{result.figures['in_lobby']:,}")
    if not math.isnan(memory):
        report.target(memory <= MEMORY_TARGET_RATIO,
                      f"idle: Part II memory per connection {memory:.2f}x Tornado <= {MEMORY_TARGET_RATIO}x")
        report.target(handshakes >= HANDSHAKE_TARGET_RATIO,
                      f"idle: Part II handshakes/s {handshakes:.2f}x Tornado >= {HANDSHAKE_TARGET_RATIO}x")
    for kind in ("part1", "part2"):
        result = report.get(kind, "idle")
        if result:
            in_lobby, expected = result.figures["in_lobby"] or 0, result.figures["count"]
            report.target(in_lobby == expected == result.figures["connections"],
                          f"idle: {KINDS[kind].column}: {in_lobby:,} of {expected:,} in lobby")


def print_report(settings: Settings, results: dict, kinds: list[ServerKind], only: list[str],
                 noisy: list[str]) -> list[bool]:
    """Print the results table and the targets; returns one bool per target checked."""
    report = Report(results, kinds)
    best = f" (fan-out, idle: best of {settings.repeats} runs)" if settings.repeats > 1 else ""
    print(f"\n== Results: backpressure in three steps =={best}")
    for kind in kinds:
        print(f"  {kind.column:8} {kind.send_path}")
    print()
    report.header()
    if "fanout" in only:
        for receivers in settings.fanout_sizes:
            report_fanout(report, receivers)
    if "latency" in only:
        report_latency(report, settings)
    if "idle" in only:
        report_idle(report, settings.idle_connections)
        if report.get("part1", "idle") and settings.idle_connections > PART1_IDLE_LIMIT:
            count = settings.idle_connections
            print(f"  (Part I's idle run stops at {PART1_IDLE_LIMIT:,}: it tells the lobby about every "
                  f"arrival, {count * count // 2:,} notices for {count:,})")
    quick = " (quick run: sizes below the targets': indicative only)" if settings.quick else ""
    print(f"\n== Targets: Part II against plain Tornado =={quick}")
    for ok, text in report.targets:
        print(f"  [{'MET' if ok else 'MISSED'}] {text}")
    if not report.targets:
        print("  (none checked: a server or a workload was skipped)")
    if noisy:
        print(f"  note: other processes used the CPUs during {len(noisy)} of the runs ({', '.join(noisy)}): "
              "those figures are noisy; per-CPU-second figures are steadier")
    return [ok for ok, _ in report.targets]


@dataclass
class Job:
    """One workload: how to run it on a server, how often, and which figure picks the best run."""

    key: str
    label: str
    run: Callable[[ServerProcess], Result]
    repeats: int = 1
    best_by: str = ""  # a figure where more is better; "" for a single run


def plan_jobs(settings: Settings, only: list[str], load_cpus: set | None) -> list[Job]:
    """The workloads to run, in order."""
    jobs = []
    if "fanout" in only:
        for receivers in settings.fanout_sizes:
            jobs.append(Job(f"fanout{receivers}", f"fan-out N={receivers}, window {settings.window_messages}",
                            lambda server, n=receivers: run_fanout(settings, server, n, load_cpus),
                            settings.repeats, "rate"))
    if "latency" in only:
        label = (f"latency {settings.paced_clients} x {settings.paced_rate:g} msg/s "
                 f"for {settings.paced_seconds:g} s")
        jobs.append(Job("latency", label, lambda server: run_latency(settings, server, load_cpus)))
    if "idle" in only:
        jobs.append(Job("idle", f"idle C={settings.idle_connections:,}",
                        lambda server: run_idle(settings, server, load_cpus), settings.repeats, "handshakes"))
    return jobs


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was (Unix)."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def print_setup(settings: Settings, args: argparse.Namespace, server_cpus: set | None,
                load_cpus: set | None) -> None:
    """The header: machine, pinning, the servers' command lines, the load's shape."""
    print(f"chat.py benchmark on {HOST}: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {load_average()}, {time.strftime('%Y-%m-%d %H:%M')}")
    if server_cpus:
        print(f"pinned: servers on CPU {','.join(map(str, sorted(server_cpus)))}, load (workers + sender) "
              f"on CPU {','.join(map(str, sorted(load_cpus)))}")
    else:
        print("not pinned: servers and load share the CPUs (the CPU figures still tell them apart)")
    for kind in args.servers:
        command = f"{args.chat_py.name} {' '.join(kind.chat_flags)}" if kind.chat_flags else \
            "tests/bench.py --baseline-server"
        print(f"{kind.name:8} {command}")
    print(f"load: {settings.workers} worker processes counting message tokens in raw bytes; "
          f"latency from every {settings.sample_every}th client")


def run_all(args: argparse.Namespace) -> int:
    """Run the chosen workloads on every chosen server, print progress, the table and the targets."""
    server_cpus, load_cpus = plan_cpus(args.no_pin)
    settings = settings_from_args(args, len(load_cpus or ()) or 1)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # this process (the sender) is load too
    limit = raise_open_file_limit(settings.idle_connections + 1000)
    if settings.idle_connections + 100 > limit:
        settings = replace(settings, idle_connections=limit - 100)
        print(f"note: open-file limit {limit}: idle connections lowered to {settings.idle_connections}")
    print_setup(settings, args, server_cpus, load_cpus)
    log_dir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    results: dict = {kind.name: {} for kind in args.servers}  # the best run of each job, per server
    noisy: list[str] = []
    failed = False
    began = time.monotonic()
    for job in plan_jobs(settings, args.only, load_cpus):
        for attempt in range(job.repeats):
            for kind in args.servers:  # alternating, each run on a fresh server process
                run = f" {attempt + 1}/{job.repeats}" if job.repeats > 1 else ""
                progress(f"{job.label:40} {kind.name:8}{run:4}")
                try:
                    with ServerProcess(kind, server_cpus, log_dir, args.chat_py) as server:
                        result = job.run(server)
                except BenchError as error:
                    print(f"FAILED: {error}", flush=True)
                    failed = True
                    continue
                best = results[kind.name].get(job.key)
                if best is None or (job.best_by and result.figures[job.best_by] > best.figures[job.best_by]):
                    results[kind.name][job.key] = result
                if result.usage and result.usage.other_cpu / result.usage.wall >= BUSY_ELSEWHERE:
                    noisy.append(f"{kind.name} {job.key}{run}")
    met = print_report(settings, results, args.servers, args.only, noisy)
    print(f"\ntotal time {time.monotonic() - began:.0f} s; load average {load_average()}")
    if failed or args.keep_logs:
        print(f"server logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 1 if failed or (args.check and not all(met)) else 0


def main(argv: list[str]) -> int:
    """`python tests/bench.py [flags]`; `--baseline-server --port N` runs the baseline instead."""
    args = parse_args(argv)
    if args.baseline_server:
        run_baseline_server(args.port)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
