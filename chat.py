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
runs to its end before the next one starts. So the chat state (users and
rooms) needs no locks: nothing can run in the middle of a function. Other
clients get a turn only at an `await`, and no code that changes chat state
contains one. Sending never waits either: a frame goes into the connection's
outgoing buffer and the loop writes it out when the socket is ready.

Two lessons in one file
-----------------------
Part I (sections 1-8) is a complete chat server: `python chat.py --lesson=1`.
Part II (sections 9-15) lets it hold a crowd: each upgrade is a small class or
function under a banner that names the problem, the number that showed it, the
change and its cost; section 15 puts them to work in one subclass of each Part I
class: `python chat.py`. The appendix (16) holds start-up details main() hands over to.

Sections
--------
Part I: a chat server
 1. Settings            Part I's limits, each once: default, unit and flag; the port
 2. Protocol            close codes, error codes, one builder per event type
 3. Pure helpers        names, text cleaning, timestamps
 4. Commands            the table of /commands; /help is built from it
 5. Room manager        all chat state, and every change to it
 6. WebSocket handler   open -> on_message -> on_close, and a bounded send
 7. Status endpoint     GET /status: the server's state as JSON
 8. Wiring and main     the application, main, Ctrl-C and a graceful shutdown
Part II: holding a crowd (it opens with CrowdLimits, the limits it adds)
 9. Fast broadcast      one frame, the same bytes to every socket
10. Quiet big rooms     join notices cost C*C/2 deliveries
11. Rate limits         a bucket per user and per room, and the door for a flooder
12. Keepalive and idle timeout   pings find dead peers; people who left free their seat
13. Resume              a dropped user keeps name, rooms and every missed message
14. Hardening           what one person with a script must not be able to take: 14.1 the doors,
    14.2 kernel buffers, 14.3 rooms, 14.4 protocol errors, 14.5 text that shows nothing
15. The crowd server    the classes `python chat.py` runs, each step named
Appendix: start-up details, which no lesson needs
16. Start-up            the page and its security policy, the log, signals, addresses, flags
"""

from __future__ import annotations  # a type may be named before its class is defined

import sys

if sys.version_info < (3, 9):  # before anything newer Pythons alone understand
    sys.exit("chat.py needs Python 3.9 or newer; this is Python %d.%d. "
             "Install a newer Python from python.org." % sys.version_info[:2])

import asyncio
import json
import logging
import os
import re
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from itertools import islice
from typing import Callable, NamedTuple, Protocol

import tornado.httputil
import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

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
    """The limits Part I enforces, each a flag of the same name; 0 switches it off.

    Part II adds its own in CrowdLimits, at the start of Part II.
    """

    max_message_length: int = limit(500, "longest chat line, in characters")
    max_connections: int = limit(1000, "users online at once")
    room_capacity: int = limit(200, "users per room; the lobby is exempt")
    max_backlog: int = limit(1024 * 1024, "unsent output per connection, in bytes, before "
                             "a client that stopped reading is dropped")

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame a client may send: a full-length line of 4-byte characters."""
        if not self.max_message_length:
            return 10 * 1024 * 1024  # no length limit: Tornado's own default, 10 MiB
        return max(4096, 4 * self.max_message_length + 64)  # 64 for what clean_text removes


DEFAULT_PORT = 8888


def is_port_number(text: str) -> bool:
    """A whole number from 1 to 65535, in plain digits ("²" is a digit, but no number)."""
    return text.isascii() and text.isdecimal() and 0 < int(text) < 65536


def default_port() -> int:
    """The port when no --port is given: $CHAT_PORT, else DEFAULT_PORT."""
    value = os.environ.get("CHAT_PORT", str(DEFAULT_PORT))
    if not is_port_number(value):
        sys.exit(f"chat.py: CHAT_PORT must be a port number (1-65535), not {value!r}.")
    return int(value)


# ---- 2. Protocol: codes and events ---------------------------------------------------

LOBBY = "lobby"
USER_LIST_LIMIT = 200  # names sent in one `joined` or `users` event

# WebSocket close codes. 1000-1015 are RFC 6455's; 4000-4999 are ours to define.
# (Part II adds its own, at the start of Part II.)
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_TOO_BIG = 1009  # a frame over max_frame_bytes (sent by Tornado itself)
CLOSE_BAD_USERNAME = 4001
CLOSE_USERNAME_TAKEN = 4002
CLOSE_SERVER_FULL = 4003
CLOSE_SLOW_CONSUMER = 4009


class Refusal(Exception):
    """A normal "no" to a user: becomes an `error` event (and a close, on connect)."""

    log_as = ""  # what the server log calls it, when "refused CODE" would mislead

    def __init__(self, code: str, text: str, close_code: int | None = None, **extra):
        """`code` for programs, `text` for people, `extra` fields for the event."""
        super().__init__(text)
        self.code, self.text, self.close_code, self.extra = code, text, close_code, extra


def welcome_event(user: User, limits: Limits, **extra) -> dict:
    """The first event on every connection: who you are, where you are, the limits."""
    return {"type": "welcome", "username": user.username, "room": user.current_room,
            "rooms": list(user.rooms), "token": user.token, **extra, "limits": asdict(limits)}


def message_event(timestamp: str, username: str, room: str, text: str) -> dict:
    """A chat line, as every member of the room receives it (the sender too)."""
    return {"type": "message", "timestamp": timestamp, "username": username, "room": room, "text": text}


def system_event(timestamp: str, text: str, room: str | None = None, **extra) -> dict:
    """A notice from the server: someone joined or left, or the server is shutting down."""
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
        self.frame: bytes | None = None  # the WebSocket frame, for a socket that builds it once


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


def new_token() -> str:
    """An unguessable session token: 24 random bytes, as 32 URL-safe characters."""
    return secrets.token_urlsafe(24)


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
    manager.send(user, manager.rooms_list())


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
    """Split `/join general` into ("join", "general"); None for chat text (`//x` included)."""
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
    token: str  # names the session; a client that knows it can come back as this user
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

    # -- arriving --

    def connect(self, username: str, token: str, connection: Connection) -> User:
        """Log a connection in as a new user, in the lobby. (Part I ignores the token.)"""
        # Check, then take: no `await` between them, so no other login can run in the
        # middle and take the same name. That is why there is no lock.
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
        self.check_not_full()

    def check_not_full(self) -> None:
        """Refuse a login when --max-connections users are online."""
        if self.limits.max_connections and self.online_count() >= self.limits.max_connections:
            raise Refusal("server_full", f"The server is full ({self.limits.max_connections} "
                          "users). Try again later.", CLOSE_SERVER_FULL)

    # -- leaving --

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

    # -- small steps of connect(), each its own method so it can be changed alone --

    def name_taken(self, username: str, holder: User) -> Refusal:
        """The refusal for a username someone else has."""
        return Refusal("username_taken", f"The username {username!r} is taken: someone with "
                       "that name is online. Pick another.", CLOSE_USERNAME_TAKEN)

    def new_user(self, username: str, connection: Connection) -> User:
        """A fresh user record with an unguessable session token."""
        return User(username, new_token(), connection)

    def welcome(self, user: User) -> dict:
        """The `welcome` event for this user."""
        return welcome_event(user, self.limits)

    def online_count(self) -> int:
        """Users with a live connection."""
        return len(self.users)

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

    def announce(self, room: Room, text: str, kind: str, about: User) -> None:
        """Tell a room's other members that someone joined or left (`kind`: "join" or "leave")."""
        notice = system_event(self.timestamp(), text, room.name, event=kind, username=about.username)
        self.broadcast(room, notice, skip=about)

    def broadcast(self, room: Room, event: dict, skip: User | None = None) -> None:
        """Deliver one event to every member of a room: encoded once, shared by all."""
        outbound = Outbound(event)
        # A copy: should a member leave while we loop, the dict changing size must not
        # stop the loop. A slow member is dropped after it.
        for member in list(room.members.values()):
            if member is not skip:
                self.deliver(member, outbound)

    def send(self, user: User, event: dict) -> None:
        """Deliver one event to one user."""
        self.deliver(user, Outbound(event))

    def deliver(self, user: User, outbound: Outbound) -> None:
        """Hand an event to the user's connection: the one place every delivery passes."""
        if user.connection is not None:
            user.connection.send(outbound)

    def timestamp(self) -> str:
        """Now, as a protocol timestamp."""
        return utc_timestamp(self.wall_clock())

    # -- reporting --

    def rooms_list(self) -> dict:
        """The `rooms` event that /rooms replies with: every room and its member count, by name."""
        return rooms_event(sorted(self.rooms.values(), key=lambda room: room.name))

    def status(self) -> dict:
        """What GET /status shows: connections, users, rooms and limits."""
        online = [user.username for user in self.users.values() if user.connection is not None]
        return {"connections": len(self.connections), "users": sorted(online),
                "rooms": self.rooms_list()["rooms"], "limits": asdict(self.limits)}


# ---- 6. WebSocket handler ------------------------------------------------------------
# Tornado calls open(), then on_message() for every frame, then on_close()
# exactly once, whether the client said goodbye or simply vanished. An
# exception in any of them is a bug: Tornado logs it with its traceback and
# closes only that one connection.

class ChatSocket(tornado.websocket.WebSocketHandler):
    """One client's connection: turns frames into manager calls, and events into frames."""

    def initialize(self, manager: RoomManager) -> None:
        """Called by Tornado for each new connection, before open()."""
        self.manager = manager
        self.user: User | None = None
        self.end_reason = ""  # why it ends, when it is not the client's plain goodbye
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
        # ws_connection is Tornado's WebSocket protocol; its stream, the TCP connection, queues
        # what is not sent yet, and past the bound send() drops the client.
        self.ws_connection.stream.max_write_buffer_size = self.manager.limits.max_backlog or None
        if self.manager.closing:  # a late arrival during shutdown
            self.say_goodbye()
            return
        try:
            self.user = self.manager.connect(*self.login_arguments(), self)
        except Refusal as refusal:
            self.send(Outbound(error_event(refusal.code, refusal.text, **refusal.extra)))
            self.close_by_server(refusal.close_code, refusal.code)
            log.info("%s from %s (connections: %d)", refusal.log_as or f"refused {refusal.code}",
                     self.request.remote_ip, len(self.manager.connections))
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
            return  # refused, or no longer this user's connection: it speaks for nobody now
        if isinstance(message, bytes):
            self.send(Outbound(error_event("binary_frame", "Send text frames: binary frames are not chat.")))
            return
        self.manager.handle_line(self.user, message)

    def on_close(self) -> None:
        """The connection is gone: unregister it and tell the manager."""
        self.manager.connections.discard(self)
        self.gone.set_result(None)
        if self.user is not None:
            self.leave_chat(self.end_reason or "quit")

    def leave_chat(self, reason: str) -> None:
        """This connection's user is done: they leave their rooms (once)."""
        if self.user is None or self.user.connection is not self:
            return  # refused, or no longer this user's connection
        self.manager.disconnect(self.user, self, reason)
        log.info("disconnect %s: %s (connections: %d)", self.user.username, reason,
                 len(self.manager.connections))

    # -- sending, and backpressure --
    # Backpressure: what a sender does when a receiver cannot keep up. Here: never wait
    # for it (everyone else would wait too), queue a bounded amount, then drop it.

    def send(self, outbound: Outbound) -> None:
        """Send an event without waiting; drop a client whose unsent output passes the bound."""
        if self.ws_connection is None or self.ws_connection.is_closing():
            return  # closed meanwhile: the member is gone, not an error
        try:
            self.write_event(outbound)
        except StreamBufferFullError:
            self.drop_slow_consumer()
        except (tornado.websocket.WebSocketClosedError, StreamClosedError):
            pass  # on_close is on its way

    def write_event(self, outbound: Outbound) -> None:
        """Hand the event's text to Tornado, which frames it and queues it within the bound."""
        write = self.write_message(outbound.text)
        if self.ws_connection.stream.writing():  # still queued: a close may cut it short
            write.add_done_callback(forget_unsent)

    def drop_slow_consumer(self) -> None:
        """This client stopped reading: close it rather than queue output forever."""
        log.warning("dropping %s: over %d bytes of unsent output", self.user and self.user.username,
                    self.manager.limits.max_backlog)
        self.close_by_server(CLOSE_SLOW_CONSUMER, "slow consumer: fell too far behind")
        # Tornado gives the client 5 s to answer the close. The user leaves the rooms sooner:
        # right after the broadcast under way (call_soon runs it next, not mid-loop).
        asyncio.get_running_loop().call_soon(self.leave_chat, "fell too far behind")

    def close_by_server(self, code: int, reason: str) -> None:
        """Close on purpose (refusal, slow, shutdown), lifting the bound so the close frame fits."""
        self.end_reason = reason
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


# ---- 8. Wiring and main --------------------------------------------------------------

def make_app(manager: RoomManager, socket_class: type[ChatSocket] = ChatSocket,
             status_class: type[StatusHandler] = StatusHandler, **settings) -> tornado.web.Application:
    """The Tornado application: the chat socket at /ws and the status at /status."""
    return tornado.web.Application(
        [(r"/ws", socket_class, {"manager": manager}), (r"/status", status_class, {"manager": manager})],
        **socket_class.app_settings(manager.limits), **settings)


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


def main(argv: list[str] | None = None) -> None:
    """Read the flags, then serve until Ctrl-C or SIGTERM, and shut down gracefully."""
    # The one hand-over to the rest of the file: start_up, in the appendix (section 16),
    # reads the flags and starts the log; it takes the lesson's classes from LESSONS
    # (Part I's, or section 15's crowd classes), listens, and calls shutdown at the end.
    start_up(sys.argv[1:] if argv is None else argv)


# =====================================================================================
# Part II: holding a crowd
# =====================================================================================
# Part I is correct, but measure it (python tests/bench.py) and it falls over long before
# a class does anything unusual. Each section fixes one thing the numbers showed; section
# 15 puts them to work, in one subclass of each Part I class: `python chat.py`.

import errno  # Part II needs these as well as Part I's imports
import gc
import heapq
import ipaddress
import math
import unicodedata
from array import array

# Part II's close codes (Part I's are in section 2; the README lists them all).
CLOSE_PROTOCOL_ERROR = 1002  # a frame that breaks RFC 6455 (section 14.4)
CLOSE_BAD_TOKEN = 4004  # resume with an unknown or used token (section 13)
CLOSE_ADDRESS_FULL = 4005  # too many sessions from one address group (section 13)
CLOSE_IDLE = 4008  # nothing typed for --idle-timeout (section 12)
CLOSE_REPLACED = 4010  # the same session resumed on a newer connection (section 13)
CLOSE_FLOODING = 4029  # kept sending after `rate_limited` (section 11)


@dataclass(frozen=True)
class CrowdLimits(Limits):
    """Part I's limits and Part II's, each a flag of the same name; 0 switches it off."""

    announce_limit: int = limit(100, "rooms with more users than this get no join/leave notices")
    rate_per_second: float = limit(5.0, "lines (and other frames) a user may send per second, on average")
    rate_burst: int = limit(10, "lines a user may send in a quick burst (at least 1)")
    room_budget: int = limit(20_000, "deliveries a second one room may cause (a line to N users is N)")
    server_budget: int = limit(60_000, "deliveries a second of the busy rooms together (quiet rooms: exempt)")
    flood_penalty: float = limit(10.0, "seconds a flooder's address group must wait to log in again")
    idle_timeout: float = limit(3 * 3600.0, "seconds without a typed line before a user is disconnected")
    ping_interval: float = limit(20.0, "seconds between keepalive pings; a peer silent for two is dropped")
    resume_grace: float = limit(30.0, "seconds a dropped session is held for resume (twice this in all)")
    max_per_address: int = limit(10, "users and held sessions, and handshakes, per address group")
    ipv6_prefix: int = limit(64, "leading bits an IPv6 address group shares (a /64 is one machine)")
    handshake_timeout: float = limit(10.0, "seconds a new connection has for its whole HTTP phase")
    max_handshakes: int = limit(256, "connections in their HTTP phase (at most 1/4 of the open-file limit)")
    handshake_rate: float = limit(5.0, "new connections a second per address group (bursts: twice that)")
    http_rate: float = limit(10.0, "HTTP requests a second per address group (bursts: twice that)")
    max_rooms: int = limit(1000, "rooms on the server, the lobby included")
    max_rooms_per_user: int = limit(20, "rooms one user may be in at once, the lobby included")


# ---- 9. Fast broadcast: one frame, the same bytes to every socket --------------------
# Problem: write_message() builds a frame and starts an asyncio task per recipient:
# 2.3 ms for one line to a room of 100; Nagle's algorithm held small frames back (p99 36 ms).
# Change: build the frame once per event, write its bytes straight to each socket, queue
# only what the kernel does not take; TCP_NODELAY. Cost: we frame RFC 6455 ourselves.

def websocket_text_frame(payload: bytes) -> bytes:
    """Frame UTF-8 bytes as one final, unmasked text frame (RFC 6455, section 5.2)."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return bytes((0x81, 126)) + length.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + length.to_bytes(8, "big") + payload


def write_frame(stream: IOStream, frame: bytes, max_backlog: int) -> None:
    """Write a frame now, queueing what the kernel does not take (StreamBufferFullError past the bound)."""
    if not stream.writing():  # nothing queued ahead of this frame, so order is kept
        try:
            sent = stream.socket.send(frame)
        except OSError:  # would block, or the connection broke: the stream handles both
            sent = 0
        if sent == len(frame):
            return
        frame = frame[sent:]
    # The bound is for chat frames only: Tornado's ping, pong and close must always fit.
    stream.max_write_buffer_size = max_backlog or None
    try:
        stream.write(frame)
    finally:
        stream.max_write_buffer_size = None


# ---- 10. Quiet big rooms -------------------------------------------------------------
# Problem: telling a whole room of each arrival makes C users connecting cost C*C/2
# deliveries: 50 million frames for 10,000 users in the lobby. Change: rooms above
# --announce-limit members get no join/leave notices. Cost: you do not see arrivals there.

def is_quiet(room: Room, announce_limit: int) -> bool:
    """Is the room too big for join and leave notices?"""
    return len(room.members) > announce_limit


# ---- 11. Rate limits: a bucket per user and per room, and the door for a flooder -----
# Problem: one script could send as fast as it liked, each refused line earned a reply,
# and one busy room (200 users x 5 lines/s) made a user in another room wait 4.6 s (p90).
# Change: every frame takes a token from the user's bucket (--rate-per-second, up to
# --rate-burst). The first refused gets `rate_limited`, the next ones nothing, and
# --rate-burst more close with 4029 (`flooding`); the address group waits --flood-penalty.
# A room may cause --room-budget deliveries a second, the busy rooms --server-budget in all.
# Cost: none a typist notices; a room of 1,000 carries 20 lines a second.

@dataclass
class TokenBucket:
    """A rate limit: tokens refill at `rate_per_second` up to `burst`; each line takes one."""

    rate_per_second: float
    burst: float
    tokens: float
    updated_at: float

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens (a line costs one): 0.0 if there were enough, else seconds until there are."""
        if self.rate_per_second <= 0:
            return 0.0
        refill = (now - self.updated_at) * self.rate_per_second
        self.tokens = min(self.burst, self.tokens + refill)
        self.updated_at = now
        cost = min(cost, self.burst)  # never more than a full bucket, or it could never be paid
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate_per_second


def rate_limited(retry_after: float, what: str = "you") -> Refusal:
    """The refusal for a line over a rate limit: try again in `retry_after` seconds."""
    return Refusal("rate_limited", f"Slow down: {what} can send again in {retry_after:.1f} s.",
                   retry_after=round(retry_after, 3))


class FloodGuard:
    """Every rate rule in one place: each user's bucket, each room's budget, and when to close."""

    def __init__(self, limits: CrowdLimits):
        """A user's bucket comes with the user, a room's with its first message; the server's is full."""
        self.limits = limits
        self.room_budgets: dict[str, TokenBucket] = {}  # keyed by room name
        rate = limits.server_budget  # the busy rooms' (each bucket holds a tenth of a second)
        self.server_budget = TokenBucket(rate, rate / 10, rate / 10, 0.0)

    def new_bucket(self, now: float) -> TokenBucket:
        """A full bucket for a user who just logged in."""
        burst = self.limits.rate_burst
        return TokenBucket(self.limits.rate_per_second, burst, burst, now)

    def admit_frame(self, user: CrowdUser, now: float) -> bool:
        """Take a token for one frame; False drops it unanswered, a Refusal says why (4029 closes)."""
        retry_after = user.bucket.take(now)
        if not retry_after:
            user.strikes = 0
            return True
        user.strikes += 1
        if user.strikes == 1:
            raise rate_limited(retry_after)  # told once ...
        if user.strikes > 1 + self.limits.rate_burst:  # ... and after a burst's worth of patience, closed
            raise Refusal("flooding", "You kept sending after being told to slow down: disconnected.",
                          CLOSE_FLOODING)
        return False

    def charge_room(self, room: Room, now: float) -> None:
        """A message costs its room one delivery per member; a room over its budget is busy."""
        if not self.limits.room_budget:
            return
        bucket = self.room_budgets.get(room.name)
        if bucket is None:  # a tenth of a second's worth at once: a whole second's held other rooms up
            rate = self.limits.room_budget
            bucket = self.room_budgets[room.name] = TokenBucket(rate, rate / 10, rate / 10, now)
        retry_after = bucket.take(now, cost=len(room.members))
        if retry_after:
            raise rate_limited(retry_after, f"#{room.name} is busy: you")
        # A room whose own bucket is still half full has been quiet: it never pays the server's.
        if bucket.tokens < bucket.burst / 2:
            retry_after = self.server_budget.take(now, cost=len(room.members))
            if retry_after:
                raise rate_limited(retry_after, "the server is busy: you")

    def forget_room(self, room_name: str) -> None:
        """A room that disappears takes its budget along."""
        self.room_budgets.pop(room_name, None)


# ---- 12. Keepalive and idle timeout --------------------------------------------------
# Problem: a laptop that sleeps or leaves the Wi-Fi sends no goodbye: its socket looks
# open for hours, its name stays taken. Change: a ping every --ping-interval; a peer that
# does not answer within another is gone (one who listens answers, and stays). Nothing
# typed for --idle-timeout (3 hours, more than a lesson) closes with 4008. Both are timer
# callbacks on the loop, never sleeps. Cost: a ping per interval.

class IdleTimer:
    """Calls `on_idle` once nothing was typed for `timeout` seconds; each line puts it off."""

    __slots__ = ("timeout", "on_idle", "clock", "call_later", "last_active", "handle")

    def __init__(self, timeout: float, on_idle: Callable[[], None], clock: Callable[[], float], call_later):
        """Arm the timer: a named callback on the loop."""
        self.timeout, self.on_idle, self.clock, self.call_later = timeout, on_idle, clock, call_later
        self.last_active = clock()
        self.handle = call_later(timeout, self.check)

    def touch(self) -> None:
        """The user typed a line: the idle time starts again."""
        self.last_active = self.clock()

    def cancel(self) -> None:
        """The connection is gone: never fire."""
        self.handle.cancel()

    def check(self) -> None:
        """Timer callback: idle now, or look again when the user could be."""
        remaining = self.last_active + self.timeout - self.clock()
        if remaining > 0:  # they typed since the timer was set
            self.handle = self.call_later(remaining, self.check)
        else:
            self.on_idle()


# ---- 13. Resume: a dropped user comes back, and loses nothing ------------------------
# Problem: on a school Wi-Fi connections drop. In Part I the user leaves every room,
# everyone sees "left" and "joined", and what was said meanwhile is gone.
# Change: a connection that vanishes without a close frame keeps its session for
# --resume-grace. Every `message` has a `seq`; each user keeps the last
# REPLAY_LIMIT_MESSAGES. The token from `welcome` (single use) and `last_seq` get back
# name, rooms and every later message (`missed`; `lost`: no longer kept), with no
# leave/join noise. Held sessions are bounded: --max-connections in all, --max-per-address
# per group, 2 x --resume-grace each, and a live user who needs a held seat gets it.
# Cost: 100 message references per user; under pressure a session may end early.

REPLAY_LIMIT_MESSAGES = 100  # messages kept per user, replayed on resume
LOST_COUNT_LIMIT = 1000  # messages counted for `lost` per user; past it, `lost` is "at least"


def last_seq_of(request: tornado.httputil.HTTPServerRequest) -> int | None:
    """The newest message seq a resuming client says it has (`&last_seq=N`), if it said."""
    raw = request.query_arguments.get("last_seq", [b""])[-1]
    return int(raw) if raw.isdigit() and len(raw) < 19 else None


@dataclass(eq=False)
class CrowdUser(User):
    """A User with the state Part II keeps per user."""

    bucket: TokenBucket | None = None  # the rate limit (section 11)
    strikes: int = 0  # frames refused since the last one the rate limit let through (11)
    address: str | None = None  # the address group the session counts against (13)
    history: deque | None = None  # the last messages delivered, for resume (13)
    forgotten: array | None = None  # seqs of messages that fell out of `history`, for `lost` (13)
    lost: int = 0  # messages the last resume could no longer replay (13)
    held_at_seq: int = 0  # the latest seq when the session was held (13)
    held_until: float = 0.0  # when a held session ends, on the manager's clock (13)
    held_since: float = 0.0  # when it was last held, on the manager's clock (13)
    held_for: float = 0.0  # seconds held before that, over all its drops (13)
    grace_timer: asyncio.TimerHandle | None = None  # ends a held session (13)


class CrowdConnection(Connection, Protocol):
    """What Part II's manager needs from a connection, beyond Part I's send and close."""

    address: str | None  # the client's address group (None: a connection without a socket, in tests)
    last_seq: int | None  # the newest message seq the client has, if it said (for resume)
    vanished: bool  # it ended without a close frame: hold the session for resume

    def hang_up(self, code: int, reason: str) -> None:
        """Close at once, without waiting for the client's answer (for a flooder)."""


class SessionStore:
    """Resumable sessions: tokens, held sessions and their timers, message numbers and history."""

    def __init__(self, limits: CrowdLimits):
        """Nothing held yet; the message counter starts at 0."""
        self.limits = limits
        self.by_token: dict[str, CrowdUser] = {}  # every session, online or held, keyed by token
        self.held: dict[CrowdUser, None] = {}  # held sessions, oldest first (a dict keeps order)
        self.per_address: dict[str, int] = {}  # users online plus held sessions, per address group
        self.seq = 0  # the seq of the latest message
        self.run = secrets.token_hex(3)  # starts this run's tokens: a token without it is from before a restart

    # -- tokens and addresses --

    def new_token(self) -> str:
        """An unguessable token that starts with this run's mark (a restart is told from an expiry)."""
        return f"{self.run}-{new_token()}"

    def find(self, username: str, token: str) -> CrowdUser:
        """The session this token names (for this username, if one is given), or a `bad_token` refusal."""
        user = self.by_token.get(token)
        if user is None or (username and fold(username) != fold(user.username)):
            refusal = Refusal("bad_token", "That session token is unknown or expired: connect "
                              "without a token to start a new session.", CLOSE_BAD_TOKEN)
            if not token.startswith(f"{self.run}-"):  # what it is, for the log: no refusal, a return
                refusal.log_as = f"{clean_text(username[:20]) or 'a user'} came back after a restart"
            raise refusal
        return user

    def add(self, user: CrowdUser, address: str | None) -> None:
        """A new session, counted against its address group."""
        self.by_token[user.token] = user
        self.move(user, address)

    def renew_token(self, user: CrowdUser) -> None:
        """Single use: the token just used is dead, and the user gets a new one."""
        del self.by_token[user.token]
        user.token = self.new_token()
        self.by_token[user.token] = user

    def check_address(self, address: str | None) -> None:
        """Refuse one more session from an address group that has --max-per-address already."""
        share = self.limits.max_per_address
        if share and not is_local(address) and self.per_address.get(address, 0) >= share:
            raise Refusal("address_full", f"Too many connections from your address ({share}): "
                          "close one, or wait a little.", CLOSE_ADDRESS_FULL)

    def move(self, user: CrowdUser, address: str | None) -> None:
        """Count the user's session against `address` (None: against no address any more)."""
        if user.address is not None:
            self.per_address[user.address] -= 1
            if not self.per_address[user.address]:
                del self.per_address[user.address]
        user.address = address
        if address is not None:
            self.per_address[address] = self.per_address.get(address, 0) + 1

    # -- messages: numbered, remembered, replayed --

    def number(self, event: dict) -> None:
        """Give a message the next seq."""
        self.seq += 1
        event["seq"] = self.seq

    def remember(self, user: CrowdUser, outbound: Outbound) -> None:
        """Keep a message delivered to this user, online or held: the newest REPLAY_LIMIT_MESSAGES."""
        if user.history is None:
            user.history = deque(maxlen=REPLAY_LIMIT_MESSAGES)
        elif len(user.history) == REPLAY_LIMIT_MESSAGES:  # the oldest falls out: keep its seq for `lost`
            if user.forgotten is None:
                user.forgotten = array("q")
            user.forgotten.append(user.history[0].event["seq"])
            if len(user.forgotten) > 2 * LOST_COUNT_LIMIT:
                del user.forgotten[:LOST_COUNT_LIMIT]
        user.history.append(outbound)

    def replay(self, user: CrowdUser, last_seq: int | None) -> list[Outbound]:
        """The messages after the client's last_seq that the user still has; `user.lost` counts the rest."""
        if last_seq is None:  # the client did not say: what came while held (nothing, if it was not)
            last_seq = user.held_at_seq if user.connection is None else self.seq
        user.lost = sum(seq > last_seq for seq in user.forgotten or ())
        return [outbound for outbound in user.history or () if outbound.event["seq"] > last_seq]

    # -- holding a session, and letting it go --

    def hold(self, user: CrowdUser, now: float, expire: Callable[[], None], call_later) -> list[CrowdUser]:
        """Hold a dropped user's session for its grace; returns the oldest sessions now over the bound."""
        grace = min(self.limits.resume_grace, 2 * self.limits.resume_grace - user.held_for)
        user.held_at_seq, user.held_since, user.held_until = self.seq, now, now + grace
        user.grace_timer = call_later(grace, expire)
        self.held[user] = None
        over = len(self.held) - self.limits.max_connections if self.limits.max_connections else 0
        return list(islice(self.held, max(0, over)))

    def release(self, user: CrowdUser, now: float) -> None:
        """A held session is back online (or ends): its timer stops, its held time is counted."""
        if user.grace_timer is not None:
            user.grace_timer.cancel()
            user.grace_timer = None
        if self.held.pop(user, 0) is None:  # it was held until now
            user.held_for += now - user.held_since

    def may_hold(self, user: CrowdUser) -> bool:
        """Is there grace left for this session? (Resume-and-drop must not hold a name forever.)"""
        return 0 < self.limits.resume_grace and user.held_for < 2 * self.limits.resume_grace

    def end(self, user: CrowdUser, now: float) -> None:
        """The session is over: its token is dead and its address group has one less."""
        self.release(user, now)
        self.move(user, None)
        del self.by_token[user.token]

    def held_in(self, room: Room) -> CrowdUser | None:
        """The oldest held session with a seat in this room."""
        return next((user for user in self.held if fold(user.username) in room.members), None)


# ---- 14. Hardening -------------------------------------------------------------------
# What one person with a script must not be able to take from the class. The numbers
# are what each attack did before the change; tests/test_attacks.py and test_doors.py
# replay them. This machine (127.0.0.1) is exempt from the per-address limits.


# ---- 14.1 The doors: descriptors, handshakes, requests, and each machine's share -----
# Problem: at the open-file limit Tornado's accept handler failed on every loop pass
# (11,600 tracebacks in 3 s); 26 addresses x 10 half-open handshakes filled all 256
# slots; pipelined `GET /` held a core even after the client had gone; one IPv6
# laptop (a /64) took all 1,000 seats in 1.4 s; behind a proxy all are one address.
# Change: addresses are grouped as machines are (IPv4 by address, IPv6 by
# --ipv6-prefix); a --trusted-proxy's X-Real-Ip / X-Forwarded-For names the client.
# Out of descriptors, accepting pauses (as nginx does). --max-handshakes connections
# may be in their HTTP phase, --max-per-address per group, --handshake-timeout in
# all; when full, a group with none pending takes the oldest slot of the biggest
# holder. Per group: --handshake-rate connections and --http-rate requests a second.
# Cost: our own accept loop. Behind a NAT, raise the per-group limits (or 0).

ACCEPT_PAUSE_SECONDS = 1.0  # how long accepting pauses when the process is out of file descriptors
MAX_REQUESTS_PER_CONNECTION = 100  # HTTP requests on one kept-alive connection
LOCAL_ADDRESSES = frozenset({"127.0.0.1", "::1"})  # this machine: exempt
OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                      getattr(errno, "WSAEMFILE", errno.EMFILE)}  # the last one: Windows


def address_group(address: str, ipv6_prefix: int) -> str:
    """The machine an address stands for: IPv4 itself, IPv6 its --ipv6-prefix network (0: itself)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.7 is 10.0.0.7
    if ip.version == 4 or ip.is_loopback or not 0 < ipv6_prefix < 128:
        return str(ip)
    return str(ipaddress.ip_network((ip, ipv6_prefix), strict=False))


def is_local(group: str | None) -> bool:
    """Is this the server's own machine? (None: a connection without a socket, in a test.)"""
    return group is None or group in LOCAL_ADDRESSES


def forwarded_client(headers: tornado.httputil.HTTPHeaders) -> str | None:
    """The client a trusted proxy names: X-Real-Ip, else the last X-Forwarded-For entry."""
    named = headers.get("X-Real-Ip") or headers.get("X-Forwarded-For", "").split(",")[-1]
    named = named.strip()
    try:
        return str(ipaddress.ip_address(named))
    except ValueError:
        return None


def client_group(request: tornado.httputil.HTTPServerRequest, ipv6_prefix: int) -> str:
    """The address group a request counts against; a client a proxy forwarded is never this machine."""
    group = address_group(request.remote_ip, ipv6_prefix)
    forwarded = getattr(request.connection.context, "forwarded", False)  # set by the door, if there is one
    return f"{group} via proxy" if forwarded and is_local(group) else group


def open_file_limit() -> int | None:
    """How many files this process may have open, where the system sets such a limit."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


class GuardedHTTPServer(HTTPServer):
    """The door keeper: rations connections and requests per address group, and pauses without descriptors."""

    def initialize(self, app: tornado.web.Application, limits: CrowdLimits,
                   trusted_proxies: frozenset[str] = frozenset()) -> None:
        """Tornado's server, plus the counts the limits need (handle_stream times the HTTP phase)."""
        super().initialize(app)
        self.limits, self.trusted_proxies, self.stopped = limits, trusted_proxies, False
        caps = [cap for cap in (limits.max_handshakes, (open_file_limit() or 0) // 4) if cap]
        self.max_handshakes = min(caps) if caps else 0
        self.handshaking: dict[IOStream, tuple[str, asyncio.TimerHandle | None]] = {}  # oldest first
        self.handshakes_from: dict[str, int] = {}  # connections in their HTTP phase, per group
        self.rates: dict[tuple[str, str], TokenBucket] = {}  # (what, group) -> bucket
        self.refused, self.refused_logged_at = 0, 0.0

    def group(self, address: str) -> str:
        """The address group a peer's address counts against."""
        return address_group(address, self.limits.ipv6_prefix)

    # -- accepting --

    def add_sockets(self, sockets: list[socket.socket]) -> None:
        """Listen as Tornado does, but accept with our own handler, which can pause."""
        super().add_sockets(sockets)
        for sock in sockets:
            IOLoop.current().remove_handler(sock)  # Tornado's accept handler ...
            IOLoop.current().add_handler(sock, self.accept, IOLoop.READ)  # ... becomes ours

    def stop(self) -> None:
        """Stop listening for good, even if a pause was about to end."""
        self.stopped = True
        super().stop()

    def accept(self, sock: socket.socket, events: int) -> None:
        """Accept the connections waiting (at most a listen backlog, as Tornado does)."""
        for _ in range(128):
            try:
                connection, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # nobody else is waiting
            except ConnectionAbortedError:
                continue  # gone before we got to it
            except OSError as error:
                if error.errno not in OUT_OF_DESCRIPTORS:
                    raise
                IOLoop.current().remove_handler(sock)  # try again later, instead of on every loop pass
                log.warning("cannot accept connections: %s (%d handshakes under way); trying again "
                            "in %g s", error.strerror, len(self.handshaking), ACCEPT_PAUSE_SECONDS)
                IOLoop.current().call_later(ACCEPT_PAUSE_SECONDS, self.resume_accepting, sock)
                return
            self.admit(connection, address)

    def resume_accepting(self, sock: socket.socket) -> None:
        """Timer callback: accept again, unless the server stopped meanwhile."""
        if not self.stopped:
            IOLoop.current().add_handler(sock, self.accept, IOLoop.READ)

    def admit(self, connection: socket.socket, address: tuple) -> None:
        """Hand a new connection to Tornado, or close it at once if it is over a limit."""
        reason = self.over_limit(address[0])
        if reason:
            connection.close()
            self.note_refusal(reason)
            return
        limit_send_buffer(connection)  # section 14.2
        stream = IOStream(connection, max_buffer_size=self.max_buffer_size,
                          read_chunk_size=self.read_chunk_size)
        self.handle_stream(stream, address)

    def over_limit(self, address: str) -> str:
        """Why a new connection from `address` must be refused now; "" if it may come in."""
        group, proxied = self.group(address), address in self.trusted_proxies
        pending = self.handshakes_from.get(group, 0)
        if not (is_local(group) or proxied):
            share = self.limits.max_per_address
            if share and pending >= share:
                return f"{share} connections from {group} already in their HTTP phase"
            if self.limits.handshake_rate and self.bucket("connect", group, self.limits.handshake_rate):
                return f"more than {self.limits.handshake_rate:g} new connections a second from {group}"
        if self.max_handshakes and len(self.handshaking) >= self.max_handshakes:
            if pending:  # a group with handshakes pending waits its turn ...
                return f"{self.max_handshakes} connections already in their HTTP phase"
            self.end_handshake(self.oldest_of_biggest_holder())  # ... one with none takes a slot
        return ""

    def bucket(self, what: str, group: str, rate: float) -> float:
        """Take a token from a group's bucket of `what` (section 11's bucket); seconds to wait, or 0."""
        now = time.monotonic()
        bucket = self.rates.get((what, group))
        if bucket is None:
            if len(self.rates) >= 10_000:  # many groups: forget those that have been quiet
                self.rates = {key: b for key, b in self.rates.items() if now - b.updated_at < 60}
            bucket = self.rates[(what, group)] = TokenBucket(rate, max(1.0, 2 * rate), max(1.0, 2 * rate), now)
        return bucket.take(now)

    def oldest_of_biggest_holder(self) -> IOStream:
        """The longest-waiting connection of the group holding the most handshake slots."""
        biggest = max(self.handshakes_from, key=self.handshakes_from.__getitem__)
        return next(stream for stream, (group, _) in self.handshaking.items() if group == biggest)

    def note_refusal(self, reason: str) -> None:
        """Count a refused connection; log at most once a second, so a flood cannot fill the log."""
        self.refused += 1
        now = time.monotonic()
        if now - self.refused_logged_at >= ACCEPT_PAUSE_SECONDS:
            log.warning("refused %d new connection(s): %s", self.refused, reason)
            self.refused, self.refused_logged_at = 0, now

    # -- the HTTP phase: from accept until a WebSocket takes over --

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        """Count the connection as in its HTTP phase, which has --handshake-timeout seconds in all."""
        group = self.group(address[0])
        timeout = self.limits.handshake_timeout
        timer = IOLoop.current().call_later(timeout, self.end_handshake, stream) if timeout else None
        self.handshaking[stream] = (group, timer)
        self.handshakes_from[group] = self.handshakes_from.get(group, 0) + 1
        stream.peer, stream.requests = address[0], 0  # who is at the other end; requests served (GuardedRequest)
        super().handle_stream(stream, address)

    def end_handshake(self, stream: IOStream) -> None:
        """Close a connection still in its HTTP phase (timed out, or its slot was wanted)."""
        if stream in self.handshaking:
            stream.close()

    def on_close(self, server_conn) -> None:
        """Tornado's HTTP phase ended (a WebSocket took over, or the connection closed)."""
        group, timer = self.handshaking.pop(server_conn.stream, (None, None))
        if group is not None:
            if timer is not None:
                timer.cancel()
            self.handshakes_from[group] -= 1
            if not self.handshakes_from[group]:
                del self.handshakes_from[group]
        super().on_close(server_conn)

    def start_request(self, server_conn, request_conn) -> tornado.httputil.HTTPMessageDelegate:
        """Each request passes the door's checks before the application sees it."""
        return GuardedRequest(self, server_conn.stream, request_conn,
                              super().start_request(server_conn, request_conn))


class GuardedRequest(tornado.httputil.HTTPMessageDelegate):
    """One HTTP request at the door: who sent it (through a trusted proxy?), and is it within the rates?"""

    def __init__(self, door: GuardedHTTPServer, stream: IOStream, connection, app_delegate):
        """Wrap the application's handling of one request."""
        self.door, self.stream, self.connection, self.app = door, stream, connection, app_delegate
        self.refused = False

    def headers_received(self, start_line, headers):
        """Name the client, then serve the request, or answer 429 if it is over a rate."""
        context, self.stream.requests = self.connection.context, self.stream.requests + 1
        context.forwarded = self.stream.peer in self.door.trusted_proxies
        context.remote_ip = (forwarded_client(headers) or "unknown") if context.forwarded else self.stream.peer
        group = self.door.group(context.remote_ip)
        retry_after = 1.0 if self.stream.requests > MAX_REQUESTS_PER_CONNECTION else 0.0
        if self.door.limits.http_rate and (context.forwarded or not is_local(group)):
            retry_after = retry_after or self.door.bucket("http", group, self.door.limits.http_rate)
        if self.stream.closed() or retry_after:
            self.refused = True
            if not self.stream.closed():  # a client that has gone is not served, nor answered
                self.too_many(retry_after)
            return None
        return self.app.headers_received(start_line, headers)

    def too_many(self, retry_after: float) -> None:
        """429, and the connection closes: nothing more is read from it."""
        self.door.note_refusal(f"too many HTTP requests from {self.connection.context.remote_ip}")
        headers = tornado.httputil.HTTPHeaders({"Retry-After": str(max(1, round(retry_after))),
                                                "Connection": "close", "Content-Length": "0"})
        self.connection.write_headers(tornado.httputil.ResponseStartLine("HTTP/1.1", 429, "Too Many Requests"),
                                      headers)
        self.connection.finish()

    def data_received(self, chunk):
        """A request body: the application's, unless the request was refused."""
        return None if self.refused else self.app.data_received(chunk)

    def finish(self) -> None:
        """The request is complete."""
        if not self.refused:
            self.app.finish()

    def on_connection_close(self) -> None:
        """The connection closed midway."""
        if not self.refused:
            self.app.on_connection_close()


# ---- 14.2 A client that stops reading: the kernel's buffer counts too ----------------
# Problem: --max-backlog bounds what waits in this process for a client that
# stopped reading, but the kernel's send buffer for its socket grows by itself up to
# 4 MiB: 580 stalled readers held 1.5 GB of kernel memory.
# Change: every accepted socket gets a fixed SEND_BUFFER_BYTES send buffer (Linux
# doubles it for its bookkeeping), so a stalled reader costs at most --max-backlog
# plus 128 KiB. Cost: none a class notices; on a LAN 128 KiB in flight moves 100 MB/s.

SEND_BUFFER_BYTES = 64 * 1024


def limit_send_buffer(connection: socket.socket) -> None:
    """Fix the kernel's send buffer of a new connection (it no longer grows by itself)."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    except OSError:
        pass  # a system that will not set it keeps its own size


# ---- 14.3 Rooms: how many, and what listing them costs -------------------------------
# Problem: rooms had no limit, per user or in total: 5,600 held sessions made 50,401
# rooms, one /rooms reply was 1.45 MB for a 7-byte request, GET /status took up to
# 395 ms, and with 10,000 users online each /status reply was 119 KB.
# Change: a user may be in --max-rooms-per-user rooms (IRC's CHANLIMIT; then
# `too_many_rooms`), the server may have --max-rooms (then `no_more_rooms`, unless a
# room kept only by held sessions can make way). /rooms and /status list the
# ROOM_LIST_LIMIT biggest rooms and count the others in `more`; /status lists at most
# USER_LIST_LIMIT users and is computed at most once per STATUS_CACHE_SECONDS.
# Cost: on a busy server the small rooms go unlisted; /status may be a second old.

ROOM_LIST_LIMIT = 50  # rooms listed by /rooms and GET /status
STATUS_CACHE_SECONDS = 1.0  # GET /status is computed at most this often


def check_room_caps(user: User, room: Room | None, room_count: int, limits: CrowdLimits) -> None:
    """Refuse a room past --max-rooms-per-user, or a new room past --max-rooms."""
    if limits.max_rooms_per_user and len(user.rooms) >= limits.max_rooms_per_user:
        raise Refusal("too_many_rooms", f"You are in {len(user.rooms)} rooms, the most one "
                      "user may be in. /leave one first.")
    if room is None and limits.max_rooms and room_count >= limits.max_rooms:
        raise Refusal("no_more_rooms", f"The server has {limits.max_rooms} rooms, the most it "
                      "allows: join one that exists (/rooms lists them).")


def biggest_rooms(rooms: list[Room]) -> list[Room]:
    """The ROOM_LIST_LIMIT biggest rooms (ties by name), in name order."""
    biggest = heapq.nsmallest(ROOM_LIST_LIMIT, rooms, key=lambda room: (-len(room.members), room.name))
    return sorted(biggest, key=lambda room: room.name)


# ---- 14.4 Protocol errors: close code 1002, and the session ends ---------------------
# Problem: Tornado accepted frames a client sent unmasked (RFC 6455 5.1: the server
# must close), echoed any close code back, 1005, 1006 and out-of-range ones included
# (7.4.1: never sent), and on a malformed frame dropped the socket without a close
# frame, so the session was held for resume as if the network had failed. And it
# reports close_code None both for a vanished client and for a close frame without a
# code (a browser's plain ws.close()); only the first should hold the session.
# Change: one subclass of Tornado's protocol notes every close frame, checks the
# mask bit of every frame and the code of a close frame, and answers each protocol
# error with close code 1002; the session ends at once.
# Cost: three overrides of Tornado's private frame reading (Tornado 6).

VALID_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def is_valid_close_payload(data: bytes) -> bool:
    """A close frame's body: empty, or a code a peer may send (RFC 6455 7.4) and a UTF-8 reason."""
    if not data:
        return True
    if len(data) < 2:
        return False
    code = int.from_bytes(data[:2], "big")
    if not (code in VALID_CLOSE_CODES or 3000 <= code <= 4999):
        return False
    try:
        data[2:].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class CrowdProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's WebSocket protocol, noticing goodbyes and closing with 1002 on every protocol error."""

    said_goodbye = False  # the client sent a close frame (with or without a code)

    # Tornado sets _frame_mask only when a frame has a mask, so clearing it first tells
    # us whether each frame had one. (Not an attribute of our own: one added to this
    # object after its class changed would cost every connection a dict of its own.)

    async def _receive_frame(self) -> None:
        """Read one frame as Tornado does; clients must mask every frame."""
        self._frame_mask = None
        await super()._receive_frame()
        if self._frame_mask is None:  # a fragment Tornado has only buffered so far
            self.protocol_error("an unmasked frame")

    def _handle_message(self, opcode: int, data: bytes):
        """Note a close frame; an unmasked frame or a close code no peer may send is an error."""
        if self._frame_mask is None:
            self.protocol_error("an unmasked frame")
            return None
        if opcode == 0x8:
            self.said_goodbye = True
            if not is_valid_close_payload(data):
                self.protocol_error("an invalid close frame")
                return None
        return super()._handle_message(opcode, data)

    def _abort(self) -> None:
        """Tornado drops a connection here; if it is still open, the client broke the protocol."""
        if not self.server_terminated and not self.stream.closed():
            self.protocol_error("a malformed frame")
        super()._abort()

    def protocol_error(self, what: str) -> None:
        """Close with 1002 and read no more from this client; its session ends (it is not held)."""
        if self.server_terminated:
            return
        self.handler.end_reason = "protocol error"
        log.info("protocol error from %s: %s", self.handler.request.remote_ip, what)
        self.close(CLOSE_PROTOCOL_ERROR, f"protocol error: {what}")
        self.client_terminated = True


# ---- 14.5 Text that shows nothing ----------------------------------------------------
# Problem: a line of only U+3164 (Hangul filler), U+200B (zero-width space) or U+2800
# (blank Braille) passed the empty check and arrived as a blank message; format
# characters (text hidden from a filter, invisible "tag" letters) were relayed, and
# 400 combining marks stacked on one letter drew a tower across everyone's screen.
# Change: format characters are dropped, except the zero-width joiner that emoji
# sequences need; a run of combining marks keeps its first MAX_COMBINING_MARKS; a
# line with nothing visible left is empty.
# Cost: flags made of tag characters (England, Scotland) show as a plain black flag.

MAX_COMBINING_MARKS = 4  # Vietnamese stacks 2 on a letter; a keycap emoji has 2
ZERO_WIDTH_JOINER = "\u200d"  # joins emoji: woman + ZWJ + laptop is one "woman technologist"
BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # letters and symbols that draw nothing


def visible_text(text: str) -> str:
    """The text without format characters or long runs of marks; "" if nothing in it shows."""
    if text.isascii():
        return text  # most lines: nothing to drop (Part I's check finds lines of only spaces)
    kept, marks, shows = [], 0, False
    for char in text:
        category = unicodedata.category(char)
        if category == "Cf" and char != ZERO_WIDTH_JOINER:
            continue
        marks = marks + 1 if category in ("Mn", "Me") else 0
        if marks > MAX_COMBINING_MARKS:
            continue
        kept.append(char)
        blank = char.isspace() or char in BLANK_CHARACTERS or category in ("Cc", "Cf", "Mn", "Me")
        shows = shows or not blank
    return "".join(kept) if shows else ""


# ---- 15. The crowd server: the classes `python chat.py` runs -------------------------
# One subclass of each Part I class. Each method is the ordered list of Part II's
# steps for one action, each naming its section, and then Part I's own method. So
# the answer to "what happens when I send a line?" is on one screen: the socket's
# on_message, then the manager's say, broadcast and deliver, then write_event.

class CrowdRoomManager(RoomManager):
    """The room manager of `python chat.py`: Part I's, with Part II's steps before each action."""

    def __init__(self, limits: CrowdLimits = CrowdLimits(), wall_clock: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic, call_later=None):
        """Part I's state and Part II's collaborators; the steady clock and the timers can be swapped in tests."""
        super().__init__(limits, wall_clock)
        self.clock = clock
        self.call_later = call_later or (lambda delay, callback:
                                         asyncio.get_running_loop().call_later(delay, callback))
        self.guard = FloodGuard(limits)  # section 11
        self.sessions = SessionStore(limits)  # section 13
        self.penalties: dict[str, float] = {}  # flooders' address groups -> when they may log in (11)
        self.status_cache: tuple[float, bytes] | None = None  # (when, GET /status's body) (14.3)
        self.started_at = clock()

    # -- arriving --

    def connect(self, username: str, token: str, connection: CrowdConnection) -> CrowdUser:
        """A flooder's group waits (11); a token resumes (13); a new session must fit its group (13)."""
        self.check_penalty(connection.address)
        if token:
            return self.resume(username, token, connection)
        self.sessions.check_address(connection.address)
        user = super().connect(username, token, connection)
        self.sessions.add(user, connection.address)
        return user

    def resume(self, username: str, token: str, connection: CrowdConnection) -> CrowdUser:
        """Section 13: give a session back to its owner, with what it missed and a new token."""
        user = self.sessions.find(username, token)
        if user.connection is None:
            self.check_not_full()
        if connection.address != user.address:
            self.sessions.check_address(connection.address)
        # Checked; now take the session over (no `await` here: nobody can come between).
        missed = self.sessions.replay(user, connection.last_seq)
        self.sessions.renew_token(user)
        self.sessions.release(user, self.clock())
        self.sessions.move(user, connection.address)
        old_connection, user.connection = user.connection, connection
        if old_connection is not None:  # the old one may be half-open: it hands over
            old_connection.close(CLOSE_REPLACED, "session resumed on a newer connection")
        self.send(user, self.welcome(user, resumed=True, missed=len(missed)))
        self.send(user, joined_event(self.rooms[user.current_room]))
        for outbound in missed:  # in order, once
            self.send(user, {**outbound.event, "replayed": True})
        return user

    def name_taken(self, username: str, holder: CrowdUser) -> Refusal:
        """A held name is someone reconnecting: say so, and when it is free at the latest (13)."""
        if holder.connection is not None:
            return super().name_taken(username, holder)
        wait = max(0.0, holder.held_until - self.clock())
        return Refusal("username_taken", f"The username {username!r} is taken: someone with that name "
                       "is reconnecting. Pick another.", CLOSE_USERNAME_TAKEN, held=True, retry_after=round(wait, 3))

    def new_user(self, username: str, connection: CrowdConnection) -> CrowdUser:
        """A user with a full bucket (11)."""
        return CrowdUser(username, self.sessions.new_token(), connection, bucket=self.guard.new_bucket(self.clock()))

    def welcome(self, user: CrowdUser, resumed: bool = False, missed: int = 0) -> dict:
        """Part I's welcome, saying whether this is a resume, how much it replays and how much is lost (13)."""
        return welcome_event(user, self.limits, resumed=resumed, missed=missed, lost=user.lost if resumed else 0)

    def online_count(self) -> int:
        """Users with a live connection: held sessions do not count (13)."""
        return len(self.users) - len(self.sessions.held)

    def check_penalty(self, group: str | None) -> None:
        """Refuse a login from an address group that flooded, until its --flood-penalty is over (11)."""
        until = self.penalties.get(group)
        if until is not None:
            wait = until - self.clock()
            if wait > 0:
                raise Refusal("flooding", f"Your address flooded the server: you can log in again in "
                              f"{math.ceil(wait)} s.", CLOSE_FLOODING, retry_after=round(wait, 3))
            del self.penalties[group]

    # -- leaving --

    def disconnect(self, user: CrowdUser, connection: CrowdConnection, reason: str) -> None:
        """A connection that vanished keeps its session for a while (13); otherwise Part I's leaving."""
        if not (connection.vanished and self.sessions.may_hold(user)):
            return super().disconnect(user, connection, reason)
        user.connection = None
        for oldest in self.sessions.hold(user, self.clock(), lambda: self.expire(user), self.call_later):
            self.end_early(oldest, "too many sessions held")

    def expire(self, user: CrowdUser) -> None:
        """Timer callback: the resume grace ran out, so the user leaves for good (13)."""
        user.grace_timer = None
        if user.connection is None and user in self.sessions.held:
            self.end_early(user, "its resume grace ran out")

    def end_session(self, user: CrowdUser, reason: str) -> None:
        """The token dies and the address group has one session less (13); then Part I's leaving."""
        self.sessions.end(user, self.clock())
        super().end_session(user, reason)

    def end_early(self, user: CrowdUser, why: str) -> None:
        """End a held session (its rooms are told, its name is free) and say why in the log (13)."""
        self.end_session(user, "connection lost")
        log.info("session of %s ended: %s (connections: %d)", user.username, why, len(self.connections))

    # -- rooms --

    def join(self, user: CrowdUser, room_name: str) -> None:
        """The room caps (14.3), held sessions make way for a live user (13); then Part I's join."""
        room = self.rooms.get(room_name)
        if room is None or fold(user.username) not in room.members:
            try:
                check_room_caps(user, room, len(self.rooms), self.limits)
            except Refusal as refusal:
                if refusal.code != "no_more_rooms" or not self.end_a_held_room():
                    raise
            capacity = self.limits.room_capacity
            if room is not None and capacity and room_name != LOBBY and len(room.members) >= capacity:
                squatter = self.sessions.held_in(room)
                if squatter is not None:
                    self.end_early(squatter, f"its seat in #{room_name} was wanted")
        super().join(user, room_name)

    def end_a_held_room(self) -> bool:
        """Free a room that only held sessions keep, for a live user who wants a new one (13)."""
        for room in list(self.rooms.values()):
            if room.name != LOBBY and all(member.connection is None for member in room.members.values()):
                for member in list(room.members.values()):
                    self.end_early(member, f"#{room.name} was wanted")
                return True
        return False

    def remove_member(self, user: CrowdUser, room: Room) -> None:
        """Part I's; a room that disappears takes its budget along (11)."""
        super().remove_member(user, room)
        if room.name not in self.rooms:
            self.guard.forget_room(room.name)

    # -- frames, lines, messages and delivery --

    def admit_frame(self, user: CrowdUser) -> bool:
        """Section 11: every frame a user sends takes a token; False if this one goes unanswered."""
        try:
            return self.guard.admit_frame(user, self.clock())
        except Refusal as refusal:
            self.refuse(user, refusal)
            return False

    def refuse(self, user: CrowdUser, refusal: Refusal) -> None:
        """Part I's refusal; one with a close code (flooding, 11) also ends the session at once."""
        super().refuse(user, refusal)
        connection = user.connection
        if refusal.close_code is not None and connection is not None:
            log.warning("dropping %s: %s", user.username, refusal.code)
            if self.limits.flood_penalty and not is_local(connection.address):
                self.penalties[connection.address] = self.clock() + self.limits.flood_penalty
            self.disconnect(user, connection, refusal.code)
            connection.hang_up(refusal.close_code, refusal.code)

    def say(self, user: CrowdUser, line: str) -> None:
        """Drop what cannot be seen (14.5); then Part I's checks and broadcast."""
        super().say(user, visible_text(line))

    def announce(self, room: Room, text: str, kind: str, about: CrowdUser) -> None:
        """Big rooms stay quiet (10); then Part I's notice."""
        if not is_quiet(room, self.limits.announce_limit):
            super().announce(room, text, kind, about)

    def broadcast(self, room: Room, event: dict, skip: CrowdUser | None = None) -> None:
        """A message must fit its room's budget (11), then gets its seq (13); then Part I's broadcast."""
        if event["type"] == "message":
            self.guard.charge_room(room, self.clock())  # may refuse: a refused line gets no seq
            self.sessions.number(event)
        super().broadcast(room, event, skip)

    def deliver(self, user: CrowdUser, outbound: Outbound) -> None:
        """Each message is kept for the user's resume (13); then Part I's delivery."""
        if outbound.event["type"] == "message" and "replayed" not in outbound.event:
            self.sessions.remember(user, outbound)
        super().deliver(user, outbound)

    # -- reporting --

    def rooms_list(self) -> dict:
        """The ROOM_LIST_LIMIT biggest rooms, by name; `more` counts the rest (14.3)."""
        listed = rooms_event(biggest_rooms(list(self.rooms.values())))
        return {**listed, "more": len(self.rooms) - len(listed["rooms"])}

    def status(self) -> dict:
        """Part I's report with at most USER_LIST_LIMIT users (14.3), plus held sessions and uptime (13)."""
        report = super().status()
        names = report["users"]
        return {**report, "users": names[:USER_LIST_LIMIT], "user_count": len(names),
                "more_rooms": len(self.rooms) - len(report["rooms"]), "sessions_held": len(self.sessions.held),
                "uptime_seconds": round(self.clock() - self.started_at, 3)}

    def status_json(self) -> bytes:
        """GET /status's body, computed at most once per STATUS_CACHE_SECONDS (14.3)."""
        now = self.clock()
        if self.status_cache is None or now - self.status_cache[0] >= STATUS_CACHE_SECONDS:
            self.status_cache = (now, json.dumps(self.status()).encode())
        return self.status_cache[1]


class CrowdChatSocket(ChatSocket):
    """The WebSocket handler of `python chat.py`: Part I's, with Part II's steps before each action."""

    # Our attributes live in slots, not in each connection's __dict__: Tornado keeps 27
    # of its own there, and past 30 keys every connection would pay for a dict of its
    # own (1.3 KB). An attribute added to the socket belongs here too.
    __slots__ = ("manager", "user", "end_reason", "gone",  # Part I
                 "address", "last_seq", "vanished", "websocket_protocol", "idle_timer")  # Part II

    @classmethod
    def app_settings(cls, limits: CrowdLimits) -> dict:
        """Part I's settings, plus Tornado's keepalive pings (12): a peer with no pong in time is dropped."""
        return {**super().app_settings(limits), "websocket_ping_interval": limits.ping_interval or None,
                "websocket_ping_timeout": limits.ping_interval or None}

    def get_websocket_protocol(self):
        """Tornado's protocol as section 14.4's CrowdProtocol: the same object, a few methods more."""
        protocol = super().get_websocket_protocol()
        if protocol is not None:
            protocol.__class__ = CrowdProtocol
        return protocol

    def open(self) -> None:
        """Note the client's group and last seq (13) and switch Nagle off (9); Part I's open; the idle timer (12)."""
        limits = self.manager.limits
        self.address, self.last_seq = client_group(self.request, limits.ipv6_prefix), last_seq_of(self.request)
        self.websocket_protocol, self.vanished, self.idle_timer = self.ws_connection, False, None
        self.set_nodelay(True)
        super().open()
        if self.ws_connection is not None:  # None if open() refused and closed it
            self.ws_connection.stream.max_write_buffer_size = None  # bounded per write, in write_frame (9)
        if self.user is not None and limits.idle_timeout > 0:
            self.idle_timer = IdleTimer(limits.idle_timeout, self.close_idle, self.manager.clock,
                                        self.manager.call_later)

    def on_message(self, message: str | bytes) -> None:
        """A typed line puts the idle timeout off (12), every frame takes a token (11); then Part I's."""
        if self.speaks_for_user():
            if isinstance(message, str) and self.idle_timer is not None:
                self.idle_timer.touch()
            if not self.manager.admit_frame(self.user):
                return
        super().on_message(message)

    def on_ping(self, data: bytes) -> None:
        """A ping or pong takes a token too (11): one answer to each of our pings is nothing a client notices."""
        if self.speaks_for_user():
            self.manager.admit_frame(self.user)

    on_pong = on_ping  # Tornado answered a ping already; a pong needs no answer

    def on_close(self) -> None:
        """Stop the idle timer (12); gone without a close frame, and not closed by us, is vanished (13); Part I's."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if not self.websocket_protocol.said_goodbye and not self.end_reason:
            self.vanished, self.end_reason = True, "connection lost"
        super().on_close()

    def write_event(self, outbound: Outbound) -> None:
        """The frame is built once per event, and its bytes written straight to the socket (9)."""
        if outbound.frame is None:  # built by the first member's send
            outbound.frame = websocket_text_frame(outbound.text.encode())
        write_frame(self.ws_connection.stream, outbound.frame, self.manager.limits.max_backlog)

    def speaks_for_user(self) -> bool:
        """Is this the connection of a logged-in user (not refused, replaced or dropped)?"""
        return self.user is not None and self.user.connection is self

    def close_idle(self) -> None:
        """The idle timer fired: say why, then close with 4008 (12)."""
        timeout = self.manager.limits.idle_timeout
        silence = f"{timeout / 3600:.3g} hours" if timeout >= 7200 else f"{timeout:g} seconds"
        self.send(Outbound(system_event(self.manager.timestamp(), f"Disconnected after {silence} without "
                                        "typing a line.", event="idle")))
        self.close_by_server(CLOSE_IDLE, "idle timeout")

    def hang_up(self, code: int, reason: str) -> None:
        """Close, and drop the socket now rather than wait 5 s for the client's answer (11)."""
        protocol = self.ws_connection
        self.close_by_server(code, reason)
        if protocol is not None:
            protocol.stream.close()

    def log_exception(self, typ, value, tb) -> None:
        """A bug: log it with its traceback, naming the user but not the URL (it holds the token, 13)."""
        log.error("bug while serving %s at %s", self.user and self.user.username, self.request.path,
                  exc_info=(typ, value, tb))


class CrowdStatusHandler(StatusHandler):
    """GET /status from the manager's cached report: cheap, however often it is asked for (14.3)."""

    def get(self) -> None:
        """Reply with the report as it was at most STATUS_CACHE_SECONDS ago."""
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.write(self.manager.status_json())


def raise_open_file_limit() -> None:
    """Allow as many sockets as the system lets us: each connection is an open file."""
    try:
        import resource  # Unix only: Windows has no such limit to raise
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    finite_hard = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for wanted in (finite_hard, 65536, 10240, 4096):  # macOS says "infinite" but has a cap of its own
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
    # collector took 40% of the CPU of 10,000 users connecting.
    gc.set_threshold(50_000)


# =====================================================================================
# Appendix: start-up details
# =====================================================================================
# What main() hands over to that is not about chat: the table of what each lesson
# runs, the web page and its security policy, the access log, signals on every
# platform, what to tell the class, and the flags, generated from the limits. No
# lesson needs it; read it when curious.


# ---- 16. Start-up: lessons, the web page, the log, signals, addresses and flags ------

import argparse  # the appendix needs these as well
import base64
import hashlib
import signal
import socket
import tornado.log
import tornado.netutil


class ServerParts(NamedTuple):
    """What a lesson's server is made of: room manager, socket, GET /status, limits, HTTP server."""

    manager: type[RoomManager]
    socket: type[ChatSocket]
    status: type[StatusHandler]
    limits: type[Limits]
    http_server: Callable[..., HTTPServer]


LESSONS = {  # what `--lesson=N` runs
    1: ServerParts(RoomManager, ChatSocket, StatusHandler, Limits, lambda app, limits, proxies: HTTPServer(app)),
    2: ServerParts(CrowdRoomManager, CrowdChatSocket, CrowdStatusHandler, CrowdLimits, GuardedHTTPServer),
}


def web_app(manager: RoomManager, lesson: int = 2) -> tornado.web.Application:
    """The lesson's chat application, plus the page at / and an access log without tokens."""
    parts = LESSONS[lesson]
    app = make_app(manager, parts.socket, parts.status, log_function=log_request)
    app.add_handlers(r".*", [(r"/", PageHandler)])
    return app


def serve(limits: Limits, port: int = 0, address: str = "", lesson: int = 2,
          trusted_proxies: frozenset[str] = frozenset()) -> tuple[HTTPServer, RoomManager, int]:
    """Start listening on the running loop (port 0 picks a free one): server, manager, port."""
    parts = LESSONS[lesson]
    manager = parts.manager(limits)
    sockets = tornado.netutil.bind_sockets(port, address)
    server = parts.http_server(web_app(manager, lesson), limits, trusted_proxies)
    server.add_sockets(sockets)
    return server, manager, sockets[0].getsockname()[1]


async def run(limits: Limits, port: int, address: str, lesson: int, trusted_proxies: frozenset[str]) -> None:
    """Serve until Ctrl-C or SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    stop_on_signals(stop)  # before listening: a stop that comes early is still a graceful one
    try:
        server, manager, port = serve(limits, port, address, lesson, trusted_proxies)
    except OSError as error:
        where = f"{address} port {port}" if address else f"port {port}"
        sys.exit(f"chat.py: cannot listen on {where}: {error.strerror}. "
                 f"Try another --port{' or --address' if address else ''}.")
    log.info("chat server (lesson %d) on port %d", lesson, port)
    print(where_to_connect(address, port), flush=True)  # the block to read out to the class
    await stop.wait()
    await shutdown(server, manager)


def start_up(argv: list[str]) -> None:
    """main's hand-over: the flags, the log and the lesson's tuning; then run until stopped."""
    flags = parse_flags(argv)
    limits = limits_from_flags(flags, LESSONS[flags.lesson].limits)  # lesson 1: Part I's limits
    configure_logging(flags.logging)
    if flags.lesson >= 2:
        tune_for_a_crowd()
    port = default_port() if flags.port is None else flags.port
    asyncio.run(run(limits, port, flags.address, flags.lesson, flags.trusted_proxy))


PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class PageHandler(tornado.web.RequestHandler):
    """GET /: the web chat page, one static file beside chat.py."""

    cached: tuple[float, bytes, str] = (0.0, b"", "")  # the page's mtime, the page, its policy

    def get(self) -> None:
        """Serve chat.html with a policy that lets no script run but the page's own (and an ETag)."""
        mtime = os.stat(PAGE_PATH).st_mtime  # edit the page, reload the browser: the new one comes
        if mtime != PageHandler.cached[0]:
            with open(PAGE_PATH, "rb") as page_file:
                page = page_file.read()
            PageHandler.cached = (mtime, page, content_security_policy(page))
        _, page, policy = PageHandler.cached
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", policy)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-cache")
        self.write(page)  # Tornado adds the ETag, and answers a matching If-None-Match with 304

    head = get  # link checkers and `curl -I`: Tornado sends the headers without the page


def inline_hashes(page: bytes, tag: bytes) -> str:
    """CSP sources for the bodies of the page's inline <script> or <style> elements."""
    markup = re.sub(rb"<!--.*?-->", b"", page, flags=re.S)  # a tag named in a comment is not code
    bodies = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), markup, re.S)
    digests = (base64.b64encode(hashlib.sha256(body).digest()).decode() for body in bodies)
    return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"


def content_security_policy(page: bytes) -> str:
    """Run only the page's own inline script and style (by hash): a message let in as HTML would not run."""
    return (f"default-src 'none'; script-src {inline_hashes(page, b'script')}; "
            f"style-src {inline_hashes(page, b'style')}; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log, minus query strings: they carry resume tokens."""
    status = handler.get_status()
    if status == 101:
        return  # WebSocket upgrades get their own "connect" line from ChatSocket
    level = logging.INFO if status < 400 else logging.WARNING
    request = handler.request
    logging.getLogger("tornado.access").log(level, "%d %s %s (%s) %.1fms", status, request.method,
                                            request.path, request.remote_ip, 1000 * request.request_time())


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


EVERY_INTERFACE = ("", "0.0.0.0", "::")


def page_url(host: str, port: int) -> str:
    """The web page's URL on `host` (an IPv6 address goes in brackets)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


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


def where_to_connect(address: str, port: int) -> str:
    """What the teacher reads out: the page and client command per LAN address, this laptop last."""
    if address in EVERY_INTERFACE:
        hosts = [*lan_addresses(), "localhost"]
    else:
        hosts = ["localhost" if address in LOCAL_ADDRESSES else address]
    others = [host for host in hosts if host != "localhost"]
    lines = ["", "Tell the class to open this address in a browser (or to run the client):" if others else
             "Only this laptop can connect (see --address). Open the page, or run the client:"]
    for host in others + ["localhost"] * ("localhost" in hosts):
        if host == "localhost" and others:
            lines.append("On this laptop only:")
        lines.append(f"    {page_url(host, port):<28}  python client.py NAME --host {host} --port {port}")
    lines += [f"To stop the server, press Ctrl-C.   (status: {page_url(hosts[0], port)}status)", ""]
    return "\n".join(lines)


class FlagParser(argparse.ArgumentParser):
    """argparse, with one sentence instead of a usage dump when a flag is wrong."""

    def error(self, message: str):
        """Stop with one line that says what is wrong and where to look."""
        self.exit(2, f"chat.py: {message}. See: python chat.py --help\n")


def port_number(text: str) -> int:
    """A --port value: a whole number from 1 to 65535."""
    if not is_port_number(text):
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), not {text!r}")
    return int(text)


def parse_flags(argv: list[str]) -> argparse.Namespace:
    """The command line: --port, --address, one flag per CrowdLimits field, --lesson, --logging."""
    parser = FlagParser(prog="python chat.py", description="A teaching-sized WebSocket chat server.",
                        epilog="--flag=VALUE and --flag VALUE both work; 0 switches a limit off. The per-address "
                               "limits never count this machine (127.0.0.1, ::1).")
    where = parser.add_argument_group("where to listen")
    where.add_argument("--port", type=port_number, default=None, metavar="N",
                       help=f"TCP port to listen on; CHAT_PORT sets the default (default {default_port()})")
    where.add_argument("--address", default="", metavar="IP",
                       help="address to listen on (default: every interface)")
    where.add_argument("--trusted-proxy", default=frozenset(), metavar="IP[,IP]", type=proxy_addresses,
                       help="reverse proxies whose X-Real-Ip / X-Forwarded-For name the client (default none)")
    part_one = parser.add_argument_group("limits (Part I enforces these)")
    part_two = parser.add_argument_group("limits Part II adds (--lesson=1 does not use them)")
    part_one_names = {limit_field.name for limit_field in fields(Limits)}
    for limit_field in fields(CrowdLimits):
        group = part_one if limit_field.name in part_one_names else part_two
        default = limit_field.default
        default = f"{default:g}" if isinstance(default, float) else default
        group.add_argument("--" + limit_field.name.replace("_", "-"), type=type(limit_field.default),
                           default=limit_field.default, metavar="N", dest=limit_field.name,
                           help=f"{limit_field.metadata['help']} (default {default})")
    running = parser.add_argument_group("lesson and log")
    running.add_argument("--lesson", type=int, choices=sorted(LESSONS), default=2,
                         help="1 runs Part I alone, the server of lesson 1 (default 2: everything)")
    running.add_argument("--logging", choices=["debug", "info", "warning", "error", "none"],
                         default="info", help="how much the server logs (default info)")
    return parser.parse_args(argv)


def proxy_addresses(text: str) -> frozenset[str]:
    """A --trusted-proxy value: IP addresses, separated by commas."""
    try:
        return frozenset(str(ipaddress.ip_address(part.strip())) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be IP addresses separated by commas, not {text!r}") from None


MIN_BACKLOG_BYTES = 65536  # a smaller bound could refuse a single large reply to a reader who is fine


def limits_from_flags(flags: argparse.Namespace, limits_class: type[Limits] = CrowdLimits) -> Limits:
    """The lesson's limits from the flags (Part I's four, or all); a nonsensical value stops the server."""
    for name in (limit_field.name for limit_field in fields(CrowdLimits)):
        if getattr(flags, name) < 0:
            sys.exit(f"chat.py: --{name.replace('_', '-')} cannot be negative (0 switches it off).")
    if flags.rate_per_second and flags.rate_burst < 1:
        sys.exit("chat.py: --rate-burst must be at least 1, or nobody could ever send a line.")
    if 0 < flags.max_backlog < MIN_BACKLOG_BYTES:  # one reply (a /rooms list) must always fit
        sys.exit(f"chat.py: --max-backlog must be 0 (off) or at least {MIN_BACKLOG_BYTES} bytes.")
    for unused in set(fields(CrowdLimits)) - set(fields(limits_class)):  # say so, rather than ignore it
        if getattr(flags, unused.name) != unused.default:
            print(f"chat.py: --{unused.name.replace('_', '-')} is a Part II limit; --lesson={flags.lesson} "
                  "does not enforce it.", file=sys.stderr)
    return limits_class(**{name: getattr(flags, name) for name in (f.name for f in fields(limits_class))})


def configure_logging(level_name: str) -> None:
    """One readable line per event on stderr, at the chosen level."""
    handler = logging.StreamHandler()
    handler.setFormatter(tornado.log.LogFormatter(  # "[I 17:59:35] connect alice ...": no file and line
        fmt="%(color)s[%(levelname)1.1s %(asctime)s]%(end_color)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.CRITICAL + 1 if level_name == "none" else level_name.upper())


if __name__ == "__main__":
    main()
