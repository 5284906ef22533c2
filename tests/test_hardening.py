"""Hardening: the limits and protections the README lists, one behaviour per test.

Every limit is shrunk by a `limits` marker so each test runs in milliseconds, and
every wait is on an event (or a polled condition) with a short deadline: a hang
fails, and nothing depends on how fast the machine is. Where a test has to look
inside the server (a connection's unsent output), it says so.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import re
import signal
import socket
import struct
import time

import pytest
import tornado.websocket
from conftest import WAIT_SECONDS, ChatClient, ChatServer, assert_graceful_stop, wait_until

import chat

# ---- helpers: waiting, reading transcripts, and a hand-made WebSocket peer ----


def messages(events: list[dict]) -> list[tuple[str, str]]:
    """The chat messages in a transcript, as (room, text)."""
    return [(event["room"], event["text"]) for event in events if event["type"] == "message"]


def system_events(events: list[dict]) -> list[dict]:
    """The system notices in a transcript."""
    return [event for event in events if event["type"] == "system"]


def connection_of(server: ChatServer, username: str) -> chat.ChatSocket:
    """White-box: the server's handler for a user's live connection."""
    return next(c for c in server.manager.connections if c.user and c.user.username == username)


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


OPCODE_TEXT, OPCODE_CLOSE, OPCODE_PING = 0x1, 0x8, 0x9
BATCH_MESSAGES = 50  # lines per flood batch: ~25 KB of frames per reader, under a 64 KiB backlog


class RawPeer:
    """A WebSocket peer made by hand on a bare TCP socket: it reads only when told, never answers.

    Tornado's own client reads and answers pings by itself, so a stalled or dead
    peer cannot be played with it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    @classmethod
    async def connect(cls, port: int, username: str, receive_buffer_bytes: int = 0) -> "RawPeer":
        """Open a TCP connection (with a small receive buffer, if asked) and do the handshake."""
        sock = socket.socket()
        sock.setblocking(False)
        if receive_buffer_bytes:  # before connecting, so the advertised window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET /ws?username={username} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await asyncio.get_running_loop().sock_sendall(sock, request.encode())
        peer = cls(sock)
        while b"\r\n\r\n" not in peer.buffer:
            assert await peer.receive(), "closed during the handshake"
        head, peer.buffer = peer.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        return peer

    async def receive(self) -> bool:
        """Read what the kernel has for us; False once the server has closed the socket."""
        chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), WAIT_SECONDS)
        self.buffer += chunk
        return bool(chunk)

    async def read_frame(self) -> tuple[int, bytes] | None:
        """The next frame from the server as (opcode, payload); None once the socket is closed."""
        while True:
            frame = self.parse_frame()
            if frame is not None:
                return frame
            if not await self.receive():
                return None

    def parse_frame(self) -> tuple[int, bytes] | None:
        """Take one whole (unmasked, server-to-client) frame off the buffer, if there is one."""
        if len(self.buffer) < 2:
            return None
        opcode, length, start = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
        if length >= 126:  # the real length follows, in 2 or 8 bytes
            size, form = (2, "!H") if length == 126 else (8, "!Q")
            if len(self.buffer) < 2 + size:
                return None
            length, start = struct.unpack(form, self.buffer[2:2 + size])[0], 2 + size
        if len(self.buffer) < start + length:
            return None
        payload, self.buffer = self.buffer[start:start + length], self.buffer[start + length:]
        return opcode, payload

    async def read_event(self) -> dict:
        """The next frame, which must be a text frame: one event, as JSON."""
        opcode, payload = await self.read_frame()
        assert opcode == OPCODE_TEXT, (opcode, payload)
        return json.loads(payload)

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        """Send one final, masked frame (clients must mask; payloads under 126 bytes)."""
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        frame = bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked
        await asyncio.get_running_loop().sock_sendall(self.sock, frame)

    def close(self) -> None:
        """Hang up without a close frame."""
        self.sock.close()


@pytest.fixture
def raw_peer(chat_server):
    """Connect hand-made peers to this test's server: `await raw_peer("dave")`; all hang up at the end."""
    peers = []

    async def connect(username: str, receive_buffer_bytes: int = 0) -> RawPeer:
        peers.append(await RawPeer.connect(chat_server.port, username, receive_buffer_bytes))
        return peers[-1]

    yield connect
    for peer in peers:
        peer.close()


def unsent_bytes(connection: chat.ChatSocket) -> int:
    """White-box: the output the server has queued for a connection but not yet handed to the kernel."""
    protocol = connection.ws_connection
    return len(protocol.stream._write_buffer or b"") if protocol is not None else 0


def message_frame_bytes(text: str, seq: int | None) -> int:
    """The size of the frame that relays a line of alice's in the lobby (timestamps have a fixed width)."""
    event = chat.message_event(chat.utc_timestamp(0), "alice", "lobby", text)
    if seq is not None:  # the full server numbers every message
        event["seq"] = seq
    return len(chat.websocket_text_frame(chat.Outbound(event).text.encode()))


def next_seq(echo: dict) -> int | None:
    """The `seq` the next message will carry, after this one (None where messages have none)."""
    return echo["seq"] + 1 if "seq" in echo else None


async def fill_backlog(alice, stalled: chat.ChatSocket, room_left: int) -> None:
    """alice chats until the stalled connection's backlog is exactly `room_left` bytes short of its cap.

    First whole batches while the kernel still takes everything, then one line at
    a time, and last one line sized to the byte. alice reads her echoes, so only
    the stalled connection falls behind.
    """
    cap = stalled.manager.limits.max_backlog
    while unsent_bytes(stalled) == 0:
        for _ in range(BATCH_MESSAGES):
            await alice.say("x" * 200)
        for _ in range(BATCH_MESSAGES):
            echo = await alice.expect("message")
    while cap - unsent_bytes(stalled) - message_frame_bytes("x" * 200, next_seq(echo)) >= 300 + room_left:
        await alice.say("x" * 200)
        echo = await alice.expect("message")
    overhead = message_frame_bytes("y" * 200, next_seq(echo)) - 200  # frame header and JSON around the text
    last_line = "y" * (cap - unsent_bytes(stalled) - room_left - overhead)
    await alice.say(last_line)
    await alice.expect("message")
    assert cap - unsent_bytes(stalled) == room_left, "the kernel took more meanwhile: cannot set up the test"


# ---- per-user rate limit (token bucket) ---------------------------------------------


@pytest.mark.limits(rate_per_second=0.001, rate_burst=5)
@pytest.mark.gen_test
async def test_a_burst_relays_exactly_rate_burst_lines_and_the_next_gets_rate_limited(chat_server):
    """Rate limit: `rate_burst` lines pass at once; the next gets `rate_limited` and `retry_after`."""
    alice = await chat_server.join("alice")
    await chat_server.join("bob")
    await alice.expect("system", event="join")  # bob joined
    for number in range(8):  # the burst and a few more (tests/test_attacks.py floods on)
        await alice.say(f"line {number}")
    replies = [await alice.next_event() for _ in range(6)]
    assert [reply["type"] for reply in replies] == ["message"] * 5 + ["error"]
    assert messages(replies) == [("lobby", f"line {number}") for number in range(5)]
    assert replies[5]["code"] == "rate_limited" and replies[5]["retry_after"] > 0


@pytest.mark.limits(rate_per_second=0.001, rate_burst=5)
@pytest.mark.gen_test
async def test_others_get_only_the_relayed_lines_of_a_flooder_who_is_closed_with_4029(chat_server):
    """Rate limit: refused lines are not relayed; a flooder is closed (4029); others chat on unaffected."""
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    await alice.expect("system", event="join")  # bob joined
    for number in range(200):
        await alice.say(f"line {number}")
    assert messages(await bob.sync()) == [("lobby", f"line {number}") for number in range(5)]
    await bob.say("still here")
    assert (await bob.expect("message"))["text"] == "still here"
    assert (await alice.closed())[0] == chat.CLOSE_FLOODING
    assert chat_server.manager.status()["users"] == ["bob"]


@pytest.mark.limits(rate_per_second=2, rate_burst=1)
@pytest.mark.gen_test
async def test_the_bucket_refills_at_rate_per_second(chat_server):
    """Rate limit: after `retry_after` seconds the user may send again."""
    clock = FakeClock()
    chat_server.manager.clock = clock  # the manager's injectable clock: time moves when we say
    alice = await chat_server.join("alice")
    await alice.say("one")
    assert (await alice.next_event())["type"] == "message"
    await alice.say("two")
    refusal = await alice.next_event()
    assert (refusal["type"], refusal["code"], refusal["retry_after"]) == ("error", "rate_limited", 0.5)
    clock.advance(0.5)
    await alice.say("three")
    assert (await alice.next_event())["text"] == "three"


# ---- idle timeout ------------------------------------------------------------------


@pytest.mark.limits(idle_timeout=0.2)
@pytest.mark.gen_test
async def test_a_silent_user_is_told_and_closed_with_4008_after_the_idle_timeout(chat_server):
    """Idle timeout: silent for `idle_timeout`, a user gets a `system` "idle", then close 4008."""
    alice = await chat_server.join("alice")
    notice = await alice.expect("system")
    assert notice["event"] == "idle"
    assert (await alice.closed())[0] == 4008


@pytest.mark.limits(idle_timeout=0.3, rate_per_second=0)
@pytest.mark.gen_test
async def test_a_user_who_keeps_talking_is_not_closed_for_idleness(chat_server):
    """Idle timeout: every line restarts the idle clock, so a talking user stays past many timeouts."""
    alice = await chat_server.join("alice")
    talk_until = time.monotonic() + 3 * chat_server.manager.limits.idle_timeout
    while time.monotonic() < talk_until:
        await alice.say("still here")
        assert (await alice.next_event())["type"] == "message"  # the echo, never an idle notice
        await asyncio.sleep(0.05)
    assert chat_server.manager.status()["users"] == ["alice"]


@pytest.mark.limits(idle_timeout=0)
@pytest.mark.gen_test
async def test_idle_timeout_0_switches_the_idle_timeout_off(chat_server):
    """Idle timeout: 0 means never; no idle timer is armed for a connection (white-box)."""
    alice = await chat_server.join("alice")
    assert connection_of(chat_server, "alice").idle_timer is None
    assert system_events(await alice.sync()) == []


# ---- keepalive -------------------------------------------------------------------------


@pytest.mark.limits(ping_interval=0.2)
@pytest.mark.gen_test
async def test_a_peer_that_does_not_answer_pings_is_dropped_and_its_session_held(chat_server, raw_peer):
    """Keepalive: a ping every `ping_interval`; a peer with no pong in time is closed."""
    alice = await chat_server.join("alice")  # Tornado's client answers pings by itself
    dave = await raw_peer("dave")  # never writes a byte: no pong, ever
    opcodes = []
    while (frame := await dave.read_frame()) is not None and frame[0] != OPCODE_CLOSE:
        opcodes.append(frame[0])
    assert frame is not None, "the server hung up without a close frame"
    assert opcodes[:2] == [OPCODE_TEXT, OPCODE_TEXT]  # welcome, joined
    assert set(opcodes[2:]) == {OPCODE_PING}
    dave.close()  # it did not answer pings, and it does not answer the close either
    await wait_until(lambda: chat_server.manager.status()["users"] == ["alice"], "dave is offline")
    assert chat_server.manager.status()["sessions_held"] == 1  # dave may come back and resume
    assert [notice["event"] for notice in system_events(await alice.sync())] == ["join"]  # no "leave" yet


# ---- room capacity and total connections ------------------------------------------------


@pytest.mark.limits(room_capacity=2)
@pytest.mark.gen_test
async def test_a_full_room_refuses_one_more_member_with_room_full(chat_server):
    """Room capacity: /join to a room of `room_capacity` members gets `room_full`, naming the limit."""
    alice, bob, carol = [await chat_server.join(name) for name in ("alice", "bob", "carol")]
    for member in (alice, bob):
        await member.say("/join dev")
        assert (await member.expect("joined"))["room"] == "dev"
    await carol.say("/join dev")
    refusal = await carol.expect("error")
    assert refusal["code"] == "room_full" and "2" in refusal["text"]
    await carol.say("/users")
    assert (await carol.expect("users"))["room"] == "lobby"  # carol stays where she was


@pytest.mark.limits(room_capacity=2)
@pytest.mark.gen_test
async def test_the_lobby_is_exempt_from_room_capacity(chat_server):
    """Room capacity: everyone joins the lobby on connect, however many they are."""
    for name in ("alice", "bob", "carol"):
        assert (await chat_server.join(name)).welcome["room"] == "lobby"
    assert chat_server.manager.status()["rooms"] == [{"name": "lobby", "users": 3}]


@pytest.mark.limits(max_connections=2)
@pytest.mark.gen_test
async def test_one_connection_over_max_connections_is_refused_with_server_full_and_4003(chat_server):
    """Total connections: one over `max_connections` gets `server_full` (naming the limit), close 4003."""
    await chat_server.join("alice")
    await chat_server.join("bob")
    carol = await chat_server.connect("carol")
    refusal = await carol.expect("error")
    assert refusal["code"] == "server_full" and "2" in refusal["text"]
    assert (await carol.closed())[0] == 4003


# ---- slow consumers ------------------------------------------------------------------------


@pytest.mark.limits(rate_per_second=0, max_backlog=64 * 1024)
@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_stops_reading_is_dropped_its_backlog_bounded_and_others_get_everything(
        chat_server, raw_peer):
    """Slow consumer: unsent output over `max_backlog` gets a member dropped; others lose nothing."""
    alice = await chat_server.join("alice")
    carol = await chat_server.join("carol")
    await raw_peer("dave", receive_buffer_bytes=4096)  # dave never reads again
    await wait_until(lambda: "dave" in chat_server.manager.status()["users"], "dave is online")
    await alice.sync()
    await carol.sync()

    # White-box: measure dave's unsent output after every write the server makes to him.
    daves = connection_of(chat_server, "dave")
    stream, peak = daves.ws_connection.stream, [0]

    def measured_write(data, write=stream.write):
        try:
            return write(data)
        finally:
            peak[0] = max(peak[0], len(stream._write_buffer or b""))

    stream.write = measured_write

    # alice floods in batches; alice and carol read each batch before the next, so only dave falls behind
    sent, sent_when_dropped, padding = 0, None, "x" * 393
    while sent_when_dropped is None or sent < sent_when_dropped + 3 * BATCH_MESSAGES:
        assert sent < 20_000, "dave was never dropped, after 8 MB"
        for _ in range(BATCH_MESSAGES):
            await alice.say(f"{sent:06d} {padding}")
            sent += 1
        for reader in (alice, carol):
            batch = [await reader.expect("message") for _ in range(BATCH_MESSAGES)]
            expected = [("lobby", f"{n:06d} {padding}") for n in range(sent - BATCH_MESSAGES, sent)]
            assert messages(batch) == expected
        if sent_when_dropped is None and daves.ws_connection is None:  # the server let go of it
            sent_when_dropped = sent

    assert peak[0] <= 64 * 1024 + 128  # the backlog, plus dave's close frame queued behind it
    await carol.sync()
    leaves = [e for e in carol.received if e["type"] == "system" and e["event"] == "leave"]
    assert [e["username"] for e in leaves] == ["dave"]  # told at once, not after Tornado's 5 s close wait
    assert chat_server.manager.status()["users"] == ["alice", "carol"]
    assert chat_server.manager.status()["rooms"] == [{"name": "lobby", "users": 2}]


@pytest.mark.parametrize("lesson", [1], ids=["part1"])
@pytest.mark.limits(max_backlog=64 * 1024)
@pytest.mark.gen_test(timeout=30)
async def test_part_one_drops_a_client_that_stops_reading_and_logs_no_error(chat_server, raw_peer, caplog):
    """Part I's plain write_message() send keeps the same bound, and writes cut short are not errors."""
    alice = await chat_server.join("alice")
    await raw_peer("dave", receive_buffer_bytes=4096)  # dave never reads again
    await wait_until(lambda: "dave" in chat_server.manager.status()["users"], "dave is online")
    daves, sent = connection_of(chat_server, "dave"), 0
    while "dave" in chat_server.manager.status()["users"]:
        assert sent < 20_000, "dave was never dropped, after 8 MB"
        for _ in range(BATCH_MESSAGES):
            await alice.say(f"{sent:06d} {'x' * 393}")
            sent += 1
        for _ in range(BATCH_MESSAGES):
            await alice.expect("message")
    await asyncio.wait_for(daves.gone, 10)  # Tornado waits up to 5 s for dave's close reply
    await asyncio.sleep(0.1)  # the unfinished writes fail now ...
    gc.collect()  # ... and asyncio would log them as it frees them
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


@pytest.mark.limits(max_backlog=0)
@pytest.mark.gen_test
async def test_max_backlog_0_switches_the_backlog_bound_off(chat_server):
    """Flags: every limit has a flag and 0 switches it off; a backlog bound of 0 drops nobody."""
    alice = await chat_server.join("alice")
    await alice.say("hello")
    assert (await alice.expect("message"))["text"] == "hello"


# ---- session resume ---------------------------------------------------------------------------


async def drop_and_wait(server: ChatServer, client) -> None:
    """The client vanishes; return once the server has noticed and holds the session."""
    client.drop()
    await wait_until(lambda: client.username not in server.manager.status()["users"], "the server noticed")


@pytest.mark.gen_test
async def test_a_dropped_user_resumes_with_the_token_keeping_name_rooms_and_current_room(chat_server):
    """Resume: reconnecting with the token within the grace restores username, rooms and current room."""
    alice = await chat_server.join("alice")
    await alice.say("/join dev")
    await alice.expect("joined")
    await drop_and_wait(chat_server, alice)
    again = await chat_server.join("alice", token=alice.welcome["token"])
    assert {key: again.welcome[key] for key in ("username", "room", "rooms", "resumed")} == {
        "username": "alice", "room": "dev", "rooms": ["lobby", "dev"], "resumed": True}
    assert chat_server.manager.status()["rooms"] == [{"name": "dev", "users": 1},
                                                     {"name": "lobby", "users": 1}]


@pytest.mark.gen_test
async def test_others_see_no_leave_or_join_for_a_resumed_blip(chat_server):
    """Resume: a drop and a resume within the grace make no join/leave noise for the others."""
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    await drop_and_wait(chat_server, alice)
    await chat_server.join("alice", token=alice.welcome["token"])
    assert system_events(await bob.sync()) == []


@pytest.mark.gen_test
async def test_messages_sent_during_the_gap_are_replayed_on_resume_in_order(chat_server):
    """Resume: what the user's rooms said meanwhile follows welcome and joined: replayed, in order."""
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    for user in (alice, bob):
        await user.say("/join dev")
        await user.expect("joined")
    await drop_and_wait(chat_server, alice)
    await bob.say("one, in dev")
    await bob.say("/join lobby")
    await bob.say("two, in the lobby")
    await bob.sync()
    again = await chat_server.join("alice", token=alice.welcome["token"])
    assert again.welcome["missed"] == 2
    replayed = await again.sync()
    assert messages(replayed) == [("dev", "one, in dev"), ("lobby", "two, in the lobby")]
    assert all(event["replayed"] is True for event in replayed if event["type"] == "message")


@pytest.mark.gen_test
async def test_missed_messages_are_replayed_once(chat_server):
    """Resume: a second resume replays nothing that the first one already replayed."""
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    await drop_and_wait(chat_server, alice)
    await bob.say("while you were out")
    await bob.sync()
    again = await chat_server.join("alice", token=alice.welcome["token"])
    assert messages(await again.sync()) == [("lobby", "while you were out")]
    await drop_and_wait(chat_server, again)
    third = await chat_server.join("alice", token=again.welcome["token"])  # each token works once
    assert third.welcome["missed"] == 0
    assert messages(await third.sync()) == []


@pytest.mark.limits(rate_per_second=0)
@pytest.mark.gen_test
async def test_replay_is_bounded_to_the_last_100_messages(chat_server):
    """Resume: at most REPLAY_LIMIT_MESSAGES (100) missed messages are kept, the newest."""
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    await drop_and_wait(chat_server, alice)
    for number in range(150):
        await bob.say(f"line {number}")
    await bob.sync()
    again = await chat_server.join("alice", token=alice.welcome["token"])
    assert again.welcome["missed"] == chat.REPLAY_LIMIT_MESSAGES == 100
    assert messages(await again.sync()) == [("lobby", f"line {number}") for number in range(50, 150)]


@pytest.mark.limits(resume_grace=0.2)
@pytest.mark.gen_test
async def test_when_the_grace_runs_out_the_room_is_told_and_the_name_is_free(chat_server):
    """Resume grace: when it expires the user leaves for good: others get a "leave", the name can be taken."""
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    alice.drop()
    notice = await bob.expect("system")
    assert (notice["event"], notice["username"]) == ("leave", "alice")
    assert chat_server.manager.status()["sessions_held"] == 0
    assert (await chat_server.join("alice")).welcome["resumed"] is False


@pytest.mark.limits(resume_grace=0.2)
@pytest.mark.gen_test
async def test_after_the_grace_the_token_is_refused_with_bad_token_and_4004(chat_server):
    """Resume grace: an expired token is unknown: `error` `bad_token`, then close 4004."""
    alice = await chat_server.join("alice")
    alice.drop()
    await wait_until(lambda: chat_server.manager.status()["sessions_held"] == 0
                     and not chat_server.manager.status()["users"], "alice's session expired")
    late = await chat_server.connect("alice", token=alice.welcome["token"])
    assert (await late.expect("error"))["code"] == "bad_token"
    assert (await late.closed())[0] == 4004


@pytest.mark.gen_test
async def test_a_token_from_before_a_restart_is_logged_as_a_return_not_a_refusal(chat_server, caplog):
    """After a restart, returning clients are logged as what they are: "alice came back after a restart"."""
    caplog.set_level("INFO", logger="chat")
    earlier_run = chat.SessionStore(chat.CrowdLimits()).new_token()  # another run of the server issued it
    alice = await chat_server.connect("alice", token=earlier_run)
    assert (await alice.expect("error"))["code"] == "bad_token"  # the client then logs in afresh
    await alice.closed()
    lines = [record.getMessage() for record in caplog.records if record.name == "chat"]
    assert any(line.startswith("alice came back after a restart from ") for line in lines)
    assert not any("refused bad_token" in line for line in lines)


@pytest.mark.limits(resume_grace=0.2)
@pytest.mark.gen_test
async def test_an_expired_token_of_this_run_is_logged_as_a_refusal(chat_server, caplog):
    """A token this run issued and forgot is a refusal in the log, not a restart."""
    caplog.set_level("INFO", logger="chat")
    alice = await chat_server.join("alice")
    alice.drop()
    await wait_until(lambda: chat_server.manager.status()["sessions_held"] == 0
                     and not chat_server.manager.status()["users"], "alice's session expired")
    late = await chat_server.connect("alice", token=alice.welcome["token"])
    await late.closed()
    assert any("refused bad_token" in record.getMessage() for record in caplog.records)


@pytest.mark.gen_test
async def test_a_wrong_token_is_refused_with_bad_token_and_4004(chat_server):
    """Resume: a token the server never issued gets `error` `bad_token`, then close 4004."""
    alice = await chat_server.join("alice")
    await drop_and_wait(chat_server, alice)
    impostor = await chat_server.connect("alice", token="not-the-token-" + "x" * 20)
    assert (await impostor.expect("error"))["code"] == "bad_token"
    assert (await impostor.closed())[0] == 4004


@pytest.mark.gen_test
async def test_a_held_name_is_refused_to_a_connection_without_the_token(chat_server):
    """Resume: while a session is held, its username is taken: `username_taken`, close 4002."""
    alice = await chat_server.join("alice")
    await drop_and_wait(chat_server, alice)
    other = await chat_server.connect("alice")
    assert (await other.expect("error"))["code"] == "username_taken"
    assert (await other.closed())[0] == 4002


@pytest.mark.gen_test
async def test_a_second_connection_with_the_token_takes_over_and_the_first_is_closed_with_4010(chat_server):
    """Resume: a newer connection with the token takes over from a half-open older one, closed with 4010."""
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    newer = await chat_server.join("alice", token=alice.welcome["token"])
    assert newer.welcome["resumed"] is True
    assert (await alice.closed())[0] == 4010
    await bob.say("hello alice")
    assert (await newer.expect("message"))["text"] == "hello alice"
    assert system_events(await bob.sync()) == []


@pytest.mark.gen_test
async def test_a_polite_quit_ends_the_session_at_once(chat_server):
    """Resume: a close frame (/quit) is a real goodbye: others are told at once and the name is free."""
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    alice.quit()
    notice = await bob.expect("system")  # well before the 30 s grace
    assert (notice["event"], notice["username"]) == ("leave", "alice")
    assert chat_server.manager.status()["sessions_held"] == 0
    assert (await chat_server.join("alice")).welcome["resumed"] is False


@pytest.mark.limits(rate_per_second=0, max_backlog=64 * 1024, max_message_length=1000)
@pytest.mark.gen_test(timeout=20)
async def test_a_takeover_succeeds_even_when_the_old_connection_has_a_nearly_full_backlog(
        chat_server, raw_peer):
    """Resume: the half-open connection being replaced may have a full backlog; the newer one gets in."""
    alice = await chat_server.join("alice")
    dave = await raw_peer("dave", receive_buffer_bytes=4096)
    token = (await dave.read_event())["token"]
    await dave.read_event()  # joined; dave reads nothing more: his laptop lid is closed
    await alice.expect("system", event="join")
    await fill_backlog(alice, connection_of(chat_server, "dave"), room_left=10)  # no room for a close frame
    newer = await chat_server.join("dave", token=token)
    assert newer.welcome["resumed"] is True
    await alice.say("welcome back")
    assert (await newer.expect("message"))["text"] == "welcome back"


@pytest.mark.gen_test
async def test_a_close_frame_without_a_code_ends_the_session_at_once(chat_server):
    """A browser's plain ws.close() sends a close frame with no code: that is a goodbye, not a dropped line."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    bob.ws.close()  # Tornado's client, like a browser, sends an empty close frame
    notice = await alice.expect("system", event="leave")
    assert (notice["username"], "quit" in notice["text"]) == ("bob", True)
    assert chat_server.manager.status()["sessions_held"] == 0


@pytest.mark.gen_test
async def test_a_replaced_connection_can_no_longer_speak_for_its_user(chat_server, raw_peer):
    """After a takeover (4010) the old connection's frames are ignored: nobody can chat as a user from it."""
    old = await raw_peer("alice")
    token = (await old.read_event())["token"]
    bob = await chat_server.join("bob")
    new = await chat_server.join("alice", token=token)
    await old.send_frame(OPCODE_TEXT, b"sent from the replaced connection")
    await new.say("sent from the new one")
    texts = [e["text"] for e in await bob.sync() if e["type"] == "message"]
    assert texts == ["sent from the new one"]


@pytest.mark.gen_test
async def test_a_username_that_is_not_utf8_is_refused_with_4001(chat_server):
    """A query string that does not decode gets error `bad_username` and close 4001, not a server error."""
    ws = await tornado.websocket.websocket_connect(chat_server.url() + "?username=%FF%FE")
    raw = ChatClient(ws, "?")
    error = await raw.expect("error")
    assert (error["code"], (await raw.closed())[0]) == ("bad_username", chat.CLOSE_BAD_USERNAME)


@pytest.mark.gen_test
async def test_a_login_during_shutdown_is_told_goodbye_with_1001(chat_server):
    """Once shutdown has begun, a late handshake gets the shutdown notice and 1001, not a welcome."""
    chat_server.manager.closing = True
    late = await chat_server.connect("late")
    notice = await late.next_event()
    assert (notice["type"], notice["event"]) == ("system", "shutdown")
    assert (await late.closed())[0] == chat.CLOSE_GOING_AWAY


@pytest.mark.limits(max_connections=1)
@pytest.mark.gen_test
async def test_held_sessions_do_not_count_toward_max_connections(chat_server):
    """Dropped users waiting for resume cannot fill the server: only users online count."""
    alice = await chat_server.join("alice")
    alice.drop()
    await wait_until(lambda: chat_server.manager.status()["sessions_held"] == 1, "alice is held")
    bob = await chat_server.join("bob")
    assert bob.welcome["username"] == "bob"


# ---- graceful shutdown ---------------------------------------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="Windows cannot send SIGTERM or Ctrl-C to one process "
                                           "(test_platforms.py stops the server with Ctrl-Break there)")
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.gen_test(timeout=20)
async def test_a_signal_tells_every_client_closes_with_1001_and_exits_0(chat_process, signal_number):
    """Shutdown: on SIGTERM or Ctrl-C every client gets `system` "shutdown", close 1001; exit code 0."""
    process, port = chat_process()
    await assert_graceful_stop(process, port, lambda process: process.send_signal(signal_number))


# ---- churn ---------------------------------------------------------------------------------------


async def status_over_http(http_client, server: ChatServer) -> dict:
    """GET /status on the chat server's port, as JSON."""
    response = await http_client.fetch(f"http://127.0.0.1:{server.port}/status")
    assert response.headers["Content-Type"].startswith("application/json")
    return json.loads(response.body)


@pytest.mark.limits(resume_grace=0.05)
@pytest.mark.gen_test(timeout=30)
async def test_hundreds_of_connects_and_disconnects_leave_nothing_behind(chat_server, http_client):
    """Churn: 300 users come and go (dropped or quit); no connection, user, room or session remains."""

    async def come_and_go(number: int) -> None:
        user = await chat_server.join(f"user{number}")
        if number % 3 == 0:
            await user.say(f"/join room{number % 7}")
            await user.expect("joined")
        if number % 5 == 0:
            await user.say("hello")
            await user.expect("message")
        user.drop() if number % 2 else user.quit()

    for wave in range(0, 300, 10):
        await asyncio.gather(*(come_and_go(number) for number in range(wave, wave + 10)))
    manager = chat_server.manager
    await wait_until(lambda: manager.status()["connections"] == 0 and manager.status()["sessions_held"] == 0,
                     "every connection closed and every held session expired")
    status = await status_over_http(http_client, chat_server)
    assert (status["connections"], status["users"], status["sessions_held"]) == (0, [], 0)
    assert status["rooms"] == [{"name": "lobby", "users": 0}]


# ---- bounded frames -------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_frame_over_max_frame_bytes_is_closed_with_1009_and_others_keep_chatting(chat_server):
    """Bounded frames: a frame over `max_frame_bytes` closes its connection with 1009; others chat on."""
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    await alice.say("x" * (chat_server.manager.limits.max_frame_bytes + 1))
    assert (await alice.closed())[0] == 1009
    await bob.say("still here")
    assert (await bob.expect("message"))["text"] == "still here"


@pytest.mark.gen_test
async def test_a_frame_of_exactly_max_frame_bytes_is_read_and_refused_as_too_long(chat_server):
    """Bounded frames: a frame at the limit is read, then refused by the length rule; the user stays."""
    alice = await chat_server.join("alice")
    await alice.say("x" * chat_server.manager.limits.max_frame_bytes)
    assert (await alice.expect("error"))["code"] == "message_too_long"
    await alice.say("short")
    assert (await alice.expect("message"))["text"] == "short"


@pytest.mark.gen_test
async def test_a_binary_frame_is_refused_with_binary_frame_and_the_connection_stays_usable(chat_server):
    """Bounded frames: binary frames are not chat: `error` `binary_frame`, and the user chats on."""
    alice = await chat_server.join("alice")
    await alice.ws.write_message(b"\x00\x01\x02", binary=True)
    assert (await alice.expect("error"))["code"] == "binary_frame"
    await alice.say("hello")
    assert (await alice.expect("message"))["text"] == "hello"


@pytest.mark.limits(max_message_length=0)
@pytest.mark.gen_test
async def test_max_message_length_0_switches_the_length_limit_off(chat_server):
    """Flags: every limit has a flag and 0 switches it off; with no length limit, a long line is relayed."""
    alice = await chat_server.join("alice")
    await alice.say("x" * 1000)  # still well under the frame limit
    assert (await alice.next_event())["text"] == "x" * 1000


@pytest.mark.gen_test
async def test_a_connection_that_never_completes_its_handshake_is_dropped():
    """Half-finished handshakes cannot hold sockets for long: the server closes them after the timeout."""
    server, manager, port = chat.serve(chat.CrowdLimits(handshake_timeout=0.2), 0, "127.0.0.1")
    try:
        loop = asyncio.get_running_loop()
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"GET /ws?username=slow HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            stalled.setblocking(False)
            closed = await asyncio.wait_for(loop.sock_recv(stalled, 1024), WAIT_SECONDS)
        assert closed == b""  # the server hung up; no user was ever created
        assert manager.status()["users"] == []
    finally:
        server.stop()


# ---- status endpoint -------------------------------------------------------------------------------


@pytest.mark.limits(room_capacity=7)
@pytest.mark.gen_test
async def test_get_status_reports_connections_users_rooms_uptime_and_limits(chat_server, http_client):
    """Status: GET /status is JSON: connections, users, rooms with member counts, uptime_seconds, limits."""
    alice = await chat_server.join("alice")
    await chat_server.join("bob")
    await alice.say("/join dev")
    await alice.expect("joined")
    status = await status_over_http(http_client, chat_server)
    assert (status["connections"], status["users"]) == (2, ["alice", "bob"])
    assert status["rooms"] == [{"name": "dev", "users": 1}, {"name": "lobby", "users": 2}]
    assert isinstance(status["uptime_seconds"], (int, float)) and status["uptime_seconds"] >= 0
    assert status["limits"]["room_capacity"] == 7
    assert status["limits"]["max_connections"] == chat.CrowdLimits().max_connections


# ---- logging ---------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_access_log_never_shows_a_resume_token(chat_server, http_client, caplog):
    """Logging: tokens travel in query strings, and the access log leaves query strings out."""
    caplog.set_level(logging.INFO)
    alice = await chat_server.join("alice")
    token = alice.welcome["token"]
    await drop_and_wait(chat_server, alice)
    await chat_server.join("alice", token=token)
    await http_client.fetch(f"http://127.0.0.1:{chat_server.port}/status?token={token}")
    plain = await http_client.fetch(f"http://127.0.0.1:{chat_server.port}/ws?username=alice&token={token}",
                                    raise_error=False)  # not a WebSocket upgrade: refused
    assert plain.code == 400
    access = [record.getMessage() for record in caplog.records if record.name == "tornado.access"]
    assert any("GET /status" in line for line in access) and any("GET /ws" in line for line in access)
    assert token not in caplog.text


@pytest.mark.gen_test
async def test_connect_disconnect_and_message_log_lines_show_the_live_connection_count(chat_server, caplog):
    """Logging: one line per connect, disconnect and message, each with the number of live connections."""
    caplog.set_level(logging.INFO, logger="chat")
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    await alice.say("hello")
    await alice.expect("message")
    bob.quit()
    await wait_until(lambda: chat_server.manager.status()["connections"] == 1, "bob's connection closed")
    lines = [record.getMessage() for record in caplog.records if record.name == "chat"]
    counted = [(line.split()[0], int(re.search(r"\(connections: (\d+)\)$", line)[1])) for line in lines]
    assert counted == [("connect", 1), ("connect", 2), ("#lobby", 2), ("disconnect", 1)]


@pytest.mark.gen_test
async def test_a_bug_while_serving_a_resumed_user_is_logged_with_a_traceback_but_not_the_token(
        chat_server, caplog, monkeypatch):
    """Logging: a bug closes only its own connection, logged with a traceback but not the URL's token."""
    caplog.set_level(logging.INFO)
    alice = await chat_server.join("alice")
    bob = await chat_server.join("bob")
    await drop_and_wait(chat_server, alice)
    again = await chat_server.join("alice", token=alice.welcome["token"])

    def broken_handle_line(user, line):
        raise RuntimeError("a bug in handle_line")

    monkeypatch.setattr(chat_server.manager, "handle_line", broken_handle_line)  # plant a bug
    await again.say("hello")
    await again.closed()
    monkeypatch.undo()
    await bob.say("still here")
    assert (await bob.expect("message"))["text"] == "still here"
    assert any(record.exc_info and record.exc_info[0] is RuntimeError for record in caplog.records)
    assert alice.welcome["token"] not in caplog.text


@pytest.mark.limits(rate_per_second=0, room_budget=400, server_budget=60)
@pytest.mark.gen_test
async def test_busy_rooms_share_the_server_budget_and_a_quiet_room_is_never_refused_for_it(chat_server):
    """Server budget: rooms that spent half their own bucket share --server-budget; a quiet room does not."""
    chat_server.manager.clock = FakeClock()  # no refills during the test
    members = [await chat_server.join(name) for name in ("alice", "bob", "carol", "dave")]
    for member in members:
        await member.say("/join busy")
        await member.expect("joined", room="busy")
    erin = await chat_server.join("erin")
    await erin.say("/join quiet")
    await erin.expect("joined", room="quiet")
    for number in range(8):  # 4 deliveries each: the room's bucket (40) is half spent after 5
        await members[0].say(f"spam {number}")
    refusals = [event["text"] for event in await members[0].sync() if event["type"] == "error"]
    assert refusals and all("the server is busy" in text for text in refusals)
    await erin.say("the quiet room is fine")
    assert (await erin.expect("message"))["text"] == "the quiet room is fine"
