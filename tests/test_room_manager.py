"""The room manager alone, without sockets: a hypothesis state machine checks its invariants.

Random sequences of connect, join, leave, send, disconnect (polite or abrupt),
resume and grace expiry must keep the rules the README states: everyone is in at least
one room, the lobby exists, no empty room other than the lobby survives, and a
message reaches the members of its room and nobody else.
"""

import ast
import inspect
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import chat

NAMES = ["alice", "Bob", "carol", "dave", "ALICE"]
ROOMS = ["lobby", "general", "#General", "games", "homework"]


class RecordingConnection:
    """A stand-in connection that keeps every event it is sent."""

    address, last_seq, vanished = None, None, False  # no socket: no address group, nothing seen yet

    def __init__(self):
        self.events: list[dict] = []
        self.closed_with: int | None = None

    def send(self, outbound: chat.Outbound) -> None:
        """Record the event (decoded from its JSON, as a client would see it)."""
        self.events.append(chat.json.loads(outbound.text))

    def close(self, code: int, reason: str) -> None:
        """Record the close code."""
        self.closed_with = code

    def hang_up(self, code: int, reason: str) -> None:
        """Record the close code (a hang-up does not wait for the client)."""
        self.closed_with = code


class ManualTimers:
    """call_later that waits for the test to fire a timer by hand."""

    def __init__(self):
        self.pending: list[ManualTimer] = []

    def call_later(self, delay: float, callback) -> "ManualTimer":
        """Remember the callback; the test fires it when it likes."""
        timer = ManualTimer(callback)
        self.pending.append(timer)
        return timer


class ManualTimer:
    """A timer handle with asyncio's cancel()."""

    def __init__(self, callback):
        self.callback, self.cancelled = callback, False

    def cancel(self) -> None:
        """Stop the timer from firing."""
        self.cancelled = True


class RoomManagerMachine(RuleBasedStateMachine):
    """Drives one RoomManager with random steps and checks the chat rules (invariants) after each."""

    def __init__(self):
        super().__init__()
        self.timers = ManualTimers()
        limits = chat.CrowdLimits(rate_per_second=0, room_capacity=3, max_connections=4)
        self.manager = chat.CrowdRoomManager(limits, call_later=self.timers.call_later)
        self.connections: dict[str, RecordingConnection] = {}  # live ones, by folded name
        self.sent = 0

    def online(self) -> list[chat.User]:
        """Users with a live connection."""
        return [user for user in self.manager.users.values() if user.connection is not None]

    @rule(name=st.sampled_from(NAMES))
    def connect(self, name):
        """A user connects; a taken name or a full server is refused."""
        connection = RecordingConnection()
        taken = chat.fold(name) in self.manager.users
        full = len(self.online()) >= self.manager.limits.max_connections  # held sessions do not count
        try:
            user = self.manager.connect(name, None, connection)
        except chat.Refusal as refusal:
            assert refusal.code == ("username_taken" if taken else "server_full")
            assert taken or full
            return
        assert not taken and not full
        assert user.rooms == ["lobby"] and connection.events[0]["type"] == "welcome"
        self.connections[chat.fold(name)] = connection

    @precondition(lambda self: self.online())
    @rule(data=st.data(), room=st.sampled_from(ROOMS))
    def join(self, data, room):
        """An online user runs /join."""
        user = data.draw(st.sampled_from(self.online()))
        self.manager.handle_line(user, f"/join {room}")

    @precondition(lambda self: self.online())
    @rule(data=st.data())
    def leave(self, data):
        """An online user runs /leave."""
        self.manager.handle_line(data.draw(st.sampled_from(self.online())), "/leave")

    @precondition(lambda self: self.online())
    @rule(data=st.data())
    def send(self, data):
        """An online user says something: exactly the room's members get it."""
        user = data.draw(st.sampled_from(self.online()))
        room = self.manager.rooms[user.current_room]
        self.sent += 1
        text = f"message {self.sent}"
        before = {key: len(c.events) for key, c in self.connections.items()}
        self.manager.handle_line(user, text)
        for key, connection in self.connections.items():
            got = [e for e in connection.events[before[key]:] if e["type"] == "message"]
            should = key in room.members and room.members[key].connection is connection
            assert [e["text"] for e in got] == ([text] if should else [])

    @precondition(lambda self: self.online())
    @rule(data=st.data(), abrupt=st.booleans())
    def disconnect(self, data, abrupt):
        """A connection ends: abrupt ones are held for resume, polite ones end the session."""
        user = data.draw(st.sampled_from(self.online()))
        connection = self.connections.pop(chat.fold(user.username))
        connection.vanished = abrupt
        self.manager.disconnect(user, connection, reason="test")
        assert (chat.fold(user.username) in self.manager.users) == abrupt

    @precondition(lambda self: any(u.connection is None for u in self.manager.users.values()))
    @rule(data=st.data())
    def resume(self, data):
        """A held user comes back with the token, to the same rooms."""
        held = [user for user in self.manager.users.values() if user.connection is None]
        user = data.draw(st.sampled_from(held))
        rooms, connection = list(user.rooms), RecordingConnection()
        assert self.manager.connect(user.username, user.token, connection) is user
        assert connection.events[0]["resumed"] is True and user.rooms == rooms
        self.connections[chat.fold(user.username)] = connection

    @precondition(lambda self: any(not t.cancelled for t in self.timers.pending))
    @rule(data=st.data())
    def grace_runs_out(self, data):
        """A resume grace timer fires."""
        timer = data.draw(st.sampled_from([t for t in self.timers.pending if not t.cancelled]))
        self.timers.pending.remove(timer)
        timer.callback()

    @invariant()
    def lobby_exists(self):
        """`lobby` always exists."""
        assert "lobby" in self.manager.rooms

    @invariant()
    def everyone_is_in_a_room_and_rooms_agree(self):
        """Every user is in at least one room, its current room among them, and rooms list them back."""
        for key, user in self.manager.users.items():
            assert user.rooms and user.current_room in user.rooms
            assert len(set(user.rooms)) == len(user.rooms)
            for room_name in user.rooms:
                assert self.manager.rooms[room_name].members[key] is user
        for room in self.manager.rooms.values():
            for key, member in room.members.items():
                assert self.manager.users[key] is member and room.name in member.rooms

    @invariant()
    def the_online_count_matches_the_users_with_a_connection(self):
        """The manager's running count of online users is never off."""
        assert self.manager.online_count() == len(self.online())

    @invariant()
    def no_empty_room_but_the_lobby(self):
        """A room other than the lobby disappears when its last member leaves."""
        assert all(room.members or name == "lobby" for name, room in self.manager.rooms.items())

    @invariant()
    def rooms_respect_capacity_and_sessions_match_users(self):
        """No room but the lobby exceeds its capacity; every user has exactly one session token."""
        capacity = self.manager.limits.room_capacity
        assert all(len(room.members) <= capacity for name, room in self.manager.rooms.items() if name != "lobby")
        assert {user.token for user in self.manager.users.values()} == set(self.manager.sessions.by_token)


RoomManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_room_manager_keeps_its_invariants = RoomManagerMachine.TestCase


@pytest.mark.parametrize("typed, stored", [
    ("general", "general"), ("#General", "general"), ("  #x-y_z ", "x-y_z"), ("a" * 32, "a" * 32),
    ("", None), ("#", None), ("a" * 33, None), ("two words", None), ("caf\u00e9", None), ("##x", None),
])
def test_room_names_are_parsed_to_their_stored_form(typed, stored):
    """Rooms: 1-32 ASCII letters, digits, _ or -, lower-case; one leading # dropped."""
    assert chat.parse_room_name(typed) == stored


@pytest.mark.parametrize("name, valid", [
    ("a", True), ("Bob_the-2nd", True), ("x" * 20, True),
    ("", False), ("x" * 21, False), ("with space", False), ("émile", False), ("a.b", False),
])
def test_usernames_are_checked_against_the_rules(name, valid):
    """Usernames: 1-20 ASCII letters, digits, _ or -."""
    assert chat.is_valid_username(name) is valid


@pytest.mark.parametrize("line, parsed", [
    ("/join general", ("join", "general")), ("/JOIN  #x ", ("join", "#x")), ("/leave", ("leave", "")),
    ("hello", None), ("//not a command", None), ("", None), (" /join x", None),
])
def test_command_lines_are_split_into_name_and_argument(line, parsed):
    """A line starting with one / is a command; everything else is chat text."""
    assert chat.parse_command(line) == parsed


@pytest.mark.parametrize("now, tokens_before, retry_after", [
    (0.0, 2.0, 0.0),  # a token is there: allowed
    (0.0, 0.0, 0.5),  # empty: one token takes 1 / rate = 0.5 s
    (0.25, 0.0, 0.25),  # half refilled: a quarter second to go
    (10.0, 0.0, 0.0),  # long quiet: refilled (capped at the burst)
])
def test_the_token_bucket_allows_a_burst_then_the_rate(now, tokens_before, retry_after):
    """Each line takes a token; tokens come back at rate_per_second up to the burst."""
    bucket = chat.TokenBucket(rate_per_second=2.0, burst=3, tokens=tokens_before, updated_at=0.0)
    assert bucket.take(now) == pytest.approx(retry_after)


def test_the_token_bucket_never_holds_more_than_the_burst():
    """After any quiet time, at most `burst` lines go through at once."""
    bucket = chat.TokenBucket(rate_per_second=2.0, burst=3, tokens=0.0, updated_at=0.0)
    allowed = [bucket.take(100.0) == 0.0 for _ in range(5)]
    assert allowed == [True, True, True, False, False]


@pytest.mark.parametrize("length, header", [
    (0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"), (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_text_frames_use_the_shortest_length_encoding(length, header):
    """RFC 6455: 7-bit lengths up to 125, 16-bit up to 65535, 64-bit beyond; never masked."""
    frame = chat.websocket_text_frame(b"x" * length)
    assert frame[: len(header)] == header and len(frame) == len(header) + length


@pytest.mark.parametrize("now, text", [
    (0.0, "1970-01-01T00:00:00.000Z"), (1764100084.1234, "2025-11-25T19:48:04.123Z"),
])
def test_timestamps_are_iso8601_utc_with_milliseconds(now, text):
    """Every timestamp is ISO 8601, UTC, with milliseconds."""
    assert chat.utc_timestamp(now) == text


@settings(max_examples=300, deadline=None)
@given(line=st.text(max_size=600))
@example(line="/\x1b[2Jboom")
@example(line="/join \u202e")
def test_any_typed_line_gets_exactly_one_answer_and_never_breaks_the_manager(line):
    """Bad input of any kind is refused with an error for that user only; nothing raises."""
    manager = chat.CrowdRoomManager(chat.CrowdLimits(rate_per_second=0), call_later=ManualTimers().call_later)
    alice, bob = RecordingConnection(), RecordingConnection()
    user = manager.connect("alice", None, alice)
    manager.connect("bob", None, bob)
    before_alice, before_bob = len(alice.events), len(bob.events)
    manager.handle_line(user, line)
    answers = [event["type"] for event in alice.events[before_alice:] if event["type"] != "system"]
    assert answers in (["message"], ["error"], ["rooms"], ["users"], ["help"], ["joined"], ["left", "joined"])
    if answers == ["error"]:
        assert len(bob.events) == before_bob  # a refusal is for the sender only
    for event in alice.events[before_alice:]:
        assert not any(ch in event.get("text", "") for ch in "\x1b\x07\x9b\u202e")


# ---- the single-threaded rule, executable ----


def manager_classes() -> list[type]:
    """RoomManager and every Part II subclass of it that chat.py defines."""
    return [cls for cls in vars(chat).values()
            if isinstance(cls, type) and issubclass(cls, chat.RoomManager) and cls.__module__ == "chat"]


@pytest.mark.parametrize("cls", manager_classes(), ids=lambda cls: cls.__name__)
def test_no_room_manager_method_is_async_or_awaits(cls):
    """Chat state needs no locks only while no manager method can pause midway: no `async`, no `await`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    pausing = [f"{node.name} (async)" for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef)]
    pausing += [f"await at line {node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Await)]
    assert pausing == [], f"{cls.__name__} would let another client in midway: {pausing}"


def test_chat_py_can_be_imported_and_reloaded_in_one_process():
    """A student editing chat.py beside the notebook can `importlib.reload(chat)`."""
    script = "import importlib, chat; importlib.reload(chat); importlib.reload(chat); print(chat.LOBBY)"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout.strip()) == (0, "lobby"), result.stderr


def test_the_page_policy_hashes_the_inline_script_and_style_but_not_tags_named_in_comments():
    """CSP: exactly the page's own <script> and <style> bodies are allowed; a comment naming a tag is not code."""
    page = b"<!-- notes about <script>x</script> --><style>p{}</style><script>go()</script>"
    policy = chat.content_security_policy(page)
    script_sources = re.search(r"script-src ([^;]+);", policy).group(1).split()
    assert script_sources == [chat.inline_hashes(b"<script>go()</script>", b"script")]
    assert "default-src 'none'" in policy and "'unsafe-inline'" not in policy


# ---- Part II as composition ----


def chat_py_classes() -> list[type]:
    """Every class chat.py defines."""
    return [cls for cls in vars(chat).values() if isinstance(cls, type) and cls.__module__ == "chat"]


def chat_py_depth(cls: type) -> int:
    """How many chat.py classes deep a class is (a class on Tornado's or Python's alone: 1)."""
    parents = [base for base in cls.__bases__ if base.__module__ == "chat"]
    return 1 + max((chat_py_depth(base) for base in parents), default=0)


@pytest.mark.parametrize("cls", chat_py_classes(), ids=lambda cls: cls.__name__)
def test_no_chat_py_class_is_more_than_two_levels_deep(cls):
    """Part II is composition: one subclass per role, never a chain of upgrades."""
    assert chat_py_depth(cls) <= 2


def test_the_crowd_classes_are_the_only_part_two_subclasses_of_part_one():
    """Part II changes Part I's classes in one place each: the crowd classes of section 15."""
    part_one = {chat.Limits, chat.User, chat.Connection, chat.RoomManager, chat.ChatSocket, chat.StatusHandler}
    subclasses = {cls.__name__ for cls in chat_py_classes() if cls not in part_one
                  and any(base in cls.__mro__ for base in part_one)}
    assert subclasses == {"CrowdLimits", "CrowdUser", "CrowdConnection", "CrowdRoomManager",
                          "CrowdChatSocket", "CrowdStatusHandler"}
