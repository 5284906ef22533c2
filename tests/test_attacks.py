"""Attacks: what one person with a script tries, and the bound the server keeps.

Each test reproduces one attack against a real server on 127.0.0.1, bounded in
count and time, with limits shrunk so it runs in a second or two, and asserts
the bound the server promises: the others keep chatting, and no resource
(descriptors, handshakes, rooms, held sessions, memory, kernel buffers, CPU) is
taken by one person or one address. Tests that need a second client address
use 127.0.0.2 and up, which only Linux routes to loopback without set-up.

Connections from 127.0.0.1 itself are the server's own machine (the teacher,
the notebook, the tests and the benchmark) and skip the per-address limits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest
import tornado.httpclient
import tornado.websocket
from conftest import ROOT, WAIT_SECONDS, ChatClient, ChatServer, free_port, wait_for_port, wait_until

import chat

ON_LINUX = sys.platform.startswith("linux")
if ON_LINUX:  # Unix-only modules; the tests that use them run on Linux only
    import fcntl
    import resource
needs_linux = pytest.mark.skipif(not ON_LINUX, reason="needs Linux: 127.0.0.2 routed to loopback, "
                                 "descriptor limits, the kernel's send-queue ioctl")

OPCODE_TEXT, OPCODE_BINARY, OPCODE_CLOSE, OPCODE_PING = 0x1, 0x2, 0x8, 0x9
SIOCOUTQ = 0x5411  # Linux: bytes in a socket's send queue (sent but not yet acknowledged, or unsent)


# ---- helpers: a server per test, clients from any loopback address, raw peers ----------------


@contextlib.asynccontextmanager
async def running_server(**fields):
    """Start the full server (`python chat.py`) on a free port with these limits; stop it after."""
    server, manager, port = chat.serve(chat.CrowdLimits(**fields), 0, "127.0.0.1")
    try:
        yield ChatServer(port, manager)
    finally:
        await chat.shutdown(server, manager, timeout_seconds=0.5)


def ws_url(port: int, **query) -> str:
    """The chat URL with this query (username, token, last_seq)."""
    return f"ws://127.0.0.1:{port}/ws?" + urlencode({k: v for k, v in query.items() if v is not None})


async def connect_from(source: str, port: int, username: str, **query) -> ChatClient:
    """A WebSocket client whose connection comes from `source` (any 127.x.y.z address)."""
    request = tornado.httpclient.HTTPRequest(ws_url(port, username=username, **query),
                                             network_interface=source)
    return ChatClient(await tornado.websocket.websocket_connect(request), username)


async def join_from(source: str, port: int, username: str, **query) -> ChatClient:
    """Connect from `source` and read the welcome and the lobby's `joined`."""
    client = await connect_from(source, port, username, **query)
    client.welcome = await client.expect("welcome")
    await client.expect("joined")
    return client


async def refusal_or_welcome(client: ChatClient) -> dict:
    """The first event on a new connection: `welcome`, or the `error` of a refusal."""
    event = await client.next_event()
    assert event is not None, "closed without an event"
    return event


async def drop(client: ChatClient, server: ChatServer) -> None:
    """The client vanishes without a close frame; return once the server holds its session."""
    client.drop()
    await wait_until(lambda: client.username not in server.manager.status()["users"], "the server noticed")


def upgrade_request(port: int, username: str) -> bytes:
    """A WebSocket handshake request, as a browser would send it."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws?username={username} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes, masked: bool = True, reserved_bits: int = 0) -> bytes:
    """One final client frame; clients must mask (RFC 6455 5.3), but an attacker may not."""
    length = len(payload)
    header = bytes([0x80 | reserved_bits << 4 | opcode])
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header += bytes([mask_bit | length])
    else:
        header += struct.pack("!BH", mask_bit | 126, length)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


class RawPeer:
    """A WebSocket peer made by hand on a bare socket: it sends what a script sends, reads when told."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1", receive_buffer_bytes: int = 0) -> "RawPeer":
        """A TCP connection to the server from `source` (a small receive buffer, if asked)."""
        sock = socket.socket()
        sock.setblocking(False)
        if receive_buffer_bytes:  # before connecting, so the advertised window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    @classmethod
    async def join(cls, port: int, username: str, **options) -> "RawPeer":
        """Open, do the handshake, and read the welcome and `joined` (the welcome is kept)."""
        peer = await cls.open(port, **options)
        await peer.send(upgrade_request(port, username))
        while b"\r\n\r\n" not in peer.buffer:
            assert await peer.receive(), "closed during the handshake"
        head, peer.buffer = peer.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        peer.welcome = await peer.read_event()
        assert (await peer.read_event())["type"] == "joined"
        return peer

    async def send(self, data: bytes) -> None:
        """Send raw bytes."""
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def receive(self) -> bool:
        """Read what the kernel has for us; False once the server has closed the socket."""
        loop = asyncio.get_running_loop()
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), WAIT_SECONDS)
        except ConnectionResetError:
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    async def read_frame(self) -> tuple[int, bytes] | None:
        """The next frame from the server as (opcode, payload); None once the socket is closed."""
        while True:
            if len(self.buffer) >= 2:
                opcode, length, start = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
                if length >= 126:
                    size, form = (2, "!H") if length == 126 else (8, "!Q")
                    length, start = struct.unpack(form, self.buffer[2:2 + size])[0], 2 + size
                if len(self.buffer) >= start + length:
                    payload, self.buffer = self.buffer[start:start + length], self.buffer[start + length:]
                    return opcode, payload
            if not await self.receive():
                return None

    async def read_event(self) -> dict:
        """The next frame, which must be a text frame: one event."""
        opcode, payload = await self.read_frame()
        assert opcode == OPCODE_TEXT, (opcode, payload)
        return json.loads(payload)

    async def close_code(self) -> int | None:
        """Read to the server's close frame: its code (None if it hung up without one)."""
        while (frame := await self.read_frame()) is not None:
            if frame[0] == OPCODE_CLOSE:
                return struct.unpack("!H", frame[1][:2])[0] if len(frame[1]) >= 2 else None
        return None

    def answered(self) -> bool:
        """Has the server sent anything, or closed the connection? (Never waits.)"""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    def hung_up(self) -> bool:
        """Has the server closed this connection? (Never waits.)"""
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        """Hang up without a close frame."""
        self.sock.close()


def connection_of(server: ChatServer, username: str):
    """White-box: the server's handler for a user's live connection."""
    return next(c for c in server.manager.connections if c.user and c.user.username == username)


class FakeClock:
    """A monotonic clock that moves only when the test says so (it starts at the real one's time)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---- 1. descriptors and unfinished handshakes ------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_connections_that_never_finish_their_handshake_are_capped_and_the_rest_closed_at_once():
    """Past `max_handshakes` unfinished handshakes, a new connection is closed at once, not at a timeout."""
    async with running_server(max_handshakes=10, handshake_timeout=30) as target:
        stalled = []
        for number in range(40):  # each sends half a request, as a byte-a-second script would
            peer = await RawPeer.open(target.port)
            await peer.send(upgrade_request(target.port, f"slow{number}")[:40])
            stalled.append(peer)
        try:
            await wait_until(lambda: sum(peer.hung_up() for peer in stalled) >= 30, "30 of 40 closed")
            assert [peer.hung_up() for peer in stalled] == [False] * 10 + [True] * 30
        finally:
            print(f"\nATTACK stalled handshakes: {sum(not p.hung_up() for p in stalled)} of 40 kept open")
            for peer in stalled:
                peer.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_linux
@pytest.mark.gen_test(timeout=60)
async def test_running_out_of_file_descriptors_pauses_accepting_logs_it_once_per_second_and_users_chat_on(
        tmp_path):
    """Out of descriptors: accepting pauses, one log line a second, no spinning; the others chat on."""
    port, log_path, file_limit = free_port(), tmp_path / "server.log", 64

    def low_file_limit() -> None:  # runs in the child: the server cannot raise it again
        resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))

    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "chat.py"), f"--port={port}", "--address=127.0.0.1",
             "--max-connections=0", "--rate-per-second=0"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=low_file_limit)
    attackers = []
    try:
        wait_for_port(port, process)
        alice = await RawPeer.join(port, "alice")
        cpu_before, started = cpu_seconds(process.pid), time.monotonic()
        for number in range(2 * file_limit):  # log in, one by one, until the descriptors run out
            attackers.append(await RawPeer.open(port))
            await attackers[-1].send(upgrade_request(port, f"user{number}"))
            await wait_until(lambda: attackers[-1].answered() or "open files" in log_path.read_text(),
                             "the server answered the handshake, or said it is out of descriptors")
            if "open files" in log_path.read_text():
                break
        assert "open files" in log_path.read_text(), "the server never ran out of descriptors"
        for number in range(10):  # and keep knocking: these wait in the listen queue
            attackers.append(await RawPeer.open(port))
            await attackers[-1].send(upgrade_request(port, f"more{number}"))
        await asyncio.sleep(2)  # the attack lasts two seconds (the test counts log lines per second)
        await alice.send(client_frame(OPCODE_TEXT, b"still here"))
        while (event := await alice.read_event())["type"] != "message":
            pass
        assert event["text"] == "still here"
        elapsed, cpu = time.monotonic() - started, cpu_seconds(process.pid) - cpu_before
        log = log_path.read_text()
        complaints = log.count("Too many open files")
        print(f"\nATTACK descriptors: {complaints} log lines naming it, {len(log):,} bytes of log, "
              f"server CPU {cpu:.2f} s in {elapsed:.2f} s")
        assert 1 <= complaints <= 2 + elapsed / chat.ACCEPT_PAUSE_SECONDS
        for attacker in attackers:
            attacker.close()
        bob = await RawPeer.join(port, "bob")  # accepting resumed
        assert bob.welcome["username"] == "bob"
    finally:
        for attacker in attackers:
            attacker.close()
        process.kill()
        process.wait()


# ---- 2. rooms: how many, and what listing them costs -----------------------------------------


async def fill_rooms(target: ChatServer, users: int, rooms_each: int) -> list[ChatClient]:
    """`users` users each create `rooms_each` rooms of their own, one member each."""
    clients = []
    for number in range(users):
        client = await target.join(f"maker{number}")
        for room in range(rooms_each):
            await client.say(f"/join r{number}x{room}")
        await client.sync()
        clients.append(client)
    return clients


@pytest.mark.gen_test(timeout=30)
async def test_rooms_lists_the_biggest_rooms_and_counts_the_rest():
    """/rooms is bounded: the ROOM_LIST_LIMIT biggest rooms, by name, and `more` counts the others."""
    async with running_server(rate_per_second=0, max_rooms_per_user=30) as target:
        await fill_rooms(target, users=6, rooms_each=20)
        alice, bob = await target.join("alice"), await target.join("bob")
        for member in (alice, bob):
            await member.say("/join big")
        await alice.expect("joined", room="big")
        await bob.say("/rooms")
        reply = await bob.expect("rooms")
        size = len(json.dumps(reply))
        print(f"\nATTACK /rooms with 122 rooms: {len(reply['rooms'])} listed, {size:,} bytes")
        listed = [room["name"] for room in reply["rooms"]]
        assert len(listed) == chat.ROOM_LIST_LIMIT and reply["more"] == 122 - chat.ROOM_LIST_LIMIT
        assert {"lobby", "big"} <= set(listed) and listed == sorted(listed)


@pytest.mark.gen_test
async def test_the_server_holds_at_most_max_rooms_and_refuses_one_more_with_no_more_rooms():
    """Total rooms: creating one past `max_rooms` gets `no_more_rooms`; joining an existing one works."""
    async with running_server(max_rooms=4) as target:
        alice, bob = await target.join("alice"), await target.join("bob")
        for room in ("one", "two", "three"):  # with the lobby: four rooms
            await alice.say(f"/join {room}")
            await alice.expect("joined", room=room)
        await bob.say("/join four")
        refusal = await bob.expect("error")
        assert refusal["code"] == "no_more_rooms" and "4" in refusal["text"]
        await bob.say("/join two")
        assert (await bob.expect("joined"))["room"] == "two"


@pytest.mark.gen_test(timeout=30)
async def test_status_is_bounded_in_size_and_computed_at_most_once_per_cache_period():
    """GET /status lists at most ROOM_LIST_LIMIT rooms; it is computed once per STATUS_CACHE_SECONDS."""
    async with running_server(rate_per_second=0, max_rooms_per_user=30) as target:
        await fill_rooms(target, users=6, rooms_each=20)
        http_client = tornado.httpclient.AsyncHTTPClient()
        reports, status = [], target.manager.status

        def counted_status() -> dict:  # white-box: count the reports actually computed
            reports.append(1)
            return status()

        target.manager.status = counted_status
        started = time.monotonic()
        bodies = [(await http_client.fetch(f"http://127.0.0.1:{target.port}/status")).body for _ in range(40)]
        elapsed = time.monotonic() - started
        print(f"\nATTACK /status x40, 121 rooms: {len(reports)} computed, {len(bodies[0]):,} bytes each")
        assert len(json.loads(bodies[-1])["rooms"]) == chat.ROOM_LIST_LIMIT
        assert len(reports) <= 1 + elapsed / chat.STATUS_CACHE_SECONDS


# ---- 3. resume and --max-connections ---------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_no_sequence_of_drops_and_resumes_takes_online_users_past_max_connections():
    """Fill, drop, refill, drop, then resume every token: still at most `max_connections` online."""
    async with running_server(max_connections=3) as target:
        tokens = []
        for wave in range(3):
            clients = [await target.join(f"w{wave}u{number}") for number in range(3)]
            tokens += [(client.username, client.welcome["token"]) for client in clients]
            for client in clients:
                await drop(client, target)
        answers = []
        for username, token in tokens:
            client = await target.connect(username, token)
            answers.append((await refusal_or_welcome(client)).get("code", "welcome"))
        online = len(target.manager.status()["users"])
        print(f"\nATTACK resume past max_connections=3: {online} online; answers {answers}")
        assert online <= 3 and answers.count("welcome") <= 3
        assert set(answers) <= {"welcome", "server_full", "bad_token"}


# ---- 4. a client that stops reading: kernel buffers count too --------------------------------


def kernel_send_queue(connection) -> int:
    """White-box: bytes the kernel holds for this connection (Linux's SIOCOUTQ on the server socket)."""
    fileno = connection.ws_connection.stream.socket.fileno()
    return struct.unpack("i", fcntl.ioctl(fileno, SIOCOUTQ, b"\0" * 4))[0]


def unsent_bytes(connection) -> int:
    """White-box: the output queued in the server process for this connection."""
    return len(connection.ws_connection.stream._write_buffer or b"")


@needs_linux
@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_stops_reading_costs_at_most_the_backlog_plus_a_small_kernel_buffer():
    """A non-reader holds at most `max_backlog`, plus 2 x SEND_BUFFER_BYTES in the kernel (Linux doubles)."""
    async with running_server(rate_per_second=0, max_backlog=64 * 1024, max_message_length=1000) as target:
        alice = await target.join("alice")
        dave = await RawPeer.join(target.port, "dave", receive_buffer_bytes=4096)  # dave never reads again
        daves = connection_of(target, "dave")
        peak_kernel = peak_total = sent = 0
        while daves.ws_connection is not None:
            assert sent < 20_000, "dave was never dropped"
            for _ in range(50):
                await alice.say("x" * 900)
                sent += 1
            for _ in range(50):
                await alice.expect("message")
            if daves.ws_connection is not None:
                kernel = kernel_send_queue(daves)
                peak_kernel = max(peak_kernel, kernel)
                peak_total = max(peak_total, kernel + unsent_bytes(daves))
        dave.close()
        print(f"\nATTACK non-reader: peak kernel send queue {peak_kernel:,} bytes, "
              f"with the backlog {peak_total:,} bytes, after {sent * 900:,} bytes sent")
        assert peak_kernel <= 2 * chat.SEND_BUFFER_BYTES
        assert peak_total <= 64 * 1024 + 2 * chat.SEND_BUFFER_BYTES + 2048


# ---- 5. one address, and every frame counted -------------------------------------------------


@needs_linux
@pytest.mark.gen_test(timeout=30)
async def test_one_address_gets_at_most_max_per_address_users_and_held_sessions_then_4005():
    """Per address: users plus held sessions up to `max_per_address`; one more gets `address_full`, 4005."""
    async with running_server(max_per_address=3) as target:
        users = [await join_from("127.0.0.2", target.port, f"bot{number}") for number in range(3)]
        await drop(users[0], target)  # held for resume: it still counts
        extra = await connect_from("127.0.0.2", target.port, "bot9")
        refusal = await refusal_or_welcome(extra)
        codes = (refusal.get("code"), (await extra.closed())[0])
        print(f"\nATTACK one address, max_per_address=3: the 4th gets {codes}")
        assert codes == ("address_full", 4005)
        other = await join_from("127.0.0.3", target.port, "carol")  # another laptop gets in
        assert other.welcome["username"] == "carol"
        resumed = await join_from("127.0.0.2", target.port, "bot0", token=users[0].welcome["token"])
        assert resumed.welcome["resumed"] is True  # coming back into your own seat is fine


@needs_linux
@pytest.mark.gen_test(timeout=30)
async def test_new_connections_from_one_address_are_limited_to_handshake_rate():
    """Per address: `handshake_rate` new connections a second (bursts of twice that); more are closed."""
    async with running_server(handshake_rate=2, max_per_address=0) as target:
        started, peers = time.monotonic(), []
        for number in range(30):
            peers.append(await RawPeer.open(target.port, source="127.0.0.2"))
            await peers[-1].send(upgrade_request(target.port, f"bot{number}"))
        await wait_until(lambda: all(peer.answered() for peer in peers), "every connection answered")
        elapsed = time.monotonic() - started
        kept = sum(not peer.hung_up() for peer in peers)
        print(f"\nATTACK 30 connections from one address at handshake_rate=2: {kept} kept in {elapsed:.2f} s")
        assert kept <= 4 + 2 * elapsed
        for peer in peers:
            peer.close()
        carol = await join_from("127.0.0.3", target.port, "carol")  # another address is not affected
        assert carol.welcome["username"] == "carol"


@pytest.mark.gen_test
async def test_binary_frames_do_not_keep_a_silent_user_past_the_idle_timeout():
    """Idle timeout: only lines count as activity; a binary frame every 0.1 s does not keep a user on."""
    async with running_server(idle_timeout=0.5, rate_per_second=0) as target:
        alice = await target.join("alice")
        started = time.monotonic()
        while not alice.ended and time.monotonic() < started + 3:
            with contextlib.suppress(tornado.websocket.WebSocketClosedError):
                await alice.ws.write_message(b"", binary=True)
            await alice.next_event()  # its `binary_frame` error, or the idle notice, or the close
            await asyncio.sleep(0.1)
        print(f"\nATTACK binary keepalive, idle_timeout=0.5: online {time.monotonic() - started:.1f} s")
        assert alice.ws.close_code == chat.CLOSE_IDLE  # closed while it was still sending them


def flood_frame(kind: str, limits: chat.CrowdLimits) -> bytes:
    """One frame of a flood, of the given kind, as a script would send it."""
    return {"text": client_frame(OPCODE_TEXT, b"spam"),
            "binary": client_frame(OPCODE_BINARY, b""),
            "ping": client_frame(OPCODE_PING, b""),
            "over-limit": client_frame(OPCODE_TEXT, b"x" * (limits.max_message_length + 1))}[kind]


@pytest.mark.parametrize("kind", ["text", "binary", "ping", "over-limit"])
@pytest.mark.gen_test(timeout=30)
async def test_every_frame_counts_against_the_rate_and_a_flood_is_closed_with_4029(kind):
    """Every frame a client sends takes a token; one that floods on after being told gets `flooding`, 4029."""
    async with running_server(rate_per_second=0.001, rate_burst=5, max_message_length=50) as target:
        bob = await target.join("bob")
        mallory = await RawPeer.join(target.port, "mallory")
        frame = flood_frame(kind, target.manager.limits)
        await mallory.send(frame * 200)
        events = []
        while (reply := await mallory.read_frame()) is not None and reply[0] != OPCODE_CLOSE:
            if reply[0] == OPCODE_TEXT:
                events.append(json.loads(reply[1]))
        close_code = struct.unpack("!H", reply[1][:2])[0] if reply and len(reply[1]) >= 2 else None
        codes = [event.get("code") for event in events if event["type"] == "error"]
        print(f"\nATTACK 200 {kind} frames, burst 5: close {close_code}, {len(codes)} error replies")
        assert close_code == chat.CLOSE_FLOODING and codes[-1] == "flooding"
        await bob.say("still here")
        await bob.expect("message", text="still here")  # after whatever of mallory's got through


@pytest.mark.gen_test
async def test_a_flooder_is_told_rate_limited_once_not_once_per_refused_line():
    """Refusals are rate-limited too: past the burst, one `rate_limited`, then silence until a line passes."""
    async with running_server(rate_per_second=1, rate_burst=5) as target:
        clock = target.manager.clock = FakeClock()  # the manager's clock: time moves when we say
        alice = await target.join("alice")
        for number in range(10):  # the burst, and five more: under the flood limit
            await alice.say(f"line {number}")
        user = target.manager.users["alice"]  # white-box: wait until the server has read all ten
        await wait_until(lambda: user.strikes == 5, "five lines refused")
        clock.advance(10)  # the bucket refills, so the /rooms of sync() passes
        replies = [event["type"] for event in await alice.sync()]
        print(f"\nATTACK 10 lines, burst 5: replies {replies}")
        assert replies == ["message"] * 5 + ["error"]


@pytest.mark.gen_test
async def test_a_busy_room_is_held_to_room_budget_and_other_rooms_chat_on():
    """Per room: `room_budget` deliveries a second, a tenth of it at once (a line to N members costs N)."""
    async with running_server(room_budget=200, rate_per_second=0) as target:
        target.manager.clock = FakeClock()  # the manager's clock stands still: no refills during the test
        members = [await target.join(name) for name in ("alice", "bob", "carol", "dave")]
        for member in members:
            await member.say("/join busy")
            await member.expect("joined", room="busy")
        erin = await target.join("erin")  # in the lobby
        for number in range(30):
            await members[0].say(f"spam {number}")
        replies = await members[0].sync()
        relayed = [event for event in replies if event["type"] == "message"]
        refused = [event for event in replies if event["type"] == "error"]
        print(f"\nATTACK 30 lines into a room of 4, room_budget=200: {len(relayed)} relayed")
        assert len(relayed) == 5 and {event["code"] for event in refused} == {"rate_limited"}
        await erin.say("the lobby is fine")
        assert (await erin.expect("message"))["text"] == "the lobby is fine"


# ---- 6. held sessions ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_held_sessions_are_bounded_by_max_connections_and_the_oldest_ends_first():
    """Held sessions: at most `max_connections`; one more ends the oldest (its name free, its room told)."""
    async with running_server(max_connections=3) as target:
        watcher = await target.join("watcher")
        for number in range(6):
            await drop(await target.join(f"ghost{number}"), target)
        held = target.manager.status()["sessions_held"]
        print(f"\nATTACK 6 connect-and-drop, max_connections=3: {held} sessions held")
        assert held == 3
        leaves = [e["username"] for e in await watcher.sync() if e.get("event") == "leave"]
        assert leaves == ["ghost0", "ghost1", "ghost2"]
        assert (await target.join("ghost0")).welcome["resumed"] is False


@pytest.mark.gen_test
async def test_a_name_held_for_resume_is_refused_with_held_and_retry_after():
    """`username_taken` for a held name says `held: true` and `retry_after`: at most the resume grace."""
    async with running_server(resume_grace=30) as target:
        await drop(await target.join("alice"), target)
        other = await target.connect("alice")
        refusal = await other.expect("error")
        print(f"\nATTACK name squatting: refusal {refusal}")
        assert refusal["code"] == "username_taken" and refusal.get("held") is True
        assert 0 < refusal["retry_after"] <= 30


@pytest.mark.gen_test
async def test_held_sessions_do_not_keep_a_seat_in_a_full_room_from_a_newcomer():
    """Room capacity: a newcomer to a room full of held sessions gets a seat; the oldest held session ends."""
    async with running_server(room_capacity=2) as target:
        for name in ("ghost1", "ghost2"):
            ghost = await target.join(name)
            await ghost.say("/join dev")
            await ghost.expect("joined", room="dev")
            await drop(ghost, target)
        carol = await target.join("carol")
        await carol.say("/join dev")
        replies = [event for event in await carol.sync() if event["type"] in ("joined", "error")]
        print(f"\nATTACK a room full of held sessions: the newcomer gets {replies}")
        assert [(event["type"], event.get("room")) for event in replies] == [("joined", "dev")]
        assert target.manager.status()["sessions_held"] == 1


# ---- 7. resume loses nothing silently --------------------------------------------------------


@pytest.mark.gen_test
async def test_resume_with_last_seq_replays_what_went_into_a_half_open_connection():
    """Resume while the old socket is half-open: lines sent meanwhile are replayed, `missed` counts them."""
    async with running_server(rate_per_second=0) as target:
        alice, bob = await target.join("alice"), await target.join("bob")
        await bob.say("before")
        last_seq = (await alice.expect("message"))["seq"]  # alice's laptop saw this one ...
        for number in range(10):  # ... and then its network died: these go into a dead socket
            await bob.say(f"meanwhile {number}")
        await bob.sync()
        again = await join_from("127.0.0.1", target.port, "alice", token=alice.welcome["token"],
                                last_seq=last_seq)
        replayed = [e for e in await again.sync() if e["type"] == "message"]
        print(f"\nATTACK half-open resume: missed {again.welcome['missed']}, replayed {len(replayed)} of 10")
        assert [e["text"] for e in replayed] == [f"meanwhile {number}" for number in range(10)]
        assert all(e["replayed"] is True for e in replayed)
        assert (again.welcome["missed"], again.welcome["lost"]) == (10, 0)


@pytest.mark.gen_test(timeout=30)
async def test_welcome_says_how_many_messages_were_lost_past_the_replay_limit():
    """Resume: what the server no longer has is counted in `lost`, never dropped silently."""
    async with running_server(rate_per_second=0) as target:
        alice, bob = await target.join("alice"), await target.join("bob")
        await bob.say("before")
        last_seq = (await alice.expect("message"))["seq"]
        await drop(alice, target)
        for number in range(150):
            await bob.say(f"line {number}")
        await bob.sync()
        again = await join_from("127.0.0.1", target.port, "alice", token=alice.welcome["token"],
                                last_seq=last_seq)
        print(f"\nATTACK 150 missed: missed={again.welcome['missed']} lost={again.welcome.get('lost')}")
        assert (again.welcome["missed"], again.welcome["lost"]) == (chat.REPLAY_LIMIT_MESSAGES, 50)


@pytest.mark.gen_test
async def test_message_seq_increases_across_the_whole_server():
    """Every `message` carries `seq`, increasing across rooms and senders."""
    async with running_server() as target:
        alice, bob = await target.join("alice"), await target.join("bob")
        await bob.say("/join dev")
        await bob.expect("joined")
        seqs = []
        for speaker, text in ((alice, "one, in lobby"), (bob, "two, in dev"), (alice, "three, in lobby")):
            await speaker.say(text)
            seqs.append((await speaker.expect("message", text=text))["seq"])
        assert seqs[0] < seqs[1] < seqs[2]


# ---- 8. the token is single-use --------------------------------------------------------------


@pytest.mark.gen_test
async def test_every_welcome_carries_a_new_token_and_a_used_one_is_refused():
    """Tokens are single-use: resuming gives a new token, and the old one gets `bad_token`, 4004."""
    async with running_server() as target:
        alice = await target.join("alice")
        again = await target.join("alice", token=alice.welcome["token"])  # takes over (4010 for the old one)
        takeover = await target.connect("alice", token=alice.welcome["token"])
        reply = await refusal_or_welcome(takeover)
        print(f"\nATTACK reused token: new token {again.welcome['token'] != alice.welcome['token']}, "
              f"old token answered with {reply.get('code', reply['type'])}")
        assert again.welcome["token"] != alice.welcome["token"]
        assert reply["code"] == "bad_token" and (await takeover.closed())[0] == chat.CLOSE_BAD_TOKEN


# ---- 9. protocol laxness ---------------------------------------------------------------------


@pytest.mark.gen_test
async def test_an_unmasked_client_frame_is_closed_with_1002_and_ends_the_session():
    """RFC 6455 5.1: a client frame without a mask is a protocol error: close 1002, the session ends."""
    async with running_server() as target:
        bob = await target.join("bob")
        mallory = await RawPeer.join(target.port, "mallory")
        await mallory.send(client_frame(OPCODE_TEXT, b"unmasked", masked=False))
        code = await mallory.close_code()
        print(f"\nATTACK unmasked frame: close code {code}")
        assert code == chat.CLOSE_PROTOCOL_ERROR
        notice = await bob.expect("system", event="leave")
        assert notice["username"] == "mallory" and target.manager.status()["sessions_held"] == 0
        assert [e for e in await bob.sync() if e["type"] == "message"] == []


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2999, 5000])
@pytest.mark.gen_test
async def test_an_invalid_close_code_is_answered_with_1002_not_echoed(code):
    """RFC 6455 7.4.1: 1005, 1006, 1015 and codes outside the allowed ranges are never sent back."""
    async with running_server() as target:
        mallory = await RawPeer.join(target.port, "mallory")
        await mallory.send(client_frame(OPCODE_CLOSE, struct.pack("!H", code)))
        answer = await mallory.close_code()
        print(f"\nATTACK close code {code}: answered with {answer}")
        assert answer == chat.CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize("frame", [client_frame(OPCODE_TEXT, b"hi", reserved_bits=0b100),
                                   client_frame(0x3, b"reserved opcode"),
                                   client_frame(OPCODE_TEXT, b"\xff\xfe not utf-8")],
                         ids=["reserved-bit", "reserved-opcode", "bad-utf8"])
@pytest.mark.gen_test
async def test_a_protocol_error_closes_with_1002_and_ends_the_session_at_once(frame):
    """A protocol error is not a network failure: close 1002, and the session is not held for resume."""
    async with running_server() as target:
        bob = await target.join("bob")
        mallory = await RawPeer.join(target.port, "mallory")
        await mallory.send(frame)
        code = await mallory.close_code()
        print(f"\nATTACK protocol error: close {code}, held {target.manager.status()['sessions_held']}")
        assert code == chat.CLOSE_PROTOCOL_ERROR
        assert (await bob.expect("system", event="leave"))["username"] == "mallory"
        assert target.manager.status()["sessions_held"] == 0


# ---- 10. invisible text ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["\u3164", "\u200b\u200b\u200b", "\u2800 \u2800", "\ufeff", "\u115f\u1160",
                                  "\u2060\u180e", "\u034f\u0301"],
                         ids=["hangul-filler", "zero-width-space", "braille-blank", "bom", "choseong-filler",
                              "word-joiner", "combining-only"])
@pytest.mark.gen_test
async def test_text_that_is_empty_to_the_eye_is_refused_as_an_empty_message(text):
    """A line of only invisible characters is an empty message: `empty_message`, nothing relayed."""
    async with running_server() as target:
        alice = await target.join("alice")
        await alice.say(text)
        reply = await alice.next_event()
        print(f"\nATTACK invisible line {text.encode('unicode_escape').decode()}: {reply['type']}")
        assert (reply["type"], reply.get("code")) == ("error", "empty_message")


@pytest.mark.parametrize("sent, relayed", [
    ("pass\u200bword", "password"),  # zero-width space: hides text from filters
    ("a\u2060b\ufeffc\u00ad", "abc"),  # word joiner, byte-order mark, soft hyphen
    ("\U000e0041\U000e0042hi", "hi"),  # tag characters: invisible ASCII
    ("\U0001f469\u200d\U0001f4bb", "\U0001f469\u200d\U0001f4bb"),  # woman technologist: the ZWJ stays
    ("\u2764\ufe0f", "\u2764\ufe0f"),  # red heart: the variation selector stays
    ("1\ufe0f\u20e3", "1\ufe0f\u20e3"),  # keycap one
], ids=["zwsp", "joiners", "tags", "zwj-emoji", "variation-selector", "keycap"])
@pytest.mark.gen_test
async def test_format_characters_are_stripped_except_what_emoji_need(sent, relayed):
    """Format characters are stripped before relaying; ZWJ and variation selectors, which emoji need, stay."""
    async with running_server() as target:
        alice = await target.join("alice")
        await alice.say(sent)
        assert (await alice.expect("message"))["text"] == relayed


@pytest.mark.gen_test
async def test_runs_of_combining_marks_are_capped():
    """A letter with 400 stacked combining marks is relayed with at most MAX_COMBINING_MARKS of them."""
    async with running_server() as target:
        alice = await target.join("alice")
        await alice.say("z" + "\u0301\u0316" * 200 + " ok")
        text = (await alice.expect("message"))["text"]
        print(f"\nATTACK 400 combining marks: relayed {len(text)} characters")
        assert text == "z" + ("\u0301\u0316" * 200)[:chat.MAX_COMBINING_MARKS] + " ok"


# ---- 11. rooms per user ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_user_can_be_in_at_most_max_rooms_per_user_rooms_and_leaves_them_all_on_quit():
    """Rooms per user (IRC's CHANLIMIT): past `max_rooms_per_user`, `too_many_rooms`; quitting leaves all."""
    async with running_server(max_rooms_per_user=5, rate_per_second=0) as target:
        alice = await target.join("alice")
        for number in range(1, 10):  # with the lobby: ten rooms asked for
            await alice.say(f"/join r{number}")
        replies = await alice.sync()
        joined = [e["room"] for e in replies if e["type"] == "joined"]
        codes = {e["code"] for e in replies if e["type"] == "error"}
        print(f"\nATTACK 10 rooms asked, max_rooms_per_user=5: in {len(joined) + 1}")
        assert joined == ["r1", "r2", "r3", "r4"] and codes == {"too_many_rooms"}
        alice.quit()
        await wait_until(lambda: len(target.manager.rooms) == 1, "alice's rooms are gone")
