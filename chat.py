"""A teaching-sized, real-time WebSocket chat server.

Run it:    python chat.py --port=8888        (or: CHAT_PORT=8888 python chat.py; --help lists the flags)
Chat:      python client.py alice            (the terminal client beside this file)
           http://localhost:8888/            (the web page, in any browser)
Connect:   ws://localhost:8888/ws?username=alice          Status: GET /status

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

Two lessons in one file
-----------------------
Part I (sections 1-8) is a complete chat server, read in one sitting;
`python chat.py --lesson=1` runs exactly that. Part II (sections 9-15) is what
lets it hold a crowd: each upgrade is a subclass of a Part I class, under its
own banner, which opens with the problem it solves and the number that showed
it. `python chat.py` runs with all of Part II.

Sections
--------
Part I: a chat server
 1. Settings            every limit once: its default, unit and flag
 2. Protocol            close codes, error codes, one builder per event type
 3. Pure helpers        names, text cleaning, timestamps
 4. Commands            the table of /commands; /help is built from it
 5. Room manager        all chat state, and every change to it
 6. WebSocket handler   open -> on_message -> on_close, and a bounded send
 7. HTTP endpoints      GET /status, and the web page at GET /
 8. Wiring and main     the flags, the application, Ctrl-C and a graceful shutdown
Part II: holding a crowd
 9. Fast broadcast      one frame, the same bytes to every socket
10. Quiet big rooms     join notices cost C*C/2 deliveries
11. Rate limit          a token bucket per user
12. Keepalive and idle timeout   pings find dead peers; silent users free their seat
13. Resume              a dropped user keeps name, rooms and missed messages
14. Hardening           what one person with a script must not be able to take
15. The crowd server    tuning, and the classes `python chat.py` runs
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 9):  # before anything newer Pythons alone understand
    sys.exit("chat.py needs Python 3.9 or newer; this is Python %d.%d. "
             "Install a newer Python from python.org." % sys.version_info[:2])

import argparse
import asyncio
import base64
import gc
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from itertools import islice
from typing import Callable, NamedTuple, Protocol

import tornado.log
import tornado.netutil
import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamBufferFullError, StreamClosedError

log = logging.getLogger("chat")


# =====================================================================================
# Part I: a chat server
# =====================================================================================


# ---- 1. Settings ---------------------------------------------------------------------


def limit(default: float, help_text: str):
    """A Limits field: its default and the --help text that names its unit."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class Limits:
    """Every limit the server enforces, each a flag of the same name; 0 switches it off."""

    # Part I enforces these ...
    max_message_length: int = limit(500, "longest chat line, in characters")
    max_connections: int = limit(1000, "users online at once")
    room_capacity: int = limit(200, "users per room; the lobby is exempt")
    max_backlog: int = limit(1024 * 1024, "unsent output per connection, in bytes, before "
                             "a client that stopped reading is dropped")
    # ... and Part II these (sections 10-13).
    announce_limit: int = limit(100, "rooms with more users than this get no join/leave notices")
    rate_per_second: float = limit(5.0, "lines a user may send per second, on average")
    rate_burst: int = limit(10, "lines a user may send in a quick burst (at least 1)")
    idle_timeout: float = limit(600.0, "seconds without a line before a user is disconnected")
    ping_interval: float = limit(20.0, "seconds between keepalive pings; a peer silent for "
                                 "two is dropped")
    resume_grace: float = limit(30.0, "seconds a dropped user's session is held for resume")
    handshake_timeout: float = limit(30.0, "seconds a new connection has to finish its handshake")

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame a client may send: a full-length line of 4-byte characters."""
        return max(4096, 4 * self.max_message_length + 64)


DEFAULT_PORT = 8888


def default_port() -> int:
    """The port when no --port is given: $CHAT_PORT, else DEFAULT_PORT."""
    value = os.environ.get("CHAT_PORT", str(DEFAULT_PORT))
    if not value.isdigit() or not 0 < int(value) < 65536:
        sys.exit(f"chat.py: CHAT_PORT must be a port number (1-65535), not {value!r}.")
    return int(value)


# ---- 2. Protocol: codes and events ---------------------------------------------------

LOBBY = "lobby"
USER_LIST_LIMIT = 200  # names sent in one `joined` or `users` event

# WebSocket close codes. 1000-1015 are RFC 6455's; 4000-4999 are ours to define.
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_TOO_BIG = 1009  # a frame over max_frame_bytes (sent by Tornado itself)
CLOSE_BAD_USERNAME = 4001
CLOSE_USERNAME_TAKEN = 4002
CLOSE_SERVER_FULL = 4003
CLOSE_BAD_TOKEN = 4004  # Part II: resume
CLOSE_IDLE = 4008  # Part II: idle timeout
CLOSE_SLOW_CONSUMER = 4009
CLOSE_REPLACED = 4010  # Part II: the same session resumed on a newer connection


class Refusal(Exception):
    """A normal "no" to a user: becomes an `error` event (and a close, on connect)."""

    def __init__(self, code: str, text: str, close_code: int | None = None, **extra):
        """`code` for programs, `text` for people, `extra` fields for the event (retry_after)."""
        super().__init__(text)
        self.code, self.text, self.close_code, self.extra = code, text, close_code, extra


# welcome.limits once named three limits differently; older clients still read these.
OLD_LIMIT_NAMES = {"max_message_chars": "max_message_length", "idle_timeout_seconds": "idle_timeout",
                   "resume_grace_seconds": "resume_grace"}


def welcome_event(user: User, limits: Limits, **extra) -> dict:
    """The first event on every connection: who you are, where you are, the limits."""
    limit_values = asdict(limits)
    limit_values.update({old: limit_values[new] for old, new in OLD_LIMIT_NAMES.items()})
    return {"type": "welcome", "username": user.username, "room": user.current_room,
            "rooms": list(user.rooms), "token": user.token, **extra, "limits": limit_values}


def message_event(timestamp: str, username: str, room: str, text: str) -> dict:
    """A chat line, as every member of the room receives it (the sender too)."""
    return {"type": "message", "timestamp": timestamp, "username": username, "room": room, "text": text}


def system_event(timestamp: str, text: str, room: str | None = None, **extra) -> dict:
    """A notice from the server: someone joined or left, shutdown, idle timeout."""
    event = {"type": "system", "timestamp": timestamp, "text": text, **extra}
    if room is not None:
        event["room"] = room
    return event


def joined_event(room: Room) -> dict:
    """You joined, or switched to, a room: here is who is in it."""
    return {"type": "joined", "room": room.name, "users": room.usernames(), "user_count": len(room.members)}


def left_event(room_name: str, room_now: str) -> dict:
    """You left a room; `room_now` is your current room from now on."""
    return {"type": "left", "room": room_name, "room_now": room_now}


def rooms_event(rooms: list[Room]) -> dict:
    """Reply to /rooms: every room with its member count."""
    return {"type": "rooms", "rooms": [{"name": room.name, "users": len(room.members)} for room in rooms]}


def users_event(room: Room) -> dict:
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

    __slots__ = ("event", "frame", "text")

    def __init__(self, event: dict):
        """Encode now: the text is shared by every recipient."""
        self.event = event
        self.text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        self.frame: bytes | None = None  # Part II (section 9) builds the WebSocket frame once


# ---- 3. Pure helpers: names, text, time ----------------------------------------------
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
    name = fold(raw.strip())
    name = name[1:] if name.startswith("#") else name
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
    moment = datetime.fromtimestamp(now, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- 4. Commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One /command: what to type, what it does, and the function that does it."""

    usage: str
    description: str
    run: Callable[[RoomManager, User, str], None]


def run_join(manager: RoomManager, user: User, argument: str) -> None:
    """/join <room>: join (or create) a room and make it current."""
    if not argument:
        raise Refusal("usage", "Usage: /join <room>")
    room_name = parse_room_name(argument)
    if room_name is None:
        raise Refusal("bad_room", f"{argument[:40]!r} is not a room name: use 1-32 letters, digits, _ or -.")
    manager.join(user, room_name)


def run_leave(manager: RoomManager, user: User, argument: str) -> None:
    """/leave: leave the current room."""
    manager.leave(user)


def run_rooms(manager: RoomManager, user: User, argument: str) -> None:
    """/rooms: list every room with its member count."""
    manager.send(user, rooms_event(sorted(manager.rooms.values(), key=lambda room: room.name)))


def run_users(manager: RoomManager, user: User, argument: str) -> None:
    """/users: list the users in the current room."""
    manager.send(user, users_event(manager.rooms[user.current_room]))


def run_help(manager: RoomManager, user: User, argument: str) -> None:
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


@dataclass(eq=False)
class User:
    """A logged-in user and the rooms they are in."""

    username: str
    token: str  # names the session; Part II (section 13) lets a dropped user resume with it
    connection: Connection | None
    rooms: list[str] = field(default_factory=list)  # joined rooms, the current one last
    current_room: str = LOBBY


@dataclass(eq=False)
class Room:
    """A room and its members, keyed by folded username, in the order they joined."""

    name: str
    members: dict[str, User] = field(default_factory=dict)

    def usernames(self) -> list[str]:
        """The members' names, sorted; at most USER_LIST_LIMIT of the longest-present."""
        return sorted(member.username for member in islice(self.members.values(), USER_LIST_LIMIT))


class RoomManager:
    """Owns users and rooms; all chat state changes happen here."""

    def __init__(self, limits: Limits = Limits(), wall_clock: Callable[[], float] = time.time):
        """Start empty but for the lobby; the clock can be swapped in for tests."""
        self.limits, self.wall_clock = limits, wall_clock
        self.users: dict[str, User] = {}  # keyed by folded username
        self.rooms: dict[str, Room] = {LOBBY: Room(LOBBY)}  # keyed by (folded) room name
        self.connections: set[Connection] = set()  # every live connection, logged in or not
        self.closing = False  # set by shutdown(): no new logins

    # -- arriving and leaving --

    def connect(self, username: str, token: str, connection: Connection) -> User:
        """Log a connection in as a new user, in the lobby. (Part I ignores the token.)"""
        self.check_new_username(username)
        user = self.new_user(username, connection)
        self.users[fold(username)] = user
        self.add_member(user, self.rooms[LOBBY])
        self.send(user, self.welcome(user))
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
        if fold(username) in self.users:
            raise self.name_taken(username, self.users[fold(username)])
        if self.limits.max_connections and self.online_count() >= self.limits.max_connections:
            raise Refusal("server_full", f"The server is full ({self.limits.max_connections} "
                          "users). Try again later.", CLOSE_SERVER_FULL)

    def name_taken(self, username: str, holder: User) -> Refusal:
        """The refusal for a username someone else has."""
        return Refusal("username_taken", f"The username {username!r} is taken: someone with "
                       "that name is online. Pick another.", CLOSE_USERNAME_TAKEN)

    def new_user(self, username: str, connection: Connection) -> User:
        """A fresh user record with an unguessable session token."""
        return User(username, secrets.token_urlsafe(24), connection)

    def welcome(self, user: User) -> dict:
        """The `welcome` event for this user."""
        return welcome_event(user, self.limits)

    def online_count(self) -> int:
        """Users with a live connection."""
        return len(self.users)

    def disconnect(self, user: User, connection: Connection, reason: str) -> None:
        """A user's connection ended: they leave every room."""
        user.connection = None
        self.end_session(user, reason)

    def end_session(self, user: User, reason: str) -> None:
        """Remove a user from every room; the name is free again."""
        for room_name in list(user.rooms):
            self.announce(self.rooms[room_name], f"{user.username} left ({reason})", "leave", user)
            self.remove_member(user, self.rooms[room_name])
        del self.users[fold(user.username)]

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
        """The one place every typed line passes: a command, or a message for the room."""
        try:
            command = parse_command(line)
            if command is None:  # chat text; "//shrug" is sent as "/shrug"
                self.say(user, line[1:] if line.startswith("/") else line)
            elif command[0] in COMMANDS:
                COMMANDS[command[0]].run(self, user, command[1])
            else:
                name = clean_text(command[0][:20])  # never echo a whole frame, nor a control character
                raise Refusal("unknown_command", f"Unknown command /{name}. Type /help for the list.")
        except Refusal as refusal:
            self.refuse(user, refusal)

    def refuse(self, user: User, refusal: Refusal) -> None:
        """Tell one user (and nobody else) that something was refused."""
        self.send(user, error_event(refusal.code, refusal.text, **refusal.extra))

    def say(self, user: User, line: str) -> None:
        """Send a chat line to the user's current room, after checking it."""
        text = clean_text(line)
        if not text.strip():
            raise Refusal("empty_message", "Empty messages are not sent: type some text.")
        if self.limits.max_message_length and len(text) > self.limits.max_message_length:
            raise Refusal("message_too_long", f"Your message has {len(text)} characters; the limit "
                          f"is {self.limits.max_message_length}. Nothing was sent.")
        room = self.rooms[user.current_room]
        self.broadcast(room, message_event(self.timestamp(), user.username, room.name, text))
        log.info("#%s <%s> %s (connections: %d)", room.name, user.username, text, len(self.connections))

    def announce(self, room: Room, text: str, event: str, about: User) -> None:
        """Tell a room's other members that someone joined or left."""
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
        """Hand an event to the user's connection."""
        if user.connection is not None:
            user.connection.send(outbound)

    def timestamp(self) -> str:
        """Now, as a protocol timestamp."""
        return utc_timestamp(self.wall_clock())

    # -- reporting --

    def status(self) -> dict:
        """What GET /status shows: connections, users, rooms and limits."""
        online = [user.username for user in self.users.values() if user.connection is not None]
        rooms = sorted(self.rooms.values(), key=lambda room: room.name)
        return {"connections": len(self.connections), "users": sorted(online),
                "rooms": rooms_event(rooms)["rooms"], "limits": asdict(self.limits)}


# ---- 6. WebSocket handler ------------------------------------------------------------
# Tornado calls open(), then on_message() for every frame, then on_close()
# exactly once, whether the client said goodbye or simply vanished. An
# exception in any of them is a bug: it is logged with its traceback
# (log_exception), and only that one connection is closed.


class ChatSocket(tornado.websocket.WebSocketHandler):
    """One client's connection: turns frames into manager calls, and events into frames."""

    def initialize(self, manager: RoomManager) -> None:
        """Called by Tornado for each new connection, before open()."""
        self.manager = manager
        self.user: User | None = None
        self.server_close_reason = ""  # set when we close it on purpose
        self.gone = asyncio.get_running_loop().create_future()  # resolved by on_close

    @classmethod
    def app_settings(cls, limits: Limits) -> dict:
        """Tornado settings for this handler: a bounded frame size (Tornado's default is 10 MiB)."""
        return {"websocket_max_message_size": limits.max_frame_bytes}

    def check_origin(self, origin: str) -> bool:
        """Accept every origin: any page or terminal may chat (there are no cookies to misuse)."""
        return True

    def open(self) -> None:
        """A client connected: log it in, or refuse it with an error and a close code."""
        self.manager.connections.add(self)  # removed in on_close, which always runs
        # Sends never wait, so unsent output queues here; past the bound, send() drops the client.
        self.ws_connection.stream.max_write_buffer_size = self.manager.limits.max_backlog or None
        if self.manager.closing:  # a late arrival during shutdown
            self.say_goodbye()
            return
        try:
            self.user = self.manager.connect(*self.login_arguments(), self)
        except Refusal as refusal:
            self.send(Outbound(error_event(refusal.code, refusal.text, **refusal.extra)))
            self.close_by_server(refusal.close_code, refusal.code)
            log.info("refused %s from %s (connections: %d)", refusal.code, self.request.remote_ip,
                     len(self.manager.connections))
            return
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
        if isinstance(message, bytes):
            self.send(Outbound(error_event("binary_frame", "Send text frames: binary frames are not chat.")))
            return
        self.manager.handle_line(self.user, message)

    def on_close(self) -> None:
        """The connection is gone: unregister it and tell the manager."""
        self.manager.connections.discard(self)
        self.gone.set_result(None)
        if self.user is not None:
            self.leave_chat(self.server_close_reason or "quit")

    def leave_chat(self, reason: str) -> None:
        """This connection's user is done: they leave their rooms (once)."""
        if self.user is None or self.user.connection is not self:
            return  # refused, already gone, or taken over by a newer connection
        self.manager.disconnect(self.user, self, reason)
        log.info("disconnect %s: %s (connections: %d)", self.user.username, reason,
                 len(self.manager.connections))

    def log_exception(self, typ, value, tb) -> None:
        """A bug: log it with its traceback, naming the user but not the URL (it holds the token)."""
        log.error("bug while serving %s at %s", self.user and self.user.username, self.request.path,
                  exc_info=(typ, value, tb))

    # -- sending, and backpressure --

    def send(self, outbound: Outbound) -> None:
        """Send an event without waiting; drop a client whose unsent output passes the bound."""
        if self.ws_connection is None or self.ws_connection.is_closing():
            return  # closed meanwhile: the member is gone, not an error
        try:
            self.write_message(outbound.text).add_done_callback(forget_unsent)
        except StreamBufferFullError:
            self.drop_slow_consumer()
        except tornado.websocket.WebSocketClosedError:
            pass  # on_close is on its way

    def drop_slow_consumer(self) -> None:
        """This client stopped reading: close it rather than queue output forever."""
        log.warning("dropping %s: over %d bytes of unsent output", self.user and self.user.username,
                    self.manager.limits.max_backlog)
        self.close_by_server(CLOSE_SLOW_CONSUMER, "slow consumer: fell too far behind")
        # Tornado gives the client 5 s to read up and answer the close, then drops the
        # socket and its buffer. The user leaves the rooms now, once this broadcast is done.
        asyncio.get_running_loop().call_soon(self.leave_chat, "fell too far behind")

    def close_by_server(self, code: int, reason: str) -> None:
        """Close on purpose (refusal, slow, shutdown); the close frame may pass the bound."""
        self.server_close_reason = reason
        if self.ws_connection is not None:
            self.ws_connection.stream.max_write_buffer_size = None
        self.close(code, reason)

    def say_goodbye(self) -> None:
        """Shutdown: tell the client, then close with 1001 (going away)."""
        text = "The server is shutting down. Goodbye!"
        self.send(Outbound(system_event(self.manager.timestamp(), text, event="shutdown")))
        self.close_by_server(CLOSE_GOING_AWAY, "server shutting down")


def forget_unsent(write: asyncio.Future) -> None:
    """A write cut short by the connection closing is no error: on_close does the leaving."""
    if not write.cancelled():
        write.exception()  # looked at, so asyncio does not log it as "never retrieved"


# ---- 7. HTTP endpoints: status and the web page --------------------------------------


class StatusHandler(tornado.web.RequestHandler):
    """GET /status: the server's state as JSON, for people and monitoring."""

    def initialize(self, manager: RoomManager) -> None:
        """Called by Tornado for each request."""
        self.manager = manager

    def get(self) -> None:
        """Reply with the manager's status report."""
        self.set_header("Cache-Control", "no-store")
        self.write(self.manager.status())


PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class PageHandler(tornado.web.RequestHandler):
    """GET /: the web chat page, one static file beside chat.py."""

    def get(self) -> None:
        """Serve chat.html with a policy that lets no script run but the page's own."""
        with open(PAGE_PATH, "rb") as page_file:  # read each time: edit the page, reload the browser
            page = page_file.read()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", content_security_policy(page))
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-cache")
        self.write(page)


def inline_hashes(page: bytes, tag: bytes) -> str:
    """CSP sources for the bodies of the page's inline <script> or <style> elements."""
    bodies = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.S)
    digests = (base64.b64encode(hashlib.sha256(body).digest()).decode() for body in bodies)
    return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"


def content_security_policy(page: bytes) -> str:
    """Run exactly the page's own inline script and style (by hash), and fetch nothing else.

    Even if a bug let a message in as HTML, the browser would refuse to run it.
    """
    return (f"default-src 'none'; script-src {inline_hashes(page, b'script')}; "
            f"style-src {inline_hashes(page, b'style')}; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


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


def make_app(manager: RoomManager, socket_class: type[ChatSocket] = ChatSocket) -> tornado.web.Application:
    """The Tornado application: the page at /, the chat socket at /ws, the status at /status."""
    return tornado.web.Application(
        [(r"/", PageHandler), (r"/ws", socket_class, {"manager": manager}),
         (r"/status", StatusHandler, {"manager": manager})],
        log_function=log_request, **socket_class.app_settings(manager.limits))


class ServerParts(NamedTuple):
    """What a lesson's server is made of: the room manager, the socket, the HTTP server."""

    manager: type[RoomManager]
    socket: type[ChatSocket]
    http_server: Callable[[tornado.web.Application, Limits], HTTPServer]


def serve(limits: Limits = Limits(), port: int = 0, address: str = "",
          lesson: int = 2) -> tuple[HTTPServer, RoomManager, int]:
    """Start listening on the running loop (port 0 picks a free one): server, manager, port."""
    parts = LESSONS[lesson]  # lesson 1 is Part I alone; lesson 2 adds Part II (section 15)
    manager = parts.manager(limits)
    sockets = tornado.netutil.bind_sockets(port, address)
    server = parts.http_server(make_app(manager, parts.socket), limits)
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


def stop_on_signals(stop: asyncio.Event) -> None:
    """Ctrl-C (and SIGTERM, and Ctrl-Break on Windows) set `stop`; nothing else runs in the handler."""
    loop = asyncio.get_running_loop()
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        signal_number = getattr(signal, name, None)
        if signal_number is None:
            continue  # SIGBREAK exists on Windows only
        try:  # Unix: the loop itself runs stop.set between callbacks
            loop.add_signal_handler(signal_number, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: a plain handler hands over to the loop
            signal.signal(signal_number, lambda *_: loop.call_soon_threadsafe(stop.set))


def addresses_to_share(port: int, address: str) -> list[str]:
    """The URLs people can open: this machine, and each LAN address when on every interface."""
    urls = [f"http://localhost:{port}/"] if address in ("", "0.0.0.0", "::", "127.0.0.1", "localhost") \
        else [f"http://{address}:{port}/"]
    if address in ("", "0.0.0.0", "::"):
        urls += [f"http://{ip}:{port}/" for ip in lan_addresses()]
    return urls


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback, as far as the system says."""
    found = set()
    try:
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    except OSError:
        pass
    try:  # the address of the interface a route would use; connect() on UDP sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: a documentation address
            found.add(probe.getsockname()[0])
    except OSError:
        pass
    return sorted(ip for ip in found if not ip.startswith(("127.", "0.")))


async def run(limits: Limits, port: int, address: str, lesson: int) -> None:
    """Serve until Ctrl-C or SIGTERM, then shut down gracefully."""
    try:
        server, manager, port = serve(limits, port, address, lesson)
    except OSError as error:
        sys.exit(f"chat.py: cannot listen on port {port}: {error.strerror}. Try --port=N.")
    urls = addresses_to_share(port, address)
    log.info("chat server (lesson %d) on port %d. Press Ctrl-C to stop.", lesson, port)
    for url in urls:
        host = url.split("//")[1].split(":")[0]
        log.info("  open %s  or run: python client.py NAME --host %s --port %d", url, host, port)
    log.info("  status: %sstatus", urls[0])
    stop = asyncio.Event()
    stop_on_signals(stop)
    await stop.wait()
    await shutdown(server, manager)


class FlagParser(argparse.ArgumentParser):
    """argparse, with one sentence instead of a usage dump when a flag is wrong."""

    def error(self, message: str):
        """Stop with one line that says what is wrong and where to look."""
        self.exit(2, f"chat.py: {message}. See: python chat.py --help\n")


def port_number(text: str) -> int:
    """A --port value: a whole number from 1 to 65535."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), not {text!r}")
    return int(text)


def parse_flags(argv: list[str]) -> argparse.Namespace:
    """The command line: --port, --address, one flag per Limits field, --lesson, --logging."""
    parser = FlagParser(prog="python chat.py", description="A teaching-sized WebSocket chat server.",
                        epilog="--flag=VALUE and --flag VALUE both work; 0 switches a limit off.")
    parser.add_argument("--port", type=port_number, default=None, metavar="N",
                        help=f"TCP port to listen on; CHAT_PORT sets the default (default {default_port()})")
    parser.add_argument("--address", default="", metavar="IP",
                        help="address to listen on (default: every interface)")
    for limit_field in fields(Limits):
        parser.add_argument("--" + limit_field.name.replace("_", "-"), type=type(limit_field.default),
                            default=limit_field.default, metavar="N", dest=limit_field.name,
                            help=f"{limit_field.metadata['help']} (default {limit_field.default:g})"
                            if isinstance(limit_field.default, float) else
                            f"{limit_field.metadata['help']} (default {limit_field.default})")
    parser.add_argument("--lesson", type=int, choices=sorted(LESSONS), default=2,
                        help="1 runs Part I alone, the server of lesson 1 (default 2: everything)")
    parser.add_argument("--logging", choices=["debug", "info", "warning", "error", "none"],
                        default="info", help="how much the server logs (default info)")
    # --max_backlog works too, as Tornado-style flags did: underscores become dashes
    return parser.parse_args([re.sub(r"^(--[^=]+)", lambda m: m[1].replace("_", "-"), arg) for arg in argv])


def limits_from_flags(flags: argparse.Namespace) -> Limits:
    """Collect the limit flags into one Limits record; a nonsensical value stops the server."""
    limits = Limits(**{limit_field.name: getattr(flags, limit_field.name) for limit_field in fields(Limits)})
    for name, value in asdict(limits).items():
        if value < 0:
            sys.exit(f"chat.py: --{name.replace('_', '-')} cannot be negative (0 switches it off).")
    if limits.rate_per_second and limits.rate_burst < 1:
        sys.exit("chat.py: --rate-burst must be at least 1, or nobody could ever send a line.")
    return limits


def configure_logging(level_name: str) -> None:
    """One readable line per event on stderr, at the chosen level."""
    handler = logging.StreamHandler()
    handler.setFormatter(tornado.log.LogFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.CRITICAL + 1 if level_name == "none" else level_name.upper())


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, then run the server until it is told to stop."""
    flags = parse_flags(sys.argv[1:] if argv is None else argv)
    limits = limits_from_flags(flags)
    configure_logging(flags.logging)
    if flags.lesson >= 2:
        tune_for_a_crowd()  # Part II, section 15
    port = default_port() if flags.port is None else flags.port
    asyncio.run(run(limits, port, flags.address, flags.lesson))


# =====================================================================================
# Part II: holding a crowd
# =====================================================================================
# Part I is correct, but measure it (python tests/bench.py) and it falls over long
# before a class does something unusual. Each section below fixes one thing the
# numbers showed, as a subclass of a Part I class that overrides only what it
# changes. Section 15 puts the last subclasses together: that is `python chat.py`.


# ---- 9. Fast broadcast: one frame, the same bytes to every socket --------------------
# Problem: write_message() builds a frame and starts an asyncio task for every
# recipient: about 23 us a delivery, so one line to a 100-user room costs 2.3 ms and
# the server tops out near 50,000 deliveries a second on one core.
# Change: build the frame once per event and write its bytes straight to each
# member's socket; queue only what the kernel does not take at once.
# Cost: we write RFC 6455 frames ourselves (a few bytes of header), and rely on
# plain ws:// (no TLS, no compression), which chat.py serves.


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


class FastChatSocket(ChatSocket):
    """A ChatSocket whose send writes a once-built frame straight to the socket."""

    def open(self) -> None:
        """As in Part I, with TCP_NODELAY: a small chat frame goes out now, not 40 ms later."""
        super().open()
        if self.ws_connection is not None:  # None if open() refused and closed it
            self.set_nodelay(True)  # Nagle's algorithm gave a p99 latency of ~36 ms at light load
            self.ws_connection.stream.max_write_buffer_size = None  # bounded per write, in queue()

    def send(self, outbound: Outbound) -> None:
        """Write the event's frame now if nothing is queued; queue the rest, within the bound."""
        protocol = self.ws_connection
        if protocol is None or protocol.is_closing():
            return  # closed meanwhile: the member is gone, not an error
        if outbound.frame is None:  # built once, by the first member's send
            outbound.frame = websocket_text_frame(outbound.text.encode())
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
        stream.max_write_buffer_size = self.manager.limits.max_backlog or None
        try:
            stream.write(frame)
        except StreamBufferFullError:
            stream.max_write_buffer_size = None
            self.drop_slow_consumer()
        except StreamClosedError:
            pass  # on_close is on its way
        finally:
            stream.max_write_buffer_size = None


# ---- 10. Quiet big rooms -------------------------------------------------------------
# Problem: telling a whole room about each arrival makes C users connecting cost
# about C*C/2 deliveries: 50 million frames for 10,000 users in the lobby; a server
# that did this managed under 300 logins a second at only 300 users.
# Change: rooms above --announce-limit members get no join/leave notices, as big
# IRC channels and Slack stay quiet. Cost: in a big room you do not see arrivals.


class QuietRoomManager(RoomManager):
    """A RoomManager that stops announcing arrivals and departures in big rooms."""

    def announce(self, room: Room, text: str, event: str, about: User) -> None:
        """Tell the room, unless it is bigger than the announce limit (counting `about`)."""
        if len(room.members) <= self.limits.announce_limit:
            super().announce(room, text, event, about)


# ---- 11. Rate limit: a token bucket per user -----------------------------------------
# Problem: nothing stops one user from sending as fast as their script can. At
# 200 users x 2 lines a second in one room (80,000 deliveries a second offered),
# the backlog grows without bound: seconds of latency, hundreds of MB queued.
# Change: every line takes a token from the user's bucket, which refills at
# --rate-per-second up to --rate-burst; with none left, the line is refused with
# `retry_after`. People type a few lines a second, so they never notice.


@dataclass
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


@dataclass(eq=False)
class CrowdUser(User):
    """A User with the state Part II keeps per user."""

    bucket: TokenBucket | None = None  # the rate limit (this section)
    missed: deque | None = None  # messages that arrived while dropped (section 13)
    grace_timer: asyncio.TimerHandle | None = None  # ends a held session (section 13)


class RateLimitedRoomManager(QuietRoomManager):
    """A RoomManager where every line a user sends takes a token from their bucket."""

    def __init__(self, limits: Limits = Limits(), wall_clock: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic):
        """As in Part I, plus a steady clock for the buckets (tests pass their own)."""
        super().__init__(limits, wall_clock)
        self.clock = clock

    def new_user(self, username: str, connection: Connection) -> CrowdUser:
        """A user with a full bucket."""
        limits = self.limits
        bucket = TokenBucket(limits.rate_per_second, limits.rate_burst, limits.rate_burst, self.clock())
        return CrowdUser(username, secrets.token_urlsafe(24), connection, bucket=bucket)

    def handle_line(self, user: CrowdUser, line: str) -> None:
        """Refuse the line if the user's bucket is empty; otherwise handle it as in Part I."""
        retry_after = user.bucket.take(self.clock())
        if retry_after:
            self.refuse(user, Refusal("rate_limited", f"Slow down: you can send again in "
                                      f"{retry_after:.1f} s.", retry_after=round(retry_after, 3)))
            return
        super().handle_line(user, line)


# ---- 12. Keepalive and idle timeout --------------------------------------------------
# Problem: a laptop that sleeps or leaves the Wi-Fi sends no goodbye. Its socket
# looks open for hours (TCP notices nothing without traffic), its name stays taken
# and its seat counts against --max-connections. A user who walks away keeps theirs.
# Change: a WebSocket ping every --ping-interval seconds; a peer that does not answer
# within another interval is dropped. A user silent for --idle-timeout is told and
# closed with 4008. Both are timer callbacks on the loop, never sleeps.


class KeepaliveChatSocket(FastChatSocket):
    """A ChatSocket that pings its peer and closes a user who stays silent too long."""

    @classmethod
    def app_settings(cls, limits: Limits) -> dict:
        """Part I's settings, plus Tornado's pings (its ping timeout drops a silent peer)."""
        return {**super().app_settings(limits), "websocket_ping_interval": limits.ping_interval or None,
                "websocket_ping_timeout": limits.ping_interval or None}

    def open(self) -> None:
        """As before, then arm the idle timer."""
        self.last_active = time.monotonic()
        self.idle_timer: asyncio.TimerHandle | None = None
        super().open()
        if self.user is not None:
            self.schedule_idle_check(self.manager.limits.idle_timeout)

    def on_message(self, message: str | bytes) -> None:
        """Any frame counts as activity."""
        self.last_active = time.monotonic()
        super().on_message(message)

    def on_close(self) -> None:
        """Stop the idle timer, then as before."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        super().on_close()

    def schedule_idle_check(self, delay: float) -> None:
        """Arm the idle timer (a named callback on the loop, never a sleep)."""
        if self.manager.limits.idle_timeout > 0:
            self.idle_timer = asyncio.get_running_loop().call_later(delay, self.check_idle)

    def check_idle(self) -> None:
        """Timer callback: close the connection if its user has been silent for the idle timeout."""
        timeout = self.manager.limits.idle_timeout
        remaining = self.last_active + timeout - time.monotonic()
        if remaining > 0:  # they spoke since the timer was set: check again later
            self.schedule_idle_check(remaining)
            return
        text = f"Disconnected after {timeout:g} s without a message."
        self.send(Outbound(system_event(self.manager.timestamp(), text, event="idle")))
        self.close_by_server(CLOSE_IDLE, "idle timeout")


# ---- 13. Resume: a dropped user comes back -------------------------------------------
# Problem: on a school Wi-Fi, connections drop. In Part I the user leaves every
# room, everyone sees "left" and "joined" again, and what was said meanwhile is gone.
# Change: a connection that vanishes without a close frame keeps its session for
# --resume-grace seconds. Reconnecting with the `token` from `welcome` gets the same
# name, rooms and current room, and the missed messages (the last REPLAY_LIMIT_MESSAGES),
# with no leave/join noise. A close frame (with or without a code) still ends it at once.

REPLAY_LIMIT_MESSAGES = 100  # messages kept for a dropped user, replayed on resume


class ResumableRoomManager(RateLimitedRoomManager):
    """A RoomManager that holds a dropped user's session for a while, for resume."""

    def __init__(self, limits: Limits = Limits(), wall_clock: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic, call_later=None):
        """As before, plus the session index and a timer function (tests pass their own)."""
        super().__init__(limits, wall_clock, clock)
        self.call_later = call_later or (lambda delay, callback:
                                         asyncio.get_running_loop().call_later(delay, callback))
        self.sessions: dict[str, CrowdUser] = {}  # keyed by resume token
        self.online = 0  # users with a live connection (held sessions are not online)
        self.started_at = clock()

    def connect(self, username: str, token: str, connection: Connection) -> CrowdUser:
        """Resume a held session with its token, or log in as in Part I."""
        if token:
            return self.resume(username, token, connection)
        user = super().connect(username, token, connection)
        self.sessions[user.token] = user
        self.online += 1
        return user

    def name_taken(self, username: str, holder: CrowdUser) -> Refusal:
        """Say whether the name is online or held for someone reconnecting."""
        if holder.connection is not None:
            return super().name_taken(username, holder)
        return Refusal("username_taken", f"The username {username!r} is taken: someone "
                       "with that name is reconnecting. Pick another.", CLOSE_USERNAME_TAKEN)

    def welcome(self, user: CrowdUser, resumed: bool = False, missed: int = 0) -> dict:
        """Part I's welcome, saying whether this is a resume and how much was replayed."""
        return welcome_event(user, self.limits, resumed=resumed, missed=missed)

    def online_count(self) -> int:
        """Users with a live connection: held sessions do not count."""
        return self.online

    def resume(self, username: str, token: str, connection: Connection) -> CrowdUser:
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
        self.send(user, self.welcome(user, resumed=True, missed=len(missed)))
        self.send(user, joined_event(self.rooms[user.current_room]))
        for outbound in missed:  # in order, once: the buffer is gone now
            self.send(user, {**outbound.event, "replayed": True})
        return user

    def disconnect(self, user: CrowdUser, connection: Connection, reason: str, hold: bool = False) -> None:
        """A user's connection ended: hold the session for resume, or end it now."""
        if user.connection is not connection:
            return  # a newer connection took this session over: nothing ends
        user.connection = None
        self.online -= 1
        if hold and self.limits.resume_grace > 0:
            user.missed = deque(maxlen=REPLAY_LIMIT_MESSAGES)
            user.grace_timer = self.call_later(self.limits.resume_grace, lambda: self.expire(user))
        else:
            self.end_session(user, reason)

    def expire(self, user: CrowdUser) -> None:
        """Timer callback: the resume grace ran out, so the user leaves for good."""
        user.grace_timer = None
        if user.connection is None:
            self.end_session(user, "connection lost")
            log.info("session of %s expired (connections: %d)", user.username, len(self.connections))

    def end_session(self, user: CrowdUser, reason: str) -> None:
        """As in Part I, and forget the session: its token is dead."""
        if user.grace_timer is not None:
            user.grace_timer.cancel()
        super().end_session(user, reason)
        del self.sessions[user.token]

    def deliver(self, user: CrowdUser, outbound: Outbound) -> None:
        """Hand an event to the connection, or keep a message for replay while the user is away."""
        if user.connection is not None:
            user.connection.send(outbound)
        elif user.missed is not None and outbound.event["type"] == "message":
            user.missed.append(outbound)  # the deque keeps only the newest REPLAY_LIMIT_MESSAGES

    def status(self) -> dict:
        """Part I's status, plus held sessions and uptime."""
        return {**super().status(), "sessions_held": len(self.users) - self.online,
                "uptime_seconds": round(self.clock() - self.started_at, 3)}


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


class ResumableChatSocket(KeepaliveChatSocket):
    """A ChatSocket that holds the session when the connection vanishes without a goodbye."""

    def get_websocket_protocol(self):
        """Tornado's protocol, taught to notice a close frame even when it carries no code."""
        protocol = super().get_websocket_protocol()
        if protocol is not None:
            protocol.__class__ = GoodbyeNoticingProtocol  # same object, one method more
        return protocol

    def open(self) -> None:
        """Keep the protocol object: on_close needs it after Tornado lets go of it."""
        self.websocket_protocol = self.ws_connection
        super().open()

    def on_close(self) -> None:
        """A vanished client (no close frame, not closed by us) keeps its session for a while."""
        self.abrupt = not self.websocket_protocol.said_goodbye and not self.server_close_reason
        super().on_close()

    def leave_chat(self, reason: str) -> None:
        """Hold the session after an abrupt end; otherwise leave as in Part I."""
        if self.user is None or self.user.connection is not self:
            return
        hold = getattr(self, "abrupt", False)
        self.manager.disconnect(self.user, self, "connection lost" if hold else reason, hold=hold)
        held = " (session held for resume)" if self.user.grace_timer else ""
        log.info("disconnect %s: %s%s (connections: %d)", self.user.username,
                 "connection lost" if hold else reason, held, len(self.manager.connections))


# ---- 14. Hardening -------------------------------------------------------------------
# What one person with a script must not be able to take from the class.


# ---- 15. The crowd server: tuning, and the classes `python chat.py` runs --------------


class CrowdRoomManager(ResumableRoomManager):
    """The room manager of `python chat.py`: Part I plus every upgrade of Part II."""


class CrowdChatSocket(ResumableChatSocket):
    """The WebSocket handler of `python chat.py`: Part I plus every upgrade of Part II."""

    # Our attributes live in slots, not in each connection's __dict__. Tornado keeps 27
    # of its own there, and past 30 keys CPython stops sharing one key table among the
    # instances of a class: every connection then pays for a dict of its own, 1.3 KB
    # (tests/bench.py --only idle). An attribute added to a socket class belongs here too.
    __slots__ = ("manager", "user", "server_close_reason", "gone",  # section 6
                 "last_active", "idle_timer",  # section 12
                 "websocket_protocol", "abrupt")  # section 13


def crowd_http_server(app: tornado.web.Application, limits: Limits) -> HTTPServer:
    """An HTTP server that drops a connection which never finishes its handshake."""
    return HTTPServer(app, idle_connection_timeout=limits.handshake_timeout or None)


def raise_open_file_limit() -> None:
    """Allow as many sockets as the system lets us: each connection is an open file.

    Windows has no such limit to raise. macOS reports an infinite hard limit but
    refuses to go past its own cap, so we try smaller values until one is accepted.
    """
    try:
        import resource  # Unix only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    finite_hard = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for wanted in (finite_hard, 65536, 10240, 4096):
        if soft < wanted <= finite_hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                return
            except (ValueError, OSError):
                continue  # not allowed here: try a smaller one


def tune_for_a_crowd() -> None:
    """Process-wide settings for thousands of connections."""
    raise_open_file_limit()
    # About 90 tracked objects per connection: at the default threshold (700) the cycle
    # collector took 40% of the CPU of 10,000 users connecting (tests/bench.py --only idle).
    gc.set_threshold(50_000)


LESSONS = {  # what `--lesson=N` runs
    1: ServerParts(RoomManager, ChatSocket, lambda app, limits: HTTPServer(app)),
    2: ServerParts(CrowdRoomManager, CrowdChatSocket, crowd_http_server),
}


if __name__ == "__main__":
    main()
