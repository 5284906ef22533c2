"""A teaching-sized, real-time WebSocket chat server.

Run it:      python chat.py --port=8888      (or: CHAT_PORT=8888 python chat.py)
Chat:        python client.py alice          (the terminal client beside this file)
Connect:     ws://localhost:8888/ws?username=alice      Status: GET /status

Every line a user types is either chat text, sent to the user's current room,
or a command: /join <room>, /leave, /rooms, /users, /help. Everything the
server sends back is one JSON object with a "type" (section 2 lists them).

How it runs
-----------
There is one thread and one Tornado IOLoop. The loop runs one callback at a
time (a frame arrived, a timer fired, a client went away) and each callback
runs to its end before the next one starts. So the chat state (users, rooms,
sessions) needs no locks: nothing can run in the middle of a function. Other
clients get a turn only at an `await`, and no code that changes chat state
contains one. Sending never waits either: a frame goes into the connection's
outgoing buffer and the loop writes it out when the socket is ready.

Sections
--------
 1. Settings           one flag per limit, with its unit; the port rule
 2. Protocol           close codes, error codes, one builder per event type
 3. Pure helpers       names, text cleaning, the token bucket, frames
 4. Commands           the table of /commands; /help is built from it
 5. Room manager       all chat state, and every change to it
 6. WebSocket handler  open -> on_message -> on_close, and backpressure
 7. Status endpoint    GET /status
 8. Wiring and main    the application, signals, graceful shutdown
"""

import asyncio
import base64
import gc
import hashlib
import json
import logging
import os
import re
import resource
import secrets
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Protocol

import tornado.netutil
import tornado.options
import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamBufferFullError, StreamClosedError
from tornado.options import define, options

log = logging.getLogger("chat")


# ---- 1. Settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Every limit the server enforces; 0 switches a limit off."""

    max_message_chars: int = 500
    rate_per_second: float = 5.0  # lines a user may send per second, on average
    rate_burst: int = 10  # ... and in a quick burst
    idle_timeout_seconds: float = 600.0
    room_capacity: int = 200  # members per room; the lobby is exempt
    max_connections: int = 1000  # users online at once (held sessions do not count)
    resume_grace_seconds: float = 30.0
    max_backlog_bytes: int = 1024 * 1024  # unsent output per connection
    ping_interval_seconds: float = 20.0
    announce_limit: int = 100  # rooms bigger than this get no join/leave notices
    handshake_timeout_seconds: float = 30.0  # to send a complete WebSocket handshake

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame a client may send: a full-length line of 4-byte characters."""
        return max(4096, 4 * self.max_message_chars + 64)


DEFAULTS = Limits()


def default_port() -> int:
    """The port when no --port is given: $CHAT_PORT, else 8888."""
    value = os.environ.get("CHAT_PORT", "8888")
    if not value.isdigit() or not 0 < int(value) < 65536:
        sys.exit(f"chat.py: CHAT_PORT must be a port number (1-65535), not {value!r}")
    return int(value)


# The flag wins over CHAT_PORT because CHAT_PORT only sets the flag's default.
define("port", default=default_port(), help="TCP port to listen on; CHAT_PORT sets the default")
define("address", default="", help="address to listen on; empty means every interface")
define("max_message_length", default=DEFAULTS.max_message_chars,
       help="longest chat line, in characters")
define("rate_per_second", default=DEFAULTS.rate_per_second,
       help="lines a user may send per second, on average (0 = no limit)")
define("rate_burst", default=DEFAULTS.rate_burst,
       help="lines a user may send in a quick burst")
define("idle_timeout", default=DEFAULTS.idle_timeout_seconds,
       help="seconds without a line before a user is disconnected (0 = never)")
define("room_capacity", default=DEFAULTS.room_capacity,
       help="users per room, lobby exempt (0 = no limit)")
define("max_connections", default=DEFAULTS.max_connections,
       help="users online at once; held sessions do not count (0 = no limit)")
define("resume_grace", default=DEFAULTS.resume_grace_seconds,
       help="seconds a dropped user's session is held for resume (0 = none)")
define("max_backlog", default=DEFAULTS.max_backlog_bytes,
       help="bytes of unsent output before a slow client is dropped")
define("ping_interval", default=DEFAULTS.ping_interval_seconds,
       help="seconds between keepalive pings; a peer silent for two is dropped (0 = off)")
define("announce_limit", default=DEFAULTS.announce_limit,
       help="rooms with more users than this get no join/leave notices (0 = none anywhere)")
define("handshake_timeout", default=DEFAULTS.handshake_timeout_seconds,
       help="seconds a new connection has to send its handshake")


LIMIT_FLAGS = {  # flag -> the Limits field it sets
    "max_message_length": "max_message_chars", "rate_per_second": "rate_per_second",
    "rate_burst": "rate_burst", "idle_timeout": "idle_timeout_seconds",
    "room_capacity": "room_capacity", "max_connections": "max_connections",
    "resume_grace": "resume_grace_seconds", "max_backlog": "max_backlog_bytes",
    "ping_interval": "ping_interval_seconds", "announce_limit": "announce_limit",
    "handshake_timeout": "handshake_timeout_seconds",
}


def limits_from_options() -> Limits:
    """Collect the parsed flags into one Limits record; a nonsensical value stops the server."""
    for flag in LIMIT_FLAGS:
        if options[flag] < 0:
            sys.exit(f"chat.py: --{flag.replace('_', '-')} cannot be negative (0 switches it off).")
    if options.rate_per_second and options.rate_burst < 1:
        sys.exit("chat.py: --rate-burst must be at least 1, or nobody could ever send a line.")
    return Limits(**{field_name: options[flag] for flag, field_name in LIMIT_FLAGS.items()})


# ---- 2. Protocol: codes and events ---------------------------------------------------

LOBBY = "lobby"
REPLAY_LIMIT_MESSAGES = 100  # messages kept for a dropped user, replayed on resume
USER_LIST_LIMIT = 200  # names sent in one `joined` or `users` event

# WebSocket close codes. 1000-1015 are RFC 6455's; 4000-4999 are ours to define.
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_TOO_BIG = 1009  # a frame over max_frame_bytes (sent by Tornado itself)
CLOSE_BAD_USERNAME = 4001
CLOSE_USERNAME_TAKEN = 4002
CLOSE_SERVER_FULL = 4003
CLOSE_BAD_TOKEN = 4004
CLOSE_IDLE = 4008
CLOSE_SLOW_CONSUMER = 4009
CLOSE_REPLACED = 4010  # the same session resumed on a newer connection


class Refusal(Exception):
    """A normal "no" to a user: becomes an `error` event (and a close, on connect)."""

    def __init__(self, code: str, text: str, close_code: int | None = None, **extra):
        """`code` for programs, `text` for people, `extra` fields for the event (retry_after)."""
        super().__init__(text)
        self.code, self.text, self.close_code, self.extra = code, text, close_code, extra


def welcome_event(user: "User", limits: Limits, resumed: bool, missed: int) -> dict:
    """The first event on every connection: who you are, where you are, the limits."""
    return {
        "type": "welcome", "username": user.username, "room": user.current_room,
        "rooms": list(user.rooms), "token": user.token, "resumed": resumed, "missed": missed,
        "limits": {
            "max_message_chars": limits.max_message_chars,
            "rate_per_second": limits.rate_per_second, "rate_burst": limits.rate_burst,
            "idle_timeout_seconds": limits.idle_timeout_seconds,
            "resume_grace_seconds": limits.resume_grace_seconds,
            "room_capacity": limits.room_capacity, "max_connections": limits.max_connections,
        },
    }


def message_event(timestamp: str, username: str, room: str, text: str) -> dict:
    """A chat line, as every member of the room receives it (the sender too)."""
    return {"type": "message", "timestamp": timestamp, "username": username, "room": room, "text": text}


def system_event(timestamp: str, text: str, room: str | None = None, **extra) -> dict:
    """A notice from the server: someone joined or left, shutdown, idle timeout."""
    event = {"type": "system", "timestamp": timestamp, "text": text, **extra}
    if room is not None:
        event["room"] = room
    return event


def joined_event(room: "Room") -> dict:
    """You joined, or switched to, a room: here is who is in it."""
    return {"type": "joined", "room": room.name, "users": room.usernames(), "user_count": len(room.members)}


def left_event(room_name: str, room_now: str) -> dict:
    """You left a room; `room_now` is your current room from now on."""
    return {"type": "left", "room": room_name, "room_now": room_now}


def rooms_event(rooms: list["Room"]) -> dict:
    """Reply to /rooms: every room with its member count."""
    return {"type": "rooms", "rooms": [{"name": room.name, "users": len(room.members)} for room in rooms]}


def users_event(room: "Room") -> dict:
    """Reply to /users: the users in your current room."""
    return {"type": "users", "room": room.name, "users": room.usernames(), "user_count": len(room.members)}


def help_event() -> dict:
    """Reply to /help, built from the command table in section 4."""
    commands = [{"usage": c.usage, "description": c.description} for c in COMMANDS.values()]
    return {"type": "help", "commands": commands}


def error_event(code: str, text: str, **extra) -> dict:
    """Something the user asked for was refused; `code` is for programs, `text` for people."""
    return {"type": "error", "code": code, "text": text, **extra}


class Outbound:
    """One event, JSON-encoded once however many members receive it."""

    __slots__ = ("_frame", "event", "text")

    def __init__(self, event: dict):
        """Encode now: the text is shared by every recipient."""
        self.event = event
        self.text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        """The event as a WebSocket frame, built on first use and then shared."""
        if self._frame is None:
            self._frame = websocket_text_frame(self.text.encode())
        return self._frame


# ---- 3. Pure helpers: names, text, rate, frames --------------------------------------
# None of these touch the network or read the clock: the time is passed in.

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,20}")
ROOM_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")


def fold(name: str) -> str:
    """The one place names are case-folded: `Bob` and `bob` are the same user."""
    return name.lower()


def is_valid_username(name: str) -> bool:
    """1 to 20 ASCII letters, digits, `_` or `-`."""
    return USERNAME_PATTERN.fullmatch(name) is not None


def parse_room_name(raw: str) -> str | None:
    """A room name as typed (`#General`) to its stored form (`general`), or None if invalid."""
    name = fold(raw.strip().removeprefix("#"))
    return name if ROOM_PATTERN.fullmatch(name) else None


# Control characters could move another user's cursor, recolour or clear their
# screen, or (bidi overrides) make text read backwards. They never get relayed.
_LINE_BREAKS = "\t\n\r\v\f\u2028\u2029"
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_CLEAN_TABLE = {**dict.fromkeys(_CONTROLS), **{ord(ch): " " for ch in _LINE_BREAKS}}


def clean_text(text: str) -> str:
    """Drop control characters and bidi overrides; line breaks and tabs become spaces."""
    return text.translate(_CLEAN_TABLE)


def utc_timestamp(now: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds: 2026-11-25T19:48:04.123Z."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class TokenBucket:
    """A rate limit: tokens refill at `rate_per_second` up to `burst`; each line takes one."""

    rate_per_second: float
    burst: float
    tokens: float
    updated_at: float

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be."""
        if self.rate_per_second <= 0:
            return 0.0
        refill = (now - self.updated_at) * self.rate_per_second
        self.tokens = min(self.burst, self.tokens + refill)
        self.updated_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_second


def websocket_text_frame(payload: bytes) -> bytes:
    """Frame UTF-8 bytes as one final, unmasked text frame (RFC 6455, section 5.2)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


# ---- 4. Commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One /command: what to type, what it does, and the function that does it."""

    usage: str
    description: str
    run: Callable[["RoomManager", "User", str], None]


def run_join(manager: "RoomManager", user: "User", argument: str) -> None:
    """/join <room>: join (or create) a room and make it current."""
    if not argument:
        raise Refusal("usage", "Usage: /join <room>")
    room_name = parse_room_name(argument)
    if room_name is None:
        raise Refusal("bad_room", f"{argument[:40]!r} is not a room name: use 1-32 letters, digits, _ or -.")
    manager.join(user, room_name)


def run_leave(manager: "RoomManager", user: "User", argument: str) -> None:
    """/leave: leave the current room."""
    manager.leave(user)


def run_rooms(manager: "RoomManager", user: "User", argument: str) -> None:
    """/rooms: list every room with its member count."""
    manager.send(user, rooms_event(sorted(manager.rooms.values(), key=lambda room: room.name)))


def run_users(manager: "RoomManager", user: "User", argument: str) -> None:
    """/users: list the users in the current room."""
    manager.send(user, users_event(manager.rooms[user.current_room]))


def run_help(manager: "RoomManager", user: "User", argument: str) -> None:
    """/help: list the commands."""
    manager.send(user, help_event())


COMMANDS = {
    "join": Command("/join <room>", "join (or create) a room and make it your current one", run_join),
    "leave": Command("/leave", "leave your current room (you always stay in at least one)", run_leave),
    "rooms": Command("/rooms", "list every room with its number of users", run_rooms),
    "users": Command("/users", "list the users in your current room", run_users),
    "help": Command("/help", "show this list of commands", run_help),
}


def parse_command(line: str) -> tuple[str, str] | None:
    """Split `/join general` into ("join", "general"); None for a chat line.

    A line starting with `//` is chat text that starts with one `/`.
    """
    if not line.startswith("/") or line.startswith("//"):
        return None
    name, _, argument = line[1:].partition(" ")
    return fold(name), argument.strip()


# ---- 5. Room manager -----------------------------------------------------------------
# All chat state lives here, and every change to it happens in a method with no
# `await`: a check ("is the name free?") and its act ("take it") can never be
# split by another client's turn. It knows nothing about sockets, so the
# notebook and the unit tests can drive it directly.


class Connection(Protocol):
    """What the manager needs from a connection: send an event, or close it."""

    def send(self, outbound: Outbound) -> None:
        """Deliver one event now, never waiting."""

    def close(self, code: int, reason: str) -> None:
        """Close with a WebSocket close code and a short reason."""


@dataclass(eq=False, slots=True)
class User:
    """A logged-in user: their rooms, and the session that outlives a dropped connection."""

    username: str
    token: str
    bucket: TokenBucket
    connection: Connection | None
    rooms: list[str] = field(default_factory=list)  # joined rooms, the current one last
    current_room: str = LOBBY
    missed: deque | None = None  # events missed while dropped, replayed on resume
    grace_timer: asyncio.TimerHandle | None = None


@dataclass(eq=False, slots=True)
class Room:
    """A room and its members, keyed by folded username, in the order they joined."""

    name: str
    members: dict[str, User] = field(default_factory=dict)

    def usernames(self) -> list[str]:
        """The members' names, sorted; at most USER_LIST_LIMIT of the longest-present."""
        return sorted(member.username for member in islice(self.members.values(), USER_LIST_LIMIT))


def call_later_on_loop(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
    """Schedule a named timer callback on the running loop (never a sleep)."""
    return asyncio.get_running_loop().call_later(delay, callback)


class RoomManager:
    """Owns users, rooms and resumable sessions; all chat state changes happen here."""

    def __init__(self, limits: Limits = DEFAULTS, clock=time.monotonic, wall_clock=time.time,
                 call_later=call_later_on_loop):
        """Start empty but for the lobby; clocks and timers can be swapped in for tests."""
        self.limits = limits
        self.clock, self.wall_clock, self.call_later = clock, wall_clock, call_later
        self.started_at = clock()
        self.users: dict[str, User] = {}  # keyed by folded username; held sessions too
        self.sessions: dict[str, User] = {}  # keyed by resume token
        self.rooms: dict[str, Room] = {LOBBY: Room(LOBBY)}  # keyed by (folded) room name
        self.connections: set[Connection] = set()  # every live connection, logged in or not
        self.online = 0  # users with a live connection (held sessions are not online)
        self.closing = False  # set by shutdown(): no new logins

    # -- arriving and leaving --

    def connect(self, username: str, token: str | None, connection: Connection) -> User:
        """Log a connection in as a new user, or resume a held session with its token."""
        if token:
            return self.resume(username, token, connection)
        self.check_new_username(username)
        user = User(username, secrets.token_urlsafe(24), self.new_bucket(), connection)
        self.users[fold(username)] = user
        self.sessions[user.token] = user
        self.online += 1
        self.add_member(user, self.rooms[LOBBY])
        self.send(user, welcome_event(user, self.limits, resumed=False, missed=0))
        self.send(user, joined_event(self.rooms[LOBBY]))
        self.announce(self.rooms[LOBBY], f"{username} joined #{LOBBY}", "join", user)
        return user

    def check_new_username(self, username: str) -> None:
        """Refuse a missing, invalid or taken username, or a full server."""
        if not username:
            raise Refusal("bad_username", "A username is required: connect to /ws?username=NAME.",
                          CLOSE_BAD_USERNAME)
        if not is_valid_username(username):
            raise Refusal("bad_username", f"{username[:40]!r} is not a valid username: use 1-20 letters, "
                          "digits, _ or -.", CLOSE_BAD_USERNAME)
        held = self.users.get(fold(username))
        if held is not None:
            why = "is reconnecting" if held.connection is None else "is online"
            raise Refusal("username_taken", f"The username {username!r} is taken: someone "
                          f"with that name {why}. Pick another.", CLOSE_USERNAME_TAKEN)
        if self.limits.max_connections and self.online >= self.limits.max_connections:
            raise Refusal("server_full", f"The server is full ({self.limits.max_connections} "
                          "users). Try again later.", CLOSE_SERVER_FULL)

    def new_bucket(self) -> TokenBucket:
        """A full rate-limit bucket for a new user."""
        limits = self.limits
        return TokenBucket(limits.rate_per_second, limits.rate_burst, limits.rate_burst, self.clock())

    def resume(self, username: str, token: str, connection: Connection) -> User:
        """Give a held session back to its owner; a newer connection replaces an older one."""
        user = self.sessions.get(token)
        if user is None or (username and fold(username) != fold(user.username)):
            raise Refusal("bad_token", "That session token is unknown or expired: connect "
                          "without a token to start a new session.", CLOSE_BAD_TOKEN)
        if user.grace_timer is not None:
            user.grace_timer.cancel()
            user.grace_timer = None
        old_connection, user.connection = user.connection, connection
        if old_connection is None:
            self.online += 1
        else:  # the old connection may be half-open: it hands over
            old_connection.close(CLOSE_REPLACED, "session resumed on a newer connection")
        missed, user.missed = list(user.missed or ()), None
        self.send(user, welcome_event(user, self.limits, resumed=True, missed=len(missed)))
        self.send(user, joined_event(self.rooms[user.current_room]))
        for outbound in missed:  # in order, once: the buffer is gone now
            self.send(user, {**outbound.event, "replayed": True})
        return user

    def disconnect(self, user: User, connection: Connection, hold: bool, reason: str) -> None:
        """A user's connection ended: hold the session for resume, or end it now."""
        if user.connection is not connection:
            return  # a newer connection took this session over: nothing ends
        user.connection = None
        self.online -= 1
        if hold and self.limits.resume_grace_seconds > 0:
            user.missed = deque(maxlen=REPLAY_LIMIT_MESSAGES)
            user.grace_timer = self.call_later(self.limits.resume_grace_seconds, lambda: self.expire(user))
        else:
            self.end_session(user, reason)

    def expire(self, user: User) -> None:
        """Timer callback: the resume grace ran out, so the user leaves for good."""
        user.grace_timer = None
        if user.connection is None:
            self.end_session(user, "connection lost")
            log.info("session of %s expired (connections: %d)", user.username, len(self.connections))

    def end_session(self, user: User, reason: str) -> None:
        """Remove a user from every room and forget the session; the name is free again."""
        if user.grace_timer is not None:
            user.grace_timer.cancel()
        for room_name in list(user.rooms):
            self.announce(self.rooms[room_name], f"{user.username} left ({reason})", "leave", user)
            self.remove_member(user, self.rooms[room_name])
        del self.users[fold(user.username)]
        del self.sessions[user.token]

    # -- rooms --

    def join(self, user: User, room_name: str) -> None:
        """Join a room (creating it if missing) and make it current; switch if already in."""
        room = self.rooms.get(room_name)
        if room is not None and fold(user.username) in room.members:
            user.rooms.remove(room_name)  # most recently current last: /leave goes back there
            user.rooms.append(room_name)
            user.current_room = room_name
            self.send(user, joined_event(room))
            return
        capacity = self.limits.room_capacity
        if room is not None and capacity and room_name != LOBBY and len(room.members) >= capacity:
            raise Refusal("room_full", f"#{room_name} is full ({capacity} users). Try another room.")
        room = self.rooms.setdefault(room_name, Room(room_name))
        self.add_member(user, room)
        self.send(user, joined_event(room))
        self.announce(room, f"{user.username} joined #{room_name}", "join", user)

    def leave(self, user: User) -> None:
        """Leave the current room and go back to the one that was current before it."""
        if len(user.rooms) == 1:
            raise Refusal("last_room", f"You cannot leave #{user.current_room}: it is your only "
                          "room, and everyone stays in at least one. /join another room first.")
        room = self.rooms[user.current_room]
        self.announce(room, f"{user.username} left #{room.name}", "leave", user)
        self.remove_member(user, room)
        self.send(user, left_event(room.name, user.current_room))
        self.send(user, joined_event(self.rooms[user.current_room]))

    def add_member(self, user: User, room: Room) -> None:
        """Put a user in a room and make it their current room."""
        room.members[fold(user.username)] = user
        user.rooms.append(room.name)
        user.current_room = room.name

    def remove_member(self, user: User, room: Room) -> None:
        """Take a user out of a room; an empty room other than the lobby disappears."""
        del room.members[fold(user.username)]
        user.rooms.remove(room.name)
        if user.current_room == room.name and user.rooms:
            user.current_room = user.rooms[-1]
        if not room.members and room.name != LOBBY:
            del self.rooms[room.name]

    # -- lines, messages and delivery --

    def handle_line(self, user: User, line: str) -> None:
        """The one place every typed line passes: rate limit, then command or message."""
        try:
            retry_after = user.bucket.take(self.clock())
            if retry_after:
                raise Refusal("rate_limited", f"Slow down: you can send again in {retry_after:.1f} s.",
                              retry_after=round(retry_after, 3))
            command = parse_command(line)
            if command is None:  # chat text; "//shrug" is sent as "/shrug"
                self.say(user, line.removeprefix("/"))
            elif command[0] in COMMANDS:
                COMMANDS[command[0]].run(self, user, command[1])
            else:
                name = clean_text(command[0][:20])  # never echo a whole frame, nor a control character
                raise Refusal("unknown_command", f"Unknown command /{name}. Type /help for the list.")
        except Refusal as refusal:
            self.send(user, error_event(refusal.code, refusal.text, **refusal.extra))

    def say(self, user: User, line: str) -> None:
        """Send a chat line to the user's current room, after checking it."""
        text = clean_text(line)
        if not text.strip():
            raise Refusal("empty_message", "Empty messages are not sent: type some text.")
        if self.limits.max_message_chars and len(text) > self.limits.max_message_chars:
            raise Refusal("message_too_long", f"Your message has {len(text)} characters; the limit "
                          f"is {self.limits.max_message_chars}. Nothing was sent.")
        room = self.rooms[user.current_room]
        self.broadcast(room, message_event(self.timestamp(), user.username, room.name, text))
        log.info("#%s <%s> %s (connections: %d)", room.name, user.username, text, len(self.connections))

    def announce(self, room: Room, text: str, event: str, about: User) -> None:
        """Tell a room's other members someone joined or left, unless the room is big.

        Telling every member of a big room about every arrival would make C users
        connecting cost C*C/2 deliveries; big IRC channels and Slack stay quiet too.
        """
        if len(room.members) > self.limits.announce_limit:  # counting `about`, arriving or leaving
            return
        notice = system_event(self.timestamp(), text, room.name, event=event, username=about.username)
        self.broadcast(room, notice, skip=about)

    def broadcast(self, room: Room, event: dict, skip: User | None = None) -> None:
        """Deliver one event to every member of a room: encoded once, shared by all."""
        outbound = Outbound(event)
        for member in list(room.members.values()):  # a copy: a delivery may drop a member
            if member is not skip:
                self.deliver(member, outbound)

    def send(self, user: User, event: dict) -> None:
        """Deliver one event to one user."""
        self.deliver(user, Outbound(event))

    def deliver(self, user: User, outbound: Outbound) -> None:
        """Hand an event to the user's connection, or keep it for replay while they are away."""
        if user.connection is not None:
            user.connection.send(outbound)
        elif user.missed is not None and outbound.event["type"] == "message":
            user.missed.append(outbound)  # the deque keeps only the newest REPLAY_LIMIT_MESSAGES

    def timestamp(self) -> str:
        """Now, as a protocol timestamp."""
        return utc_timestamp(self.wall_clock())

    # -- reporting --

    def status(self) -> dict:
        """What GET /status shows: connections, users, rooms, uptime and limits."""
        online = [user.username for user in self.users.values() if user.connection is not None]
        rooms = sorted(self.rooms.values(), key=lambda room: room.name)
        return {
            "connections": len(self.connections), "users": sorted(online),
            "sessions_held": len(self.users) - self.online,
            "rooms": rooms_event(rooms)["rooms"],
            "uptime_seconds": round(self.clock() - self.started_at, 3),
            "limits": asdict(self.limits),
        }


# ---- 6. WebSocket handler ------------------------------------------------------------
# Tornado calls open(), then on_message() for every frame, then on_close()
# exactly once, whether the client said goodbye or simply vanished. An
# exception in any of them is a bug: it is logged with its traceback
# (log_exception), and only that one connection is closed.


class GoodbyeNoticingProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's WebSocket protocol, remembering whether the client sent a close frame.

    Tornado reports close_code None both for a vanished client and for a close
    frame without a code (a browser's plain ws.close()); only the first should
    hold the session for resume.
    """

    said_goodbye = False

    def _handle_message(self, opcode: int, data: bytes):
        """Note a close frame (opcode 8), then let Tornado handle the frame as usual."""
        if opcode == 0x8:
            self.said_goodbye = True
        return super()._handle_message(opcode, data)


class ChatSocket(tornado.websocket.WebSocketHandler):
    """One client's connection: turns frames into manager calls, and events into frames."""

    def initialize(self, manager: RoomManager) -> None:
        """Called by Tornado for each new connection, before open()."""
        self.manager = manager
        self.user: User | None = None
        self.server_close_reason = ""  # set when we close it on purpose: no session is held then
        self.last_active = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.gone = asyncio.get_running_loop().create_future()  # resolved by on_close

    def check_origin(self, origin: str) -> bool:
        """Accept every origin: any page or terminal may chat (there are no cookies to misuse)."""
        return True

    def get_websocket_protocol(self):
        """Tornado's protocol, taught to notice a close frame even when it carries no code."""
        protocol = super().get_websocket_protocol()
        if protocol is not None:
            protocol.__class__ = GoodbyeNoticingProtocol  # same object, one method more
        return protocol

    def open(self) -> None:
        """A client connected: log it in, or refuse it with an error and a close code."""
        self.manager.connections.add(self)  # removed in on_close, which always runs
        self.websocket_protocol = self.ws_connection  # on_close needs it after Tornado lets go
        self.set_nodelay(True)  # small chat frames go out at once (Nagle would add ~40 ms)
        if self.manager.closing:  # a late arrival during shutdown
            self.say_goodbye()
            return
        try:
            self.user = self.manager.connect(*self.login_arguments(), self)
        except Refusal as refusal:
            self.send(Outbound(error_event(refusal.code, refusal.text)))
            self.close_by_server(refusal.close_code, refusal.code)
            log.info("refused %s from %s (connections: %d)", refusal.code, self.request.remote_ip,
                     len(self.manager.connections))
            return
        self.last_active = time.monotonic()
        self.schedule_idle_check(self.manager.limits.idle_timeout_seconds)
        log.info("connect %s from %s (connections: %d)", self.user.username, self.request.remote_ip,
                 len(self.manager.connections))

    def login_arguments(self) -> tuple[str, str]:
        """The username and token from the URL's query string."""
        try:
            return self.get_query_argument("username", ""), self.get_query_argument("token", "")
        except tornado.web.HTTPError:  # not UTF-8
            raise Refusal("bad_username", "The username in the URL is not valid text: use 1-20 "
                          "letters, digits, _ or -.", CLOSE_BAD_USERNAME) from None

    def on_message(self, message: str | bytes) -> None:
        """A frame arrived: one typed line for the manager."""
        if self.user is None or self.user.connection is not self or self.ws_connection is None:
            return  # refused, replaced or closed by us: this connection no longer speaks for anyone
        self.last_active = time.monotonic()
        if isinstance(message, bytes):
            self.send(Outbound(error_event("binary_frame", "Send text frames: binary frames are not chat.")))
            return
        self.manager.handle_line(self.user, message)

    def on_close(self) -> None:
        """The connection is gone: unregister it and tell the manager."""
        self.manager.connections.discard(self)
        self.gone.set_result(None)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.user is None:
            return
        # No close frame from the client, and not closed by us: the network failed.
        abrupt = not self.websocket_protocol.said_goodbye and not self.server_close_reason
        self.leave_chat(self.server_close_reason or ("connection lost" if abrupt else "quit"), hold=abrupt)

    def leave_chat(self, reason: str, hold: bool) -> None:
        """This connection's user is done: hold the session for resume, or end it (once)."""
        if self.user is None or self.user.connection is not self:
            return  # refused, already gone, or taken over by a newer connection
        self.manager.disconnect(self.user, self, hold=hold, reason=reason)
        held = " (session held for resume)" if self.user.grace_timer else ""
        log.info("disconnect %s: %s%s (connections: %d)", self.user.username, reason, held,
                 len(self.manager.connections))

    def log_exception(self, typ, value, tb) -> None:
        """A bug: log it with its traceback, naming the user but not the URL (it holds the token)."""
        log.error("bug while serving %s at %s", self.user and self.user.username, self.request.path,
                  exc_info=(typ, value, tb))

    # -- sending, and backpressure --

    def send(self, outbound: Outbound) -> None:
        """Send a frame without ever waiting for it; drop a client that falls too far behind.

        The fast broadcast path. Tornado's write_message() would build a frame and
        start an asyncio task for every recipient, and IOStream.write() makes a Future
        for every write. Here the frame is built once per event (Outbound.frame), and
        when nothing is queued for this member its bytes go straight to the socket.
        Only what the kernel does not take at once is queued, and that queue is
        bounded. Skipped: compression (never enabled) and TLS (chat.py serves ws://).
        """
        protocol = self.ws_connection
        if protocol is None or protocol.is_closing():
            return  # closed meanwhile: the member is gone, not an error
        stream, frame = protocol.stream, outbound.frame
        if not stream.writing():  # nothing queued ahead of this frame, so order is kept
            try:
                sent = stream.socket.send(frame)
            except OSError:  # would block, or the connection broke: the stream handles both
                sent = 0
            if sent == len(frame):
                return
            frame = frame[sent:]
        self.queue(stream, frame)

    def queue(self, stream, frame: bytes) -> None:
        """Queue the rest of a frame in the stream, within the backlog bound."""
        # The bound is for chat frames only: Tornado's own frames (ping, pong, close)
        # are tiny and few, and must always fit, or a close could fail behind a backlog.
        stream.max_write_buffer_size = self.manager.limits.max_backlog_bytes or None
        try:
            stream.write(frame)
        except StreamBufferFullError:
            self.drop_slow_consumer(stream)
        except StreamClosedError:
            pass  # on_close is on its way
        finally:
            stream.max_write_buffer_size = None

    def drop_slow_consumer(self, stream) -> None:
        """This client stopped reading: close it rather than queue output forever."""
        log.warning("dropping %s: over %d bytes of unsent output", self.user and self.user.username,
                    self.manager.limits.max_backlog_bytes)
        stream.max_write_buffer_size = None  # let the close frame queue behind the backlog
        self.close_by_server(CLOSE_SLOW_CONSUMER, "slow consumer: fell too far behind")
        # Tornado gives the client 5 s to read up and answer the close, then drops the
        # socket and its buffer. The user leaves the rooms now, once this broadcast is done.
        asyncio.get_running_loop().call_soon(self.leave_chat, "fell too far behind", False)

    def close_by_server(self, code: int, reason: str) -> None:
        """Close on purpose (refusal, idle, slow, shutdown): the session is not held."""
        self.server_close_reason = reason
        self.close(code, reason)

    # -- idle timeout --

    def schedule_idle_check(self, delay: float) -> None:
        """Arm the idle timer (a named callback on the loop, never a sleep)."""
        if self.manager.limits.idle_timeout_seconds > 0:
            self.idle_timer = asyncio.get_running_loop().call_later(delay, self.check_idle)

    def check_idle(self) -> None:
        """Timer callback: close the connection if its user has been silent for the idle timeout."""
        timeout = self.manager.limits.idle_timeout_seconds
        remaining = self.last_active + timeout - time.monotonic()
        if remaining > 0:  # they spoke since the timer was set: check again later
            self.schedule_idle_check(remaining)
            return
        text = f"Disconnected after {timeout:g} s without a message."
        self.send(Outbound(system_event(self.manager.timestamp(), text, event="idle")))
        self.close_by_server(CLOSE_IDLE, "idle timeout")

    def say_goodbye(self) -> None:
        """Shutdown: tell the client, then close with 1001 (going away)."""
        text = "The server is shutting down. Goodbye!"
        self.send(Outbound(system_event(self.manager.timestamp(), text, event="shutdown")))
        self.close_by_server(CLOSE_GOING_AWAY, "server shutting down")


# ---- 7. Status endpoint --------------------------------------------------------------


class StatusHandler(tornado.web.RequestHandler):
    """GET /status: the server's state as JSON, for people and monitoring."""

    def initialize(self, manager: RoomManager) -> None:
        """Called by Tornado for each request."""
        self.manager = manager

    def get(self) -> None:
        """Reply with the manager's status report."""
        self.set_header("Cache-Control", "no-store")
        self.write(self.manager.status())


class PageHandler(tornado.web.RequestHandler):
    """GET /: the web chat page, a single static file beside chat.py."""

    def get(self) -> None:
        """Serve chat.html with a policy that lets no script run but its own."""
        with open(PAGE_PATH, "rb") as page_file:
            page = page_file.read()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", content_security_policy(page))
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-cache")
        self.write(page)


PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


def content_security_policy(page: bytes) -> str:
    """Allow exactly the page's own inline <script> and <style> (by hash), nothing else."""
    def hashes(tag: bytes) -> str:
        bodies = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"
                        for body in bodies) or "'none'"
    return (f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


# ---- 8. Wiring and main --------------------------------------------------------------


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log, minus query strings: they carry resume tokens."""
    status = handler.get_status()
    if status == 101:
        return  # WebSocket upgrades get their own "connect" line from ChatSocket
    level = logging.INFO if status < 400 else logging.WARNING
    request = handler.request
    logging.getLogger("tornado.access").log(level, "%d %s %s (%s) %.1fms", status, request.method,
                                            request.path, request.remote_ip, 1000 * request.request_time())


def make_app(manager: RoomManager) -> tornado.web.Application:
    """The Tornado application: the chat socket at /ws and the status page at /status."""
    limits = manager.limits
    return tornado.web.Application(
        [(r"/", PageHandler), (r"/ws", ChatSocket, {"manager": manager}),
         (r"/status", StatusHandler, {"manager": manager})],
        websocket_max_message_size=limits.max_frame_bytes,  # Tornado's default is 10 MiB
        websocket_ping_interval=limits.ping_interval_seconds or None,
        websocket_ping_timeout=limits.ping_interval_seconds or None,
        log_function=log_request,
    )


def serve(limits: Limits = DEFAULTS, port: int = 0, address: str = "") -> tuple[HTTPServer, RoomManager, int]:
    """Start listening on the running loop (port 0 picks a free one): server, manager, port."""
    manager = RoomManager(limits)
    sockets = tornado.netutil.bind_sockets(port, address)
    # A connection that never finishes its handshake is dropped soon, not after an hour.
    server = HTTPServer(make_app(manager), idle_connection_timeout=limits.handshake_timeout_seconds or None)
    server.add_sockets(sockets)
    return server, manager, sockets[0].getsockname()[1]


async def shutdown(server: HTTPServer, manager: RoomManager, timeout_seconds: float = 3.0) -> None:
    """Stop listening, tell every client goodbye, and wait briefly for them to close."""
    server.stop()
    manager.closing = True  # a handshake already under way is told goodbye too
    connections = list(manager.connections)
    for connection in connections:
        connection.say_goodbye()
    if connections:  # each one's on_close resolves its `gone` future
        await asyncio.wait([connection.gone for connection in connections], timeout=timeout_seconds)
    log.info("shut down: closed %d connections", len(connections))


def raise_open_file_limit() -> None:
    """Allow as many sockets as the system lets us: each connection is an open file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(limits: Limits, port: int, address: str) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, then shut down gracefully."""
    try:
        server, manager, port = serve(limits, port, address)
    except OSError as error:
        sys.exit(f"chat.py: cannot listen on port {port}: {error.strerror}. Try --port=N.")
    log.info("chat server on ws://localhost:%d/ws (status: http://localhost:%d/status)", port, port)
    stop = asyncio.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        # The handler only schedules work: stop.set runs on the loop, between callbacks.
        asyncio.get_running_loop().add_signal_handler(signal_number, stop.set)
    await stop.wait()
    await shutdown(server, manager)


def main() -> None:
    """Parse the flags, then run the server until it is told to stop."""
    try:
        options.parse_command_line()
    except tornado.options.Error as error:  # an unknown flag (Tornado has printed the help)
        sys.exit(f"chat.py: {error}.")
    except ValueError as error:  # a value of the wrong type, like --port=abc
        sys.exit(f"chat.py: a flag has a bad value ({error}). See python chat.py --help.")
    raise_open_file_limit()
    # About 90 tracked objects per connection: at the default threshold (700) the cycle
    # collector took 40% of the CPU of 10,000 users connecting (tests/bench.py --only idle).
    gc.set_threshold(50_000)
    asyncio.run(run(limits_from_options(), options.port, options.address))


if __name__ == "__main__":
    main()
