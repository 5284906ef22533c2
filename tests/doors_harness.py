"""Helpers for the issue 20 attacks (tests/test_doors.py, tests/attack_doors.py).

Plain asyncio, no Tornado and no chat.py import, so the same code runs inside a
network namespace (`ip netns exec NS python tests/doors_harness.py ...`), in the
tests and in the measurement script:

- `Peer`: a raw TCP connection from a chosen source address (IPv4 or IPv6) that can
  do the WebSocket handshake, send lines, read events, drop without a close frame,
  or send raw bytes (half-open handshakes, pipelined `GET /`).
- `http_request`, `KeepAlive`: GET requests, one per connection or kept alive.
- `ForwardingProxy`: a tiny reverse proxy (HTTP and WebSocket) that adds
  X-Forwarded-For / X-Real-Ip, as nginx and Caddy do.
- `NetNS`: a network namespace with many IPv6 addresses on its loopback.
- `tcp_closed`: has the server closed this socket (Linux's TCP_INFO)?
- The command line `python tests/doors_harness.py ipv6 ...`: the IPv6 attacks, run
  inside the namespace; prints one JSON object.

Everything is bounded in count and time, and talks only to loopback addresses or
the namespace's own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import time
from urllib.parse import urlencode

WAIT = 5.0  # seconds: a generous bound on every single wait
OPCODE_TEXT, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG = 0x1, 0x8, 0x9, 0xA
TCP_STATES_CLOSED = {7, 8, 9}  # TCP_CLOSE, TCP_CLOSE_WAIT, TCP_LAST_ACK: the server has hung up


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    length, mask = len(payload), os.urandom(4)
    if length < 126:
        header = bytes([0x80 | opcode, 0x80 | length])
    else:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    return header + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def host_header(host: str, port: int) -> str:
    """`Host:` for an address (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def upgrade_request(host: str, port: int, username: str | None, token: str | None = None,
                    headers: dict | None = None) -> bytes:
    """A WebSocket handshake request for /ws?username=...&token=..., with extra headers."""
    query = urlencode({k: v for k, v in (("username", username), ("token", token)) if v is not None})
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (f"GET /ws?{query} HTTP/1.1\r\nHost: {host_header(host, port)}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def get_request(host: str, port: int, path: str = "/", headers: dict | None = None,
                close: bool = False) -> bytes:
    """One `GET path` request (kept alive unless `close`)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host_header(host, port)}\r\n{connection}{extra}\r\n".encode()


def tcp_state(sock: socket.socket) -> int:
    """Linux: the socket's TCP state (1 established, 7 closed, 8 close-wait ...)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def tcp_closed(sock: socket.socket) -> bool:
    """Has the peer closed (FIN or RST) this socket? Works even if we never read what it sent."""
    try:
        return tcp_state(sock) in TCP_STATES_CLOSED
    except OSError:
        return True


class Refused(Exception):
    """The server closed the connection before answering the handshake."""


class Peer:
    """A raw TCP connection to the server, from `source`: WebSocket by hand, or raw bytes."""

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        self.sock, self.host, self.port, self.buffer = sock, host, port, b""
        self.welcome: dict | None = None
        self.eof = False
        self.answer_close = True  # answer the server's close frame, as a client should
        self.close_code: int | None = None

    @classmethod
    async def open(cls, host: str, port: int, source: str | None = None,
                   receive_buffer_bytes: int = 0) -> "Peer":
        """Connect from `source` (None: the kernel picks)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if receive_buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        if source:
            sock.bind((source, 0))
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), WAIT)
        except BaseException:
            sock.close()
            raise
        return cls(sock, host, port)

    async def send(self, data: bytes) -> None:
        """Send raw bytes (waits while the kernel's buffer is full)."""
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(self.sock, data), WAIT)

    def send_nowait(self, data: bytes) -> int:
        """Send what the kernel takes now; never waits. How many bytes went."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    async def receive(self, timeout: float = WAIT) -> bool:
        """Read what there is; False once the server has closed the connection."""
        if self.eof:
            return False
        try:
            chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), timeout)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        self.buffer += chunk
        self.eof = not chunk
        return bool(chunk)

    async def handshake(self, username: str | None, token: str | None = None, headers: dict | None = None,
                        timeout: float = WAIT) -> dict:
        """Log in: the first event (`welcome`, or the `error` of a refusal).

        Raises Refused if the server closes the connection without answering (the door).
        """
        await self.send(upgrade_request(self.host, self.port, username, token, headers))
        while b"\r\n\r\n" not in self.buffer:
            if not await self.receive(timeout):
                raise Refused("closed during the handshake")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise Refused(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        event = await self.read_event(timeout)
        if event is None:
            raise Refused("closed after the handshake, without an event")
        if event["type"] == "welcome":
            self.welcome = event
        return event

    async def read_frame(self, timeout: float = WAIT) -> tuple[int, bytes] | None:
        """The next frame from the server; None once the connection is closed."""
        while True:
            if len(self.buffer) >= 2:
                opcode, length, start = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
                if length >= 126:
                    size, form = (2, "!H") if length == 126 else (8, "!Q")
                    if len(self.buffer) >= 2 + size:
                        length, start = struct.unpack(form, self.buffer[2:2 + size])[0], 2 + size
                    else:
                        length = 1 << 62
                if len(self.buffer) >= start + length:
                    payload, self.buffer = self.buffer[start:start + length], self.buffer[start + length:]
                    return opcode, payload
            if not await self.receive(timeout):
                return None

    async def read_event(self, timeout: float = WAIT) -> dict | None:
        """The next event (pings are answered, a close frame is remembered); None once closed."""
        while True:
            frame = await self.read_frame(timeout)
            if frame is None:
                return None
            opcode, payload = frame
            if opcode == OPCODE_TEXT:
                return json.loads(payload)
            if opcode == OPCODE_PING:
                self.send_nowait(masked_frame(OPCODE_PONG, payload))
            if opcode == OPCODE_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                if self.answer_close:
                    self.send_nowait(masked_frame(OPCODE_CLOSE, payload[:2]))
                return {"type": "close", "code": self.close_code}

    async def expect(self, event_type: str, timeout: float = WAIT, **fields) -> dict:
        """Read until an event of this type (with these fields); fails on close."""
        seen = []
        while True:
            event = await self.read_event(timeout)
            assert event is not None and event["type"] != "close", \
                f"closed while waiting for {event_type}: {event}; saw {seen[-5:]}"
            if event["type"] == event_type and all(event.get(k) == v for k, v in fields.items()):
                return event
            seen.append(event)

    async def say(self, line: str) -> None:
        """Send one chat line (or /command)."""
        await self.send(masked_frame(OPCODE_TEXT, line.encode()))

    async def closed(self, timeout: float = WAIT) -> int | None:
        """Read until the server's close frame (answered) or hang-up: its close code (None: none)."""
        while True:
            event = await self.read_event(timeout)
            if event is None or event["type"] == "close":
                return self.close_code

    def hung_up(self) -> bool:
        """Has the server closed this connection (FIN or RST)? Never reads, never waits."""
        return self.eof or tcp_closed(self.sock)

    def drop(self) -> None:
        """Vanish without a close frame (a pulled cable: the server holds the session)."""
        with contextlib.suppress(OSError):
            self.sock.close()

    close = drop


async def login(host: str, port: int, username: str, source: str | None = None, token: str | None = None,
                headers: dict | None = None, timeout: float = WAIT) -> tuple[Peer | None, dict]:
    """Try to log in: (peer, first event); (None, {"type": "refused", ...}) if the door shut."""
    try:
        peer = await Peer.open(host, port, source)
    except (OSError, asyncio.TimeoutError) as error:
        return None, {"type": "refused", "why": f"connect: {error!r}"}
    try:
        return peer, await peer.handshake(username, token, headers, timeout)
    except (Refused, OSError, asyncio.TimeoutError) as error:
        peer.close()
        return None, {"type": "refused", "why": repr(error)}


def parse_response_head(head: bytes) -> tuple[int, dict]:
    """(status, headers with lower-case names) of one HTTP response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


class KeepAlive:
    """HTTP/1.1 requests one after another on one connection, each answer read in full."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    @classmethod
    async def open(cls, host: str, port: int, source: str | None = None) -> "KeepAlive":
        return cls(await Peer.open(host, port, source))

    async def get(self, path: str = "/", headers: dict | None = None,
                  timeout: float = WAIT) -> tuple[int, dict, bytes] | None:
        """(status, headers, body) of one request; None if the server closed the connection."""
        peer = self.peer
        if peer.eof:
            return None
        try:
            await peer.send(get_request(peer.host, peer.port, path, headers))
        except (OSError, asyncio.TimeoutError):
            peer.eof = True
            return None
        return await self.read_response(timeout)

    async def read_response(self, timeout: float = WAIT) -> tuple[int, dict, bytes] | None:
        """The next response on the connection, or None if it closed first."""
        peer = self.peer
        while b"\r\n\r\n" not in peer.buffer:
            if not await peer.receive(timeout):
                return None
        head, peer.buffer = peer.buffer.split(b"\r\n\r\n", 1)
        status, headers = parse_response_head(head)
        length = 0 if status in (204, 304) else int(headers.get("content-length", 0))
        while len(peer.buffer) < length:
            if not await peer.receive(timeout):
                return None
        body, peer.buffer = peer.buffer[:length], peer.buffer[length:]
        return status, headers, body

    def close(self) -> None:
        self.peer.close()


async def http_request(host: str, port: int, path: str = "/", source: str | None = None,
                       headers: dict | None = None, timeout: float = WAIT) -> tuple[int, dict, bytes] | None:
    """One GET on a connection of its own; None if the server closed it without an answer."""
    try:
        client = await KeepAlive.open(host, port, source)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        return await client.get(path, headers, timeout)
    finally:
        client.close()


# ---- a reverse proxy that says who the client is --------------------------------------------


class ForwardingProxy:
    """A minimal reverse proxy for the chat server, as nginx or Caddy would be configured.

    It rewrites the head of each connection's first request only (enough for WebSocket and
    for one-request HTTP), then copies bytes both ways. `mode`:
    - "x-real-ip": sets X-Real-Ip to the client's address and appends it to X-Forwarded-For
      (nginx: proxy_set_header X-Real-IP $remote_addr; X-Forwarded-For $proxy_add_x_forwarded_for);
    - "x-forwarded-for": only appends to X-Forwarded-For, and removes any X-Real-Ip the client
      sent (Caddy's reverse_proxy sets X-Forwarded-For only).
    `claim(peer_address)` says what address to forward for a client (default: its own).
    """

    def __init__(self, upstream_host: str, upstream_port: int, mode: str = "x-real-ip",
                 claim=None, listen_host: str = "127.0.0.1") -> None:
        assert mode in ("x-real-ip", "x-forwarded-for")
        self.upstream = (upstream_host, upstream_port)
        self.mode, self.claim, self.listen_host = mode, claim or (lambda address: address), listen_host
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> "ForwardingProxy":
        self.server = await asyncio.start_server(self.handle, self.listen_host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def rewrite(self, head: bytes, client_address: str) -> bytes:
        """The request head with the forwarding headers set."""
        lines = head.decode("latin-1").split("\r\n")
        request_line, headers = lines[0], [line for line in lines[1:] if line]
        forwarded = self.claim(client_address)
        kept, earlier_xff = [], None
        for line in headers:
            name = line.split(":", 1)[0].strip().lower()
            if name == "x-forwarded-for":
                earlier_xff = line.split(":", 1)[1].strip()
            elif name == "x-real-ip":
                continue  # a proxy sets its own; what the client sent is dropped
            else:
                kept.append(line)
        kept.append(f"X-Forwarded-For: {earlier_xff + ', ' if earlier_xff else ''}{forwarded}")
        if self.mode == "x-real-ip":
            kept.append(f"X-Real-Ip: {forwarded}")
        return ("\r\n".join([request_line, *kept]) + "\r\n\r\n").encode("latin-1")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        upstream_writer = None
        try:
            client_address = writer.get_extra_info("peername")[0]
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            upstream_writer.write(self.rewrite(head[:-4], client_address))

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    while chunk := await source.read(65536):
                        sink.write(chunk)
                        await sink.drain()
                with contextlib.suppress(OSError):
                    sink.close()

            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): ended on purpose (returning normally keeps asyncio from logging it)
        finally:
            for stream in (writer, upstream_writer):
                if stream is not None:
                    with contextlib.suppress(OSError, RuntimeError):
                        stream.close()
            self.tasks.discard(task)


# ---- a network namespace with many IPv6 addresses ------------------------------------------


class NetNS:
    """`ip netns add NAME`, its loopback up, and IPv6 addresses on it; deleted on exit."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name, self.addresses = name, addresses

    @staticmethod
    def unavailable_reason(name: str) -> str:
        """"" if this process can create a network namespace; else why not."""
        if not sys.platform.startswith("linux"):
            return "network namespaces are Linux only"
        try:
            made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"cannot run `ip netns add`: {error}"
        if made.returncode != 0:
            return f"`ip netns add` failed (needs root and namespaces): {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        return ""

    def __enter__(self) -> "NetNS":
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=10)
        try:
            commands = ["link set lo up"] + [f"addr add {address}/64 dev lo nodad"
                                             for address in self.addresses]
            subprocess.run(["ip", "-n", self.name, "-batch", "-"], input="\n".join(commands) + "\n",
                           check=True, capture_output=True, text=True, timeout=30)
        except BaseException:
            self.delete()
            raise
        return self

    def exec_args(self, *command: str) -> list[str]:
        """A command line that runs `command` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def __exit__(self, *exc) -> None:
        self.delete()


def ipv6_addresses(prefix: str, first: int, count: int) -> list[str]:
    """`count` addresses of a /64 prefix such as "fd00:1:2:3::", from interface id `first`."""
    network = ipaddress.IPv6Address(prefix)
    return [str(network + first + number) for number in range(count)]


# ---- a bystander that times its own echo ---------------------------------------------------


async def echo_probe(peer: Peer, count: int, interval: float, timeout: float = WAIT) -> list[float]:
    """Send `count` lines, one every `interval` s; each echo's delay in ms. Fails on any error."""
    latencies = []
    for number in range(count):
        sent = time.monotonic()
        text = f"probe {number} {sent}"
        await peer.say(text)
        while True:
            event = await peer.read_event(timeout)
            assert event is not None and event["type"] != "close", f"the bystander was closed: {event}"
            assert event["type"] != "error", f"the bystander's line was refused: {event}"
            if event["type"] == "message" and event.get("text") == text:
                break
        latencies.append(1000 * (time.monotonic() - sent))
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - sent)))
    return latencies


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_by_server(peer: Peer, byte_budget: int = 512 * 1024, timeout: float = 2.0) -> bool:
    """Has the server closed this connection (that may never have read)?

    A server that closes with our requests still unread in its kernel sends RST, which TCP_INFO
    shows at once. A FIN, though, waits behind the replies we never read, so if TCP_INFO shows
    no close yet, read: a closed connection ends within what the kernel buffers held (chat.py
    fixes its send buffer at 64 KiB, 128 KiB as Linux counts it; with our small receive buffer
    that is well under `byte_budget`); one still being served keeps sending past it.
    """
    if peer.hung_up():
        return True
    received, deadline = 0, time.monotonic() + timeout
    while received < byte_budget and time.monotonic() < deadline:
        before = len(peer.buffer)
        try:
            if not await peer.receive(max(0.01, deadline - time.monotonic())):
                return True
        except asyncio.TimeoutError:
            return False
        received += len(peer.buffer) - before
        peer.buffer = b""
    return False


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


async def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once something accepts connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            (await Peer.open(host, port)).close()
            return
        except (OSError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# ---- the IPv6 attacks, run inside the namespace --------------------------------------------


async def ipv6_seats(args) -> dict:
    """Every attacker address tries `per_address` logins; then they drop (held) and try again;
    then the classmate from another /64 logs in. Counts what each got."""
    attackers = ipv6_addresses(args.attacker_prefix, 0x100, args.addresses)
    peers, first_events, again_events = [], [], []
    started = time.monotonic()
    for round_number in range(args.per_address):
        for index, source in enumerate(attackers):
            peer, event = await login(args.host, args.port, f"a{index}r{round_number}", source, timeout=2)
            first_events.append(event.get("code", event["type"]))
            if peer is not None and event["type"] == "welcome":
                peers.append(peer)
            elif peer is not None:
                peer.close()
    elapsed = time.monotonic() - started
    online_peak = len(peers)
    for peer in peers:
        peer.drop()  # held for resume: they still count
    await asyncio.sleep(0.5)
    for index, source in enumerate(attackers[:args.retry]):
        peer, event = await login(args.host, args.port, f"b{index}", source, timeout=2)
        again_events.append(event.get("code", event["type"]))
        if peer is not None:
            peer.close()
    classmate, event = await login(args.host, args.port, "classmate", args.classmate, timeout=WAIT)
    result = {"welcomed": first_events.count("welcome"), "answers": summary(first_events),
              "after_drop_welcomed": again_events.count("welcome"), "after_drop": summary(again_events),
              "online_peak": online_peak, "seconds": round(elapsed, 2),
              "classmate": event.get("code", event["type"])}
    if classmate is not None:
        classmate.close()
    return result


async def ipv6_halfopen(args) -> dict:
    """Every attacker address opens `per_address` half-open handshakes; how many stay open."""
    attackers = ipv6_addresses(args.attacker_prefix, 0x100, args.addresses)
    peers = []
    for index, source in enumerate(attackers):
        for number in range(args.per_address):
            try:
                peer = await Peer.open(args.host, args.port, source)
            except (OSError, asyncio.TimeoutError):
                continue
            peer.send_nowait(upgrade_request(args.host, args.port, f"h{index}x{number}")[:40])
            peers.append(peer)
    await asyncio.sleep(1.0)  # the server closes the ones over a limit at once
    kept = sum(not peer.hung_up() for peer in peers)
    classmate, event = await login(args.host, args.port, "classmate", args.classmate, timeout=WAIT)
    result = {"opened": len(peers), "kept_open": kept, "classmate": event.get("code", event["type"])}
    for peer in peers + ([classmate] if classmate else []):
        peer.close()
    return result


# ---- one busy room: N senders at the default rate (run in a process of its own) ------------


def sender_address(number: int) -> str:
    """The source address of busy-room sender `number` (0-based): 127.0.1.1 and up, one each."""
    return f"127.0.{1 + number // 250}.{1 + number % 250}"


async def busy_room(args) -> dict:
    """Log `senders` users in from addresses of their own, /join #busy, say "ready", then each
    sends `rate` lines a second for `seconds` s, reading (and counting) what comes back."""
    peers = []
    for number in range(args.senders):
        peer = await Peer.open(args.host, args.port, sender_address(number))
        event = await peer.handshake(f"busy{number}")
        assert event["type"] == "welcome", event
        await peer.say(f"/join {args.room}")
        peers.append(peer)
    for peer in peers:
        await peer.expect("joined", room=args.room)
    print("ready", flush=True)
    counts = {"deliveries": 0, "refused": 0, "closed": 0}
    until = time.monotonic() + args.seconds
    line = masked_frame(OPCODE_TEXT, b"x" * 60)

    async def drain(peer: Peer) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await loop.sock_recv(peer.sock, 262144)
            except OSError:
                chunk = b""
            if not chunk:
                counts["closed"] += 1
                return
            counts["deliveries"] += chunk.count(b'"type":"message"')
            counts["refused"] += chunk.count(b'"code":"rate_limited"')

    async def send(peer: Peer, offset: float) -> None:
        await asyncio.sleep(offset)
        while time.monotonic() < until:
            peer.send_nowait(line)
            await asyncio.sleep(1 / args.rate)

    readers = [asyncio.ensure_future(drain(peer)) for peer in peers]
    started = time.monotonic()
    await asyncio.gather(*(send(peer, number / args.senders / args.rate) for number, peer in enumerate(peers)))
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)
    for reader in readers:
        reader.cancel()
    for peer in peers:
        peer.close()
    return {**counts, "seconds": round(elapsed, 2), "deliveries_per_second": round(counts["deliveries"] / elapsed)}


def summary(answers: list[str]) -> dict:
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return counts


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python tests/doors_harness.py")
    parser.add_argument("attack", choices=["ipv6-seats", "ipv6-halfopen", "busy-room"])
    parser.add_argument("--host", default="::1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--attacker-prefix", default="fd00:1:2:3::")
    parser.add_argument("--addresses", type=int, default=200)
    parser.add_argument("--per-address", type=int, default=1)
    parser.add_argument("--retry", type=int, default=50)
    parser.add_argument("--classmate", default="fd00:9:9:9::1")
    parser.add_argument("--senders", type=int, default=200)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--room", default="busy")
    args = parser.parse_args(argv)

    async def run() -> dict:
        await wait_listening(args.host, args.port)
        attacks = {"ipv6-seats": ipv6_seats, "ipv6-halfopen": ipv6_halfopen, "busy-room": busy_room}
        return await attacks[args.attack](args)

    print(json.dumps(asyncio.run(run())))


if __name__ == "__main__":
    main(sys.argv[1:])
