"""The terminal client of the teaching chat server (chat.py).

Run it:

    python client.py carol                          # split view, ws://localhost:8888/ws
    python client.py carol --url ws://host:9000/ws  # another server
    printf '/join x\\nhello\\n' | python client.py dave   # plain line mode over pipes

The split view is a small weechat: a header (current room, your name, server, connection state), the
messages of the current room, a sidebar with your rooms (and their unread counts) and the room's
users, and the input line at the bottom. Below 100 columns the sidebar folds away (F2 brings it
back), so an 80x24 terminal keeps 55 columns for messages. Plain line mode (--plain, or whenever
stdin or stdout is not a terminal) reads lines and prints one line per event. Closing the terminal
window (SIGHUP) leaves as /quit does: a goodbye, so the name is free at once.

How it runs
-----------
There is one thread and one asyncio loop; Tornado's WebSocket client runs on it. Server events,
keystrokes, timers and signals are callbacks on that loop, and each finishes before the next starts,
so the model needs no locks. (Plain mode reads stdin in a helper thread that only schedules work
onto the loop.) The model is what the screen shows: rooms with their scrollback and unread counts,
users, the input line. Drawing is a function of the model, so a resize is just a redraw; events only
change the model, and the split view draws at most 20 frames a second, writing only what changed, so
a busy room cannot outrun the terminal. Every string from the server is cleaned of control
characters before it is stored, so nothing the server sends can drive your terminal.

Sections
--------
 1. Settings          the command line, and the constants with their units
 2. Safe text         control-character stripping, display widths, wrapping, time
 3. Model             lines, rooms, users, unread counts, connection state
 4. Events            one handler per server event type, folding it into the model
 5. Input line        editing, history, Tab completion
 6. Connection        log in, resume with the token, the reconnect rule
 7. Plain line mode   stdin lines in, one printed line per event out
 8. Split view: draw  header, messages, sidebar, status bar, input line
 9. Split view: run   keys, commands, signals, terminal modes
10. Main
"""

from __future__ import annotations  # `str | None` in annotations on Python 3.9

import sys

# Checked before any import an older Python could trip over. (No `:=` in this file either, so that
# Python 3.7 gets this far; 3.6 stops at the line above.)
if sys.version_info < (3, 9):
    sys.exit("client.py needs Python 3.9 or newer; this is Python %d.%d. "
             "Install a newer Python from python.org." % sys.version_info[:2])

import argparse
import asyncio
import codecs
import functools
import json
import logging
import os
import random
import re
import signal
import threading
import time
import unicodedata
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

try:
    import termios  # Unix only: Ctrl-Z hands the terminal back to the shell with it
except ImportError:  # Windows has no termios and no Ctrl-Z suspend
    termios = None
TERMINAL_ERRORS = (OSError,) if termios is None else (OSError, termios.error)  # a terminal that has gone

import blessed
import tornado.httpclient
import tornado.iostream
import tornado.simple_httpclient
import tornado.websocket
from wcwidth import wcswidth, wcwidth

UTC = timezone.utc  # datetime.UTC is new in Python 3.11

# ---- 1. Settings -------------------------------------------------------------

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8888  # like chat.py, $CHAT_PORT changes it

CONNECT_TIMEOUT_SECONDS = 5.0
WELCOME_TIMEOUT_SECONDS = 5.0  # from the handshake to the server's welcome
PING_INTERVAL_SECONDS = 20.0  # notice a dead link even when nobody talks
BACKOFF_FIRST_SECONDS = 0.5  # reconnect delays double from here ...
BACKOFF_CAP_SECONDS = 10.0  # ... up to here
STABLE_SECONDS = 10.0  # a connection that lasted this long resets the reconnect delays
HELD_WAIT_LIMIT_SECONDS = 120.0  # your own name held after a crash: wait at most this long for it
REPLY_WAIT_SECONDS = 5.0  # plain mode, end of input: wait this long for the echoes
CLOSE_WAIT_SECONDS = 2.0  # how long the server may take to answer our close frame
ESC_DELAY_SECONDS = 0.05  # a lone Esc: how long to wait for the rest of a key's sequence
KEY_WAIT_SECONDS = 0.1  # where a thread reads keys (Windows): how often it checks whether to stop
SIZE_CHECK_SECONDS = 0.25  # where no SIGWINCH tells of a resize (Windows): how often to look

FRAMES_PER_SECOND = 20  # the split view repaints at most this often, however busy the room
SCROLLBACK_LINES = 2000  # kept per room
HISTORY_LINES = 500  # input lines Up/Down can bring back
NEAR_LIMIT_FRACTION = 0.8  # the n/limit counter shows from 80 % of the length limit
LOBBY = "lobby"  # everyone is in it after logging in
QUIT_COMMANDS = {"/quit", "/exit"}  # handled by the client; everything else goes to the server

DESCRIPTION = """\
Chat in a terminal with the chat.py server: a split view on a terminal, plain
line mode with --plain or whenever stdin or stdout is not a terminal, e.g.
    printf '/join x\\nhello\\n' | python client.py dave
"""
# Ctrl-Z suspends a program under Unix job control; Windows has no such thing.
CAN_SUSPEND = termios is not None and hasattr(signal, "SIGTSTP") and hasattr(signal, "SIGSTOP")
SUSPEND_HELP = "Ctrl-Z suspends (fg resumes)" if CAN_SUSPEND else "no Ctrl-Z suspend on this system"
KEYS_HELP = f"""\
keys (split view):
  Enter sends; Tab completes commands, rooms and usernames; Up/Down recall what you sent;
  Left/Right, Home/End (Ctrl-A/Ctrl-E), Backspace/Delete, Ctrl-W deletes a word, Ctrl-U the line;
  PgUp/PgDn scroll; Ctrl-N/Ctrl-P switch to the next/previous room; F2 or Ctrl-G shows or hides
  the sidebar of rooms and users (hidden by itself below 100 columns); Ctrl-L redraws;
  {SUSPEND_HELP}; /quit, Ctrl-C, Ctrl-D (on an empty line) or closing the window leave.
commands: /join <room>, /leave, /rooms, /users, /help (the server's list), /quit
"""


class ClientError(Exception):
    """A reason to stop before the chat starts, in one sentence for stderr."""


@dataclass
class Settings:
    """What the command line asked for."""
    username: str
    url: str  # the server's WebSocket URL, without the login query
    plain: bool  # plain line mode even on a terminal


def port_number(text: str) -> int:
    """--port's value: 1 to 65535 in plain digits, chat.py's rule ("²" is a digit, but no number)."""
    if not (text.isascii() and text.isdecimal() and 0 < int(text) < 65536):
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), not {text!r}")
    return int(text)


def default_port() -> int:
    """The port when the address names none: $CHAT_PORT (read as chat.py reads it), else 8888."""
    try:
        return port_number(os.environ.get("CHAT_PORT", str(DEFAULT_PORT)))
    except argparse.ArgumentTypeError as error:
        raise ClientError(f"CHAT_PORT {error}.") from None


# What a pasted address means for the WebSocket: the page's http:// is the chat's ws://.
SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
HOST_NAME = re.compile(r"[a-z0-9._-]+|[0-9a-f:.]+(%[a-z0-9]+)?")  # a name, an IPv4 or an IPv6 address


def server_url(flag: str, address: str, port: int | None) -> str:
    """The WebSocket URL from HOST, HOST:PORT, [IPv6]:PORT, a ws(s):// or http(s):// URL; else ClientError."""
    text = address.strip()
    if text.count(":") > 1 and "[" not in text and "://" not in text:
        text = f"[{text}]"  # a bare IPv6 address, such as ::1
    try:
        parts = urlsplit(text if "://" in text else f"ws://{text}")
        port = parts.port or (None if "://" in text else port)  # ValueError: no port number
    except ValueError:
        parts = None
    host = parts.hostname if parts else None
    if (not host or parts.scheme.lower() not in SCHEMES or "@" in parts.netloc
            or not HOST_NAME.fullmatch(host)):
        raise ClientError(f"{flag} {address!r} is not a server address: give a host name or IP address, "
                          "optionally with :PORT (like 192.168.1.20:8888 or [::1]:8888), or the address "
                          "the server printed (http://... or ws://...).")
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{port}" if port else host
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((SCHEMES[parts.scheme.lower()], netloc, path, parts.query, ""))


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Read the command line; argparse explains mistakes and exits, a bad address is a ClientError."""
    parser = argparse.ArgumentParser(
        prog="client.py", epilog=KEYS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION)
    parser.add_argument("username", help="your name in the chat: 1-20 letters, digits, _ or -")
    parser.add_argument("--url", help="the server's WebSocket URL; overrides --host and --port "
                                      "(default: ws://HOST:PORT/ws; /ws is added to a URL without a path)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="server host, HOST:PORT, [IPv6]:PORT or the address the server printed, "
                             "like http://192.168.1.20:8888/ (default: %(default)s)")
    parser.add_argument("--port", type=port_number,
                        help=f"server port (default: {DEFAULT_PORT}; $CHAT_PORT sets the default)")
    parser.add_argument("--plain", action="store_true",
                        help="plain line mode: type a line and Enter sends it; each event prints as a line")
    args = parser.parse_args(argv)
    env_port = default_port()  # checked even when --port is given, as chat.py checks it
    port = args.port or env_port
    flag, address = ("--url", args.url) if args.url else ("--host", args.host)
    return Settings(args.username, server_url(flag, address, port), args.plain)


# ---- 2. Safe text: cleaning, widths, wrapping, time ---------------------------
# Pure helpers: no terminal, no network. Widths are in terminal columns, measured with wcwidth, because
# a CJK character or an emoji takes two columns.

# C0 and C1 controls, ESC and DEL could move the cursor, recolour or clear the screen; format
# characters include the bidi overrides and isolates that make text read backwards and the zero-width
# ones that hide text; lone surrogates (JSON can carry them) cannot be encoded for the terminal at all.
SPACING_CONTROLS = re.compile("[\t\n\r\x0b\x0c\u2028\u2029]")  # these become a space, so words stay apart
UNSAFE_ASCII = re.compile("[\x00-\x1f\x7f]")
UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs"}  # Unicode's control, format and surrogate characters
ZERO_WIDTH_JOINER = "\u200d"  # a format character emoji need (woman, ZWJ, laptop is one emoji): kept


def clean(value: object) -> str:
    """Any server-supplied value as text that is safe to print: no control or format characters."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    text = SPACING_CONTROLS.sub(" ", text)
    if text.isascii():  # most text: one quick pass
        return UNSAFE_ASCII.sub("", text)
    return "".join(char for char in text
                   if char == ZERO_WIDTH_JOINER or unicodedata.category(char) not in UNSAFE_CATEGORIES)


def clean_list(value: object) -> list[str]:
    """A server-supplied list of names, each cleaned; anything else is an empty list."""
    return [clean(item) for item in value] if isinstance(value, list) else []


def records(value: object) -> list[dict]:
    """A server-supplied list of objects (rooms, commands); anything else is an empty list."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def cells(text: str) -> list[str]:
    """Split text into what a terminal draws as one unit: a character plus its combining marks."""
    units: list[str] = []
    for char in text:
        if units and (wcwidth(char) == 0 or units[-1].endswith(ZERO_WIDTH_JOINER)):
            units[-1] += char  # combining mark, variation selector, or the next part of an emoji
        else:
            units.append(char)
    return units


NARROW_SYMBOLS = dict.fromkeys(map(ord, "·›│…"), "-")  # the split view's own separators: one column each


def is_narrow(text: str) -> bool:
    """Whether each character takes one column (printable ASCII: most lines): no need to measure cells."""
    if not text.isascii():
        text = text.translate(NARROW_SYMBOLS)
    return text.isascii() and text.isprintable()


def text_width(text: str) -> int:
    """Columns a text takes on the terminal."""
    return len(text) if is_narrow(text) else max(wcswidth(text), 0)  # 2 for CJK and most emoji


def clip(text: str, width: int, keep_end: bool = False) -> str:
    """The start (or the end) of text that fits in width columns; a wide character is never cut in half."""
    width = max(width, 0)
    if is_narrow(text):
        return text[max(len(text) - width, 0):] if keep_end else text[:width]
    kept, used = [], 0
    for cell in reversed(cells(text)) if keep_end else cells(text):
        used += max(wcswidth(cell), 0)
        if used > width:
            break
        kept.append(cell)
    return "".join(reversed(kept) if keep_end else kept)


def fit(text: str, width: int) -> str:
    """Text clipped or padded with spaces to exactly width columns."""
    text = clip(text, width)
    return text + " " * (width - text_width(text))


def hard_wrap(text: str, width: int) -> list[str]:
    """Cut text into rows of at most width columns, wherever the row is full."""
    rows, row, used = [], "", 0
    for cell in cells(text):
        columns = max(wcswidth(cell), 0)
        if used + columns > width and row:
            rows.append(row)
            row, used = "", 0
        row += cell
        used += columns
    return rows + [row]


def wrap(text: str, width: int) -> list[str]:
    """Break text into rows of at most width columns, at spaces where possible."""
    if text_width(text) <= width:
        return [text]
    rows, used = [""], 0  # used: the columns of the last row
    for index, word in enumerate(text.split(" ")):
        word_width = text_width(word)
        if index and used + 1 + word_width <= width or not index and word_width <= width:
            rows[-1] += f" {word}" if index else word
            used += word_width + (1 if index else 0)
        elif word_width <= width:
            rows.append(word)  # the space at the break is dropped
            used = word_width
        else:  # a word longer than a row (or CJK text)
            rows[-1:] = hard_wrap(f"{rows[-1]} {word}" if index else word, width)
            used = text_width(rows[-1])
    return rows


def local_time(timestamp: object = None) -> str:
    """A server timestamp (ISO 8601, UTC) as local HH:MM:SS; now, if it is missing or unreadable."""
    text = re.sub("Z$", "+00:00", str(timestamp))  # UTC: Python 3.11 reads "Z", 3.9 and 3.10 do not
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%H:%M:%S")


# Colours a username may get (terminal colour numbers): not red (errors), not dark blue (unreadable
# on black), not black, white or grey. A terminal with only eight colours gets the second list.
USERNAME_COLOURS = (2, 3, 5, 6, 9, 10, 11, 12, 13, 14)
BASIC_USERNAME_COLOURS = (2, 3, 4, 5, 6)


def username_colour(username: str, palette: tuple[int, ...] = USERNAME_COLOURS) -> int:
    """One colour for a username in every client and run: crc32 of the folded name (hash() is salted)."""
    return palette[zlib.crc32(username.lower().encode()) % len(palette)]


# ---- 3. Model -----------------------------------------------------------------
# What the client knows, and nothing about how it is drawn.


@dataclass
class Line:
    """One entry of a room's scrollback (and of plain mode's output)."""
    kind: str  # message, join, leave, system, info or error
    text: str
    time: str  # local HH:MM:SS
    username: str = ""  # who wrote it, for messages (and who came or went, for join/leave)
    room: str = ""  # the room it belongs to; "" means the current room


@dataclass
class Room:
    """A room you are in: its scrollback, unread count and users."""
    name: str
    lines: deque = field(default_factory=lambda: deque(maxlen=SCROLLBACK_LINES))
    users: list[str] = field(default_factory=list)  # at most 200, as the server sends them
    user_count: int = 0
    unread: int = 0  # messages that arrived while another room was current
    # Scrolled up, the view stays where it is while new lines arrive below it:
    scroll_rows: int = 0  # how far the view is scrolled up, in screen rows, from ...
    lines_below: int = 0  # ... the lines that arrived after the view was scrolled up
    new_below: int = 0  # how many of those are messages, for the "new messages below" marker


@dataclass
class Model:
    """Everything the screen shows: rooms, users, connection state and the input line."""
    server: str
    username: str
    room: str = ""  # the current room, as the server sees it
    rooms: dict[str, Room] = field(default_factory=dict)  # keyed by room name (stored lower-case)
    left_rooms: dict[str, Room] = field(default_factory=dict)  # rooms we left: their scrollback comes back
    known_rooms: set[str] = field(default_factory=set)  # from /rooms replies, for Tab completion
    commands: list[str] = field(default_factory=lambda: ["/quit"])  # for Tab: the server's, from /help
    limit_chars: int = 0  # welcome.limits.max_message_length; 0 = no limit
    idle_seconds: float = 0.0  # welcome.limits.idle_timeout: silence that ends a session; 0 = none
    last_seq: int = 0  # the highest message `seq` seen: a resume asks for what came after it
    rate: "Pacer | None" = None  # the server's rate limit, from welcome: pasted lines are paced by it
    state: str = "connecting"  # connecting, connected, reconnecting or offline
    state_detail: str = ""  # e.g. "in 2 s (attempt 3)", shown after the state
    input: "InputLine" = field(default_factory=lambda: InputLine())


def current_room(model: Model) -> Room:
    """The room whose messages are on screen."""
    return ensure_room(model, model.room)


def ensure_room(model: Model, name: str) -> Room:
    """The room of that name: one we are in, one we left (with its scrollback), or a new one."""
    if name not in model.rooms:
        model.rooms[name] = model.left_rooms.pop(name, None) or Room(name)
    return model.rooms[name]


def forget_room(model: Model, name: str) -> None:
    """We are no longer in a room; keep its scrollback in case we join it again."""
    if name in model.rooms:
        model.left_rooms[name] = model.rooms.pop(name)


def add_line(model: Model, line: Line) -> Line:
    """Append a line to its room (unread, if not current); below a scrolled-up view, which stays put."""
    room = ensure_room(model, line.room or model.room)
    room.lines.append(line)
    if line.kind == "message" and room.name != model.room:
        room.unread += 1
    if room.scroll_rows or room.lines_below:
        room.lines_below = min(room.lines_below + 1, len(room.lines))
        if line.kind == "message":
            room.new_below += 1
    return line


def show_newest(room: Room) -> None:
    """Scroll a room's view back down to its newest line, which it then follows."""
    room.scroll_rows = room.lines_below = room.new_below = 0


def room_order(name: str) -> list:
    """A sort key that puts #room2 before #room10: digit runs compare as numbers."""
    parts = [part for part in re.split(r"(\d+)", name) if part]
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts]


def note(model: Model, text: str, kind: str = "info") -> Line:
    """A line from the client itself (connection news, a hint) in the current room."""
    return add_line(model, Line(kind, text, local_time()))


def set_state(model: Model, state: str, detail: str = "") -> None:
    """Change the connection state shown in the header."""
    model.state, model.state_detail = state, detail


def whole_number(value: object) -> int:
    """A count from the server, or 0 if it is not a whole number."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def seconds(value: object) -> float:
    """A duration from the server, or 0 if it is not a number of seconds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
    return float(value) if ok else 0.0


def name_list(names: list[str], total: int, most: int = 10) -> str:
    """Names for a sentence: "alice, bob and 3 more"."""
    shown = ", ".join(names[:most])
    return f"{shown} and {total - most} more" if total > most else shown


# ---- 4. Events: one handler per server event type -----------------------------
# Each handler folds an event into the model and returns the lines it adds, which plain mode prints.
# Every string from the server goes through clean() first.


def on_welcome(model: Model, event: dict) -> list[Line]:
    """welcome: who we are, which rooms we are in, the limits; a resumed session keeps its scrollback."""
    model.username = clean(event.get("username")) or model.username
    rooms = clean_list(event.get("rooms"))
    for name in [name for name in model.rooms if name not in rooms]:
        forget_room(model, name)  # a fresh session after a lost one starts in the lobby only
    for name in rooms:
        ensure_room(model, name)
    model.room = clean(event.get("room")) or (rooms[-1] if rooms else LOBBY)
    limits = event.get("limits") if isinstance(event.get("limits"), dict) else {}
    model.limit_chars = whole_number(limits.get("max_message_length"))
    model.idle_seconds = seconds(limits.get("idle_timeout"))
    model.rate = Pacer.from_limits(limits)
    if not event.get("resumed"):
        model.last_seq = 0  # a new session: nothing of it seen yet
    set_state(model, "connected")
    lines = [note(model, welcome_text(model, event))]
    lost = whole_number(event.get("lost"))
    if lost:
        them = "message" if lost == 1 else "messages"
        lines.append(note(model, f"{lost} earlier {them} could not be replayed: the server no longer "
                                 f"had {'it' if lost == 1 else 'them'}.", kind="error"))
    return lines


def welcome_text(model: Model, event: dict) -> str:
    """The sentence that greets a new or resumed session."""
    if not event.get("resumed"):
        return f"Connected to {model.server} as {model.username}. Type /help for the commands."
    missed = whole_number(event.get("missed"))
    if not missed:
        return "Reconnected: your session is back."
    follow = "missed message follows" if missed == 1 else "missed messages follow"
    return f"Reconnected: your session is back ({missed} {follow})."


def on_message(model: Model, event: dict) -> list[Line]:
    """message: a chat line in one of our rooms; in another room it counts as unread."""
    line = Line("message", clean(event.get("text")), local_time(event.get("timestamp")),
                clean(event.get("username")), clean(event.get("room")))
    seq = whole_number(event.get("seq"))
    if event.get("replayed") and already_shown(model, line, seq):
        return []  # a missed message is shown once, even if it had already arrived
    model.last_seq = max(model.last_seq, seq)
    return [add_line(model, line)]


def already_shown(model: Model, line: Line, seq: int) -> bool:
    """Whether a replayed message had arrived before: by its seq (without one: the same line is there)."""
    if seq:
        return seq <= model.last_seq
    return line in ensure_room(model, line.room or model.room).lines


def on_system(model: Model, event: dict) -> list[Line]:
    """system: someone joined or left a room, or a notice (shutdown, idle timeout)."""
    kind = event.get("event") if event.get("event") in ("join", "leave") else "system"
    line = Line(kind, clean(event.get("text")), local_time(event.get("timestamp")),
                clean(event.get("username")), clean(event.get("room")))
    if line.username and kind != "system":  # the room's user list follows people as they come and go
        room, joined = ensure_room(model, line.room or model.room), kind == "join"
        others = [name for name in room.users if name.lower() != line.username.lower()]
        room.user_count += 1 if joined else -1
        room.users = sorted(others + [line.username], key=str.lower) if joined else others
        room.user_count = max(room.user_count, len(room.users))  # the list may be cut at 200 names
    return [add_line(model, line)]


def on_joined(model: Model, event: dict) -> list[Line]:
    """joined: we joined or switched to a room, which becomes current; here is who is in it."""
    name = clean(event.get("room")) or model.room
    is_new = name not in model.rooms
    room = ensure_room(model, name)
    set_users(room, event)
    room.unread = 0
    model.room = name
    line = Line("info", f"Now in #{name}{company(model, room)}.", local_time())
    if is_new:
        add_line(model, line)  # switching back to a room adds nothing to its scrollback,
    return [line]  # but plain mode prints it either way


def company(model: Model, room: Room) -> str:
    """Who else is in a room, for a sentence: " with bob, carol", or that nobody is (chat.html's twin)."""
    others = [name for name in room.users if name.lower() != model.username.lower()]
    if not others:
        return ": nobody else is here yet"
    return f" with {name_list(others, max(room.user_count - 1, len(others)))}"


def set_users(room: Room, event: dict) -> None:
    """Take a room's user list (and count) from a joined or users event."""
    room.users = sorted(clean_list(event.get("users")), key=str.lower)
    room.user_count = whole_number(event.get("user_count")) or len(room.users)


def on_left(model: Model, event: dict) -> list[Line]:
    """left: we left a room (its scrollback is kept aside); a joined for room_now follows."""
    name = clean(event.get("room"))
    forget_room(model, name)
    model.room = clean(event.get("room_now")) or LOBBY
    return [note(model, f"You left #{name}.")]


def on_rooms(model: Model, event: dict) -> list[Line]:
    """rooms: the reply to /rooms, the rooms with their numbers of users (the biggest, if there are many)."""
    names = [(clean(room.get("name")), clean(room.get("users"))) for room in records(event.get("rooms"))]
    model.known_rooms = {name for name, _ in names}
    more = whole_number(event.get("more"))
    rest = f" and {more} more" if more else ""
    return [note(model, "Rooms: " + ", ".join(f"#{name} ({users})" for name, users in names) + rest)]


def on_users(model: Model, event: dict) -> list[Line]:
    """users: the reply to /users, the users of the current room."""
    room = ensure_room(model, clean(event.get("room")) or model.room)
    set_users(room, event)
    names = name_list(room.users, room.user_count, most=200)
    return [note(model, f"Users in #{room.name} ({room.user_count}): {names}")]


def on_help(model: Model, event: dict, quiet: bool = False) -> list[Line]:
    """help: the reply to /help, a line per command (and our /quit); quiet: our own question, not shown."""
    usages = [(clean(c.get("usage")), clean(c.get("description"))) for c in records(event.get("commands"))]
    if not any(usage.startswith("/quit") for usage, _ in usages):
        usages.append(("/quit", "leave the chat (Ctrl-C works too)"))
    model.commands = sorted({usage.split(" ")[0] for usage, _ in usages if usage.startswith("/")})
    width = max(len(usage) for usage, _ in usages)
    return [] if quiet else [note(model, f"{usage:{width}}  {description}") for usage, description in usages]


def on_error(model: Model, event: dict) -> list[Line]:
    """error: the server refused something; say what, visibly (its sentence: the code is for programs)."""
    code = clean(event.get("code")) or "no reason given"
    text = clean(event.get("text")) or f"The server refused that ({code})."
    return [note(model, text, kind="error")]


EVENT_HANDLERS: dict[str, Callable[[Model, dict], list[Line]]] = {
    "welcome": on_welcome, "message": on_message, "system": on_system, "joined": on_joined,
    "left": on_left, "rooms": on_rooms, "users": on_users, "help": on_help, "error": on_error,
}


def apply_event(model: Model, event: dict) -> list[Line]:
    """Fold one server event into the model; return the lines it added (an unknown type adds none)."""
    handler = EVENT_HANDLERS.get(event.get("type"))
    return handler(model, event) if handler else []


def parse_event(frame: str | bytes) -> dict:
    """A frame from the server as an event; something unreadable becomes an error event."""
    try:
        event = json.loads(frame)
    except ValueError:
        event = None
    if isinstance(event, dict):
        return event
    return {"type": "error", "code": "bad_frame", "text": "The server sent something that is not an event."}


# ---- 5. Input line: editing, history, Tab completion ---------------------------


@dataclass
class Completion:
    """A Tab completion in progress: repeated Tabs cycle through the matches."""
    start: int  # where the word being completed starts in the line
    matches: list[str]
    index: int = -1


@dataclass
class InputLine:
    """The line being typed, its cursor, history, completion; editing a recalled line makes it the draft."""
    text: str = ""
    cursor: int = 0  # an index into text: the cursor sits before text[cursor]
    history: list[str] = field(default_factory=list)
    browsing: int | None = None  # the history index shown while Up/Down browse, else None
    draft: str = ""  # the unsent line, kept while browsing the history
    completion: Completion | None = None

    def splice(self, start: int, end: int, chars: str = "") -> None:
        """Every edit: chars in place of text[start:end], the cursor after them; browsing the history ends."""
        self.text, self.cursor = self.text[:start] + chars + self.text[end:], start + len(chars)
        self.browsing = None

    def set(self, text: str) -> None:
        """Replace the whole line, cursor at the end (Ctrl-U sets it empty)."""
        self.splice(0, len(self.text), text)

    def show(self, text: str) -> None:
        """Put a line from the history (or the draft) in place, cursor at the end."""
        self.text, self.cursor = text, len(text)

    def insert(self, chars: str) -> None:
        """Type characters at the cursor."""
        self.splice(self.cursor, self.cursor, chars)

    def backspace(self) -> None:
        """Delete the character before the cursor."""
        if self.cursor:
            self.splice(self.cursor - 1, self.cursor)

    def delete(self) -> None:
        """Delete the character under the cursor."""
        if self.cursor < len(self.text):
            self.splice(self.cursor, self.cursor + 1)

    def move(self, steps: int) -> None:
        """Move the cursor left (negative) or right, staying inside the line."""
        self.cursor = min(max(self.cursor + steps, 0), len(self.text))

    def delete_word(self) -> None:
        """Delete the word before the cursor, and the spaces after it (Ctrl-W)."""
        self.splice(self.text[:self.cursor].rstrip(" ").rfind(" ") + 1, self.cursor)  # from after a space

    def take(self) -> str:
        """Enter: hand over the line, remember it in the history, start a new one."""
        text = self.text
        if text.strip() and (not self.history or self.history[-1] != text):
            self.history = (self.history + [text])[-HISTORY_LINES:]
        self.set("")
        return text

    def history_back(self) -> None:
        """Up: show the previous line from the history."""
        if self.browsing is None:
            self.draft, self.browsing = self.text, len(self.history)
        if self.browsing > 0:
            self.browsing -= 1
            self.show(self.history[self.browsing])

    def history_forward(self) -> None:
        """Down: show the next line from the history, and finally the unsent draft again."""
        if self.browsing is None:
            return
        self.browsing += 1
        if self.browsing < len(self.history):
            self.show(self.history[self.browsing])
        else:
            self.set(self.draft)

    def complete(self, pool: list[str]) -> None:
        """Tab: put the next candidate from pool that starts like the word before the cursor in its place."""
        if self.completion is None:
            start = self.text.rfind(" ", 0, self.cursor) + 1
            word = self.text[start:self.cursor].lower()
            self.completion = Completion(start, [c for c in pool if c.lower().startswith(word)])
        done = self.completion
        if not done.matches:
            return
        done.index = (done.index + 1) % len(done.matches)
        self.splice(done.start, self.cursor, done.matches[done.index] + " ")


def completion_pool(model: Model, before_cursor: str) -> list[str]:
    """What Tab may complete here: a command first, a room name after /join, else a username."""
    words = before_cursor.split(" ")
    if len(words) == 1 and words[0].startswith("/"):
        return model.commands
    if len(words) == 2 and words[0].lower() == "/join":
        prefix = "#" if words[1].startswith("#") else ""
        return [prefix + name for name in sorted(set(model.rooms) | model.known_rooms)]
    return [name for name in current_room(model).users if name.lower() != model.username.lower()]


# ---- 6. Connection: log in, resume, reconnect ------------------------------------

# WebSocket close codes, with chat.py's names and numbers (a test checks they agree).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009
CLOSE_BAD_USERNAME = 4001
CLOSE_USERNAME_TAKEN = 4002
CLOSE_SERVER_FULL = 4003
CLOSE_BAD_TOKEN = 4004
CLOSE_ADDRESS_FULL = 4005
CLOSE_IDLE = 4008
CLOSE_SLOW_CONSUMER = 4009
CLOSE_REPLACED = 4010
CLOSE_FLOODING = 4029

# The reconnect rule, the same in chat.html (a test compares the two). After a close we did not ask for:
# - a broken link (1006, or no close frame at all), 1000 (the server never closes with it on purpose;
#   Tornado does, "ping timed out", when we missed its pings, say after the laptop slept), 1001 (a
#   shutdown, most likely a restart), 1009 and 4009: reconnect by ourselves, with growing delays, and
#   resume the session with its token;
# - 4004 on that resume (the server restarted, or no longer holds the session): log in afresh at once
#   and rejoin our rooms;
# - 4002 for a name held for resume (`held`: most likely our own dropped session): try again after
#   `retry_after`;
# - the rest (FINAL_CLOSE_CODES): the server ended the session on purpose, so trying again at once
#   would only be refused again. Stay offline, say why in one sentence, and come back on Enter.
FINAL_CLOSE_CODES = {CLOSE_PROTOCOL_ERROR, CLOSE_BAD_USERNAME, CLOSE_USERNAME_TAKEN, CLOSE_SERVER_FULL,
                     CLOSE_ADDRESS_FULL, CLOSE_IDLE, CLOSE_REPLACED, CLOSE_FLOODING}
SESSION_ENDED_CODES = FINAL_CLOSE_CODES | {CLOSE_SLOW_CONSUMER}  # the server keeps no session after these
CLOSE_REASONS = {  # for people: why a connection ended
    None: "the connection broke", 1006: "the connection broke",
    CLOSE_NORMAL: "the server closed the connection", CLOSE_GOING_AWAY: "the server is shutting down",
    CLOSE_PROTOCOL_ERROR: "the server found a protocol error and ended the session",
    CLOSE_TOO_BIG: "a line was too big for the server, so it was not sent",
    CLOSE_BAD_USERNAME: "the username was refused", CLOSE_USERNAME_TAKEN: "the username is taken",
    CLOSE_SERVER_FULL: "the server is full", CLOSE_BAD_TOKEN: "the server no longer knows this session",
    CLOSE_ADDRESS_FULL: "too many connections come from your address",
    CLOSE_IDLE: "you were idle for too long", CLOSE_SLOW_CONSUMER: "the connection fell too far behind",
    CLOSE_REPLACED: "your session was taken over by a newer connection (another client of yours?)",
    CLOSE_FLOODING: "you kept sending after the server asked you to slow down",
}
HELD_MARGIN_SECONDS = 0.5  # our own name held: try again this long after the server says it is free

# What websocket_connect raises when it cannot reach a server that speaks WebSocket.
CONNECT_ERRORS = (OSError, asyncio.TimeoutError, tornado.httpclient.HTTPClientError,
                  tornado.iostream.StreamClosedError, tornado.websocket.WebSocketError)


@dataclass
class Refused:
    """The server said no to a login: its error code and sentence, and the close code."""
    code: str
    text: str
    close_code: int | None
    held: bool = False  # the name is taken by a session held for resume (after a crash: probably ours)
    retry_after: float = 0.0  # seconds until a held name is free again


def held_wait(refused: Refused) -> float:
    """Seconds to wait before trying a held name again; 0 if the refusal is of another kind."""
    if not refused.held:
        return 0.0
    return max(refused.retry_after, HELD_MARGIN_SECONDS) + HELD_MARGIN_SECONDS


def rejoin_order(rooms: list[str], current: str) -> list[str]:
    """Rooms to rejoin after a fresh login (in the lobby), the current last: its /join makes it current."""
    others = sorted((name for name in rooms if name not in (LOBBY, current)), key=room_order)
    if not others and current == LOBBY:
        return []  # the fresh login already puts us there
    return others + [current]


def backoff_seconds(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """The wait before attempt n: 0.5 s doubling to 10 s, 50-100 % of it so clients do not knock at once."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (attempt - 1))
    return ceiling * (0.5 + rand() / 2)


def should_reconnect(close_code: int | None, after_shutdown: bool) -> bool:
    """Whether a close we did not ask for is worth retrying: all but a deliberate end of the session."""
    if close_code == CLOSE_GOING_AWAY:
        return after_shutdown  # the split view waits for the server to come back
    return close_code not in FINAL_CLOSE_CODES


def describe_close(close_code: int | None, reason: str = "") -> str:
    """Why a connection ended, for people (a 1000 names Tornado's reason, e.g. "ping timed out")."""
    text = CLOSE_REASONS.get(close_code, f"the server closed the connection (code {close_code})")
    return f"{text} ({clean(reason)})" if close_code == CLOSE_NORMAL and reason else text


def describe_error(error: Exception) -> str:
    """Why a connection attempt failed, for people: a phrase that reads well mid-sentence."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(error, tornado.simple_httpclient.HTTPTimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_SECONDS:g} s"
    if isinstance(error, tornado.httpclient.HTTPClientError) and error.code == 599:
        return "the connection closed before the server answered"  # Tornado's 599: no HTTP reply at all
    if isinstance(error, tornado.httpclient.HTTPClientError):
        return f"it answered HTTP {error.code} instead of accepting a WebSocket"
    if isinstance(error, asyncio.TimeoutError):  # TimeoutError itself from Python 3.11 on
        return f"no welcome within {WELCOME_TIMEOUT_SECONDS:g} s"
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]  # "Connection reset by peer" -> "connection reset by peer"


def duration(value: float) -> str:
    """Seconds for people: "1 second", "10 minutes", "2 hours", "1.5 hours"."""
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        if value >= size or unit == "second":
            count = round(value / size, 1)
            return f"{count:g} {unit}{'' if count == 1 else 's'}"


def login_url(url: str, username: str, token: str = "", last_seq: int = 0) -> str:
    """The URL with the login query: ?username=NAME, and &token=T&last_seq=N (replay after N) to resume."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query) + [("username", username)]
    if token:
        query += [("token", token)] + ([("last_seq", str(last_seq))] if last_seq else [])
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass
class Pacer:
    """The server's rate limit, kept a little under: pasted or piped lines wait their turn, not refused."""
    per_second: float
    burst: float
    tokens: float
    updated_at: float = 0.0

    @classmethod
    def from_limits(cls, limits: dict) -> "Pacer | None":
        """From welcome's limits: 10% slower and a smaller burst than the server's, for safety."""
        rate, burst = limits.get("rate_per_second"), limits.get("rate_burst")
        if not isinstance(rate, (int, float)) or not isinstance(burst, (int, float)) or rate <= 0:
            return None  # no limit, or none we understand
        return cls(0.9 * rate, max(1.0, burst - 2), 0.0)

    def wait(self, now: float) -> float:
        """Seconds until the next line may go (0: now, and it is counted)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated_at) * self.per_second)
        self.updated_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_second


class Connection:
    """The link to the server: log in, read events into the model, send lines, reconnect."""

    def __init__(self, settings: Settings, model: Model, show: Callable[[list[Line]], None],
                 reconnect_after_shutdown: bool, revivable: bool = False):
        """Not connected yet; `show` gets each event's lines; revivable: Enter can bring us back online."""
        self.settings, self.model, self.show = settings, model, show
        self.reconnect_after_shutdown, self.revivable = reconnect_after_shutdown, revivable
        self.ws: tornado.websocket.WebSocketClientConnection | None = None  # None while disconnected
        self.token = ""  # from welcome: a reconnect with it resumes the session
        self.logged_in = False  # welcome and its joined have arrived on the live connection
        self.outbox: list[str | asyncio.Future] = []  # lines waiting for a login or the rate limit
        self.helps: deque[asyncio.Future | None] = deque()  # /help sent, oldest first: ours (quiet) or typed
        self.pump_timer: asyncio.TimerHandle | None = None  # set while the rate limit holds lines back
        self.rejoin: list[str] = []  # rooms of a lost session, joined again after a fresh login
        self.quitting = False
        self.gave_up = False  # the server ended the session on purpose: offline until Enter (if revivable)
        self.wake_up = asyncio.Event()  # set by Enter while offline: try again
        self.idle_notice = ""  # the server's idle notice, said with the close that follows
        self.last_close: int | None = None  # how the last connection ended
        self.connected_at = 0.0  # when the last welcome arrived (time.monotonic)
        self.quick_drops = 0  # connections in a row that ended within STABLE_SECONDS: longer delays
        self.task: asyncio.Task | None = None

    # -- logging in --
    async def log_in(self) -> Refused | None:
        """Open a connection and read up to the welcome; None if we are in, else the refusal."""
        url = login_url(self.settings.url, self.model.username, self.token, self.model.last_seq)
        request = tornado.httpclient.HTTPRequest(  # the request timeout covers a server that never answers
            url, connect_timeout=CONNECT_TIMEOUT_SECONDS, request_timeout=CONNECT_TIMEOUT_SECONDS)
        self.ws = await tornado.websocket.websocket_connect(request, ping_interval=PING_INTERVAL_SECONDS)
        error: dict = {}  # the server's reason, if it refuses
        while True:
            frame = await asyncio.wait_for(self.ws.read_message(), WELCOME_TIMEOUT_SECONDS)
            if frame is None:  # a refusal: an error event, then a close frame
                close_code, self.ws = self.ws.close_code, None
                text = clean(error.get("text")) or describe_close(close_code)
                return Refused(clean(error.get("code")), text, close_code, error.get("held") is True,
                               seconds(error.get("retry_after")))
            event = parse_event(frame)
            if event.get("type") == "error":
                error = event
            elif event.get("type") == "welcome":
                self.receive(frame)
                return None

    async def connect(self, first: bool = False, at_once: bool = False) -> bool:
        """Log in, retrying by the reconnect rule, until in (True) or refused for good (False)."""
        # first: before the chat starts, failing is a ClientError; at_once: Enter asked, no delay.
        attempt, delay, held_for = 0, 0.0 if first or at_once else None, 0.0
        while not self.quitting:
            attempt += 1
            delay = self.delay_before(attempt) if delay is None else delay
            set_state(self.model, "reconnecting" if delay else "connecting",
                      f"in {delay:.0f} s, attempt {attempt}" if delay else "")
            self.show([])
            await asyncio.sleep(delay)
            delay = None
            try:
                refused = await self.log_in()
            except CONNECT_ERRORS as error:
                if self.ws is not None:  # failed half-way, say with no welcome in time: abandon it
                    self.ws.close()
                self.ws = None
                if first:
                    raise ClientError(f"Cannot reach the chat server at {self.settings.url}: "
                                      f"{describe_error(error)}.") from None
                continue
            if refused is None:
                return True
            wait = held_wait(refused)
            if refused.close_code == CLOSE_BAD_TOKEN:
                self.forget_session()
                attempt, delay = 0, 0.0  # a fresh login, at once
            elif wait and held_for + wait <= HELD_WAIT_LIMIT_SECONDS:
                text = (f"{self.settings.username!r} is held for a session that dropped a moment ago, "
                        f"probably yours. Trying again when the name is free, in {wait:.0f} s")
                if first:  # the screen is not ours yet
                    print(f"client.py: {text} (Ctrl-C gives up).", file=sys.stderr, flush=True)
                else:
                    self.show([note(self.model, f"{text}.")])
                held_for, delay = held_for + wait, wait
            elif first:
                raise ClientError(f"The server refused {self.settings.username!r}: {refused.text}")
            elif not should_reconnect(refused.close_code, after_shutdown=True):
                return self.give_up(refused.close_code, refused.text)
        return False

    # -- the life of a session --
    def start(self) -> None:
        """Keep reading events (and reconnecting) in a task of its own."""
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        """Read events, reconnecting by the rule; only /quit ends it (or going offline over pipes)."""
        while True:
            frame = await self.ws.read_message()
            while frame is not None:
                self.receive(frame)
                frame = await self.ws.read_message()
            self.last_close, reason = self.ws.close_code, self.ws.close_reason or ""
            self.lose_connection()
            self.count_drop(time.monotonic())
            if self.quitting:
                return
            if should_reconnect(self.last_close, self.reconnect_after_shutdown):
                self.show([note(self.model, f"Disconnected: {describe_close(self.last_close, reason)}. "
                                            "Reconnecting...", kind="error")])
                back = await self.connect()
            else:
                back = self.give_up(self.last_close, self.offline_text(self.last_close, reason))
            while not back:  # offline: Enter (wake) tries again
                if self.quitting or not self.revivable:
                    return
                await self.wake_up.wait()
                self.wake_up.clear()
                self.gave_up = False
                back = await self.connect(at_once=True)

    def wake(self) -> None:
        """Enter while offline: try to connect again now (resuming with the token, if we have one)."""
        if self.gave_up and self.revivable:
            self.gave_up = False
            self.wake_up.set()

    def count_drop(self, now: float) -> None:
        """A connection ended: count it if it ended soon after its login, else start counting afresh."""
        self.quick_drops = self.quick_drops + 1 if now - self.connected_at < STABLE_SECONDS else 0

    def delay_before(self, attempt: int) -> float:
        """The wait before a reconnect attempt: longer after each connection that did not last."""
        return backoff_seconds(attempt + self.quick_drops)

    def forget_session(self) -> None:
        """The server does not know our token: log in afresh and rejoin our rooms, saying so in every room."""
        self.token = ""
        self.rejoin = rejoin_order(list(self.model.rooms), self.model.room)
        rooms = ", ".join(f"#{name}" for name in self.rejoin)
        then = f", then rejoining {rooms}" if rooms else ""
        if self.last_close in SESSION_ENDED_CODES:  # ended on purpose (idle, say): no news, no restart
            text = f"Logging in afresh as {self.model.username}{then}."
        else:
            text = (f"The server no longer knows this session (it restarted, or the session expired): "
                    f"logging in afresh as {self.model.username}{then}.")
        lines = [add_line(self.model, Line("error", text, local_time(), room=name))
                 for name in list(self.model.rooms)]
        self.show(lines[:1])  # in every room, so it is there whichever one we end up in; printed once

    def lose_connection(self) -> None:
        """Forget the closed connection; a /help sent on it will get no answer now."""
        self.ws, self.logged_in = None, False
        for asked in self.helps:
            if asked is not None and not asked.done():
                asked.set_result(False)
        self.helps.clear()

    def offline_text(self, close_code: int | None, reason: str) -> str:
        """The sentence that says why the server ended the session (the idle time from welcome's limits)."""
        notice, self.idle_notice = self.idle_notice, ""
        if close_code == CLOSE_IDLE and self.model.idle_seconds:
            return f"You were disconnected after {duration(self.model.idle_seconds)} without typing."
        if close_code == CLOSE_IDLE and notice:
            return notice
        return f"Disconnected: {describe_close(close_code, reason)}."

    def give_up(self, close_code: int | None, text: str) -> bool:
        """The server ended the session on purpose: say why in one line, and stay offline (False)."""
        self.gave_up = True
        set_state(self.model, "offline", describe_close(close_code))
        if self.revivable and close_code != CLOSE_BAD_USERNAME:  # a refused name stays refused
            text += " Press Enter to reconnect, or /quit to leave."
        self.show([note(self.model, text, kind="error")])
        return False

    # -- frames in and out --
    def receive(self, frame: str | bytes) -> None:
        """One frame from the server: update the token, answer our questions, fold it into the model."""
        event = parse_event(frame)
        kind = event.get("type")
        if kind == "system" and event.get("event") == "idle":
            self.idle_notice = clean(event.get("text"))  # a close follows: said with it, as one line
            return
        if kind == "welcome":
            self.token = clean(event.get("token"))  # a new one each time: a token works once
            self.connected_at = time.monotonic()
        elif kind == "joined" and not self.logged_in:
            self.logged_in = True  # the joined after welcome: now lines go in order, our question first
            question = asyncio.get_running_loop().create_future()  # a quiet /help: the commands for Tab
            self.outbox[:0] = [question] + [f"/join {name}" for name in self.rejoin]
            self.rejoin = []
            self.pump()
        elif kind == "help" and self.helps:
            asked = self.helps.popleft()
            if asked is not None:  # the answer to our own question: learn the commands, show nothing
                on_help(self.model, event, quiet=True)
                asked.done() or asked.set_result(True)
                return
        self.show(apply_event(self.model, event))

    def ask(self) -> asyncio.Future:
        """A quiet /help after the queued lines: answered in order, when each line before it had its reply."""
        question = asyncio.get_running_loop().create_future()
        self.send(question)
        return question

    def send(self, line: str | asyncio.Future) -> None:
        """Queue a typed line; it goes out as soon as we are logged in and the rate allows."""
        self.outbox.append(line)
        self.pump()

    def write(self, line: str | asyncio.Future) -> None:
        """Put one line on the wire (our own question goes as /help, its answer awaited in order)."""
        text = line if isinstance(line, str) else "/help"
        if text.split(" ")[0].lower() == "/help":
            self.helps.append(None if isinstance(line, str) else line)
        try:
            written = self.ws.write_message(text)
        except tornado.websocket.WebSocketClosedError:  # the link is gone: run() sees the close, reconnects
            return
        written.add_done_callback(lambda future: future.cancelled() or future.exception())  # failed: the same

    def pump(self) -> None:
        """Send queued lines, in order, as fast as the server's rate limit allows."""
        while self.logged_in and self.outbox and not self.pump_timer:
            delay = self.model.rate.wait(time.monotonic()) if self.model.rate else 0.0
            if delay:  # a timer callback sends the rest: never a sleep
                self.pump_timer = asyncio.get_running_loop().call_later(delay, self.pump_later)
                break
            self.write(self.outbox.pop(0))

    def pump_later(self) -> None:
        """Timer callback: the rate allows another line now."""
        self.pump_timer = None
        self.pump()

    async def close(self) -> None:
        """Leave with a normal close frame (the server frees the name at once), then stop."""
        self.quitting = True
        if self.ws is not None:
            self.ws.close(1000, "bye")
        elif self.task is not None:
            self.task.cancel()  # it is waiting to reconnect: nothing to say goodbye to
        if self.task is not None:
            _, pending = await asyncio.wait({self.task}, timeout=CLOSE_WAIT_SECONDS)
            for task in pending:
                task.cancel()
            if self.task.done() and not self.task.cancelled():
                self.task.result()  # a crash in run() is not swallowed


# ---- 7. Plain line mode -------------------------------------------------------


def too_long_note(model: Model, text: str) -> str:
    """Why a line cannot be sent as it is (over the server's length limit), or "" if it can."""
    if not model.limit_chars or len(text) <= model.limit_chars:
        return ""
    return (f"Your line has {len(text)} characters; the limit is {model.limit_chars}. "
            "Shorten it and press Enter again.")


def plain_text(line: Line) -> str:
    """A line as plain mode prints it: [12:01:02] #general <bob> hi, and so on."""
    room = f"#{line.room} " if line.room else ""
    if line.kind == "message":
        return f"[{line.time}] {room}<{line.username}> {line.text}"
    if line.kind == "error":
        return f"! {line.text}"
    if line.kind == "info":
        return f"* {line.text}"
    return f"[{line.time}] {room}* {line.text}"


class Printer:
    """Plain mode's output: the lines of one frame's time go out in one write, not a system call per line."""

    def __init__(self):
        """Nothing waiting to be printed."""
        self.pending: list[str] = []
        self.timer: asyncio.TimerHandle | None = None

    def show(self, lines: list[Line]) -> None:
        """Print these lines within a frame's time."""
        self.pending += [plain_text(line) for line in lines]
        if self.pending and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(1 / FRAMES_PER_SECOND, self.flush)

    def flush(self) -> None:
        """Print what is waiting, now."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer, lines, self.pending = None, "".join(f"{text}\n" for text in self.pending), []
        try:
            if lines:
                sys.stdout.write(lines)
                sys.stdout.flush()
        except OSError:  # the terminal has gone (its window closed), or the pipe: nobody reads now
            pass


# Signals that mean "leave, as /quit does": Ctrl-C, a polite kill, the terminal window closing (SIGHUP),
# Ctrl-Break on Windows; one a system lacks is skipped. (A Windows console window that closes sends
# CTRL_CLOSE_EVENT, which Python cannot catch: the server holds the vanished session for its resume grace.)
LEAVING_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")


def hand_over(loop: asyncio.AbstractEventLoop, *call) -> bool:
    """From another thread or a signal handler: run call on the loop, soon; False if the loop has closed."""
    try:
        loop.call_soon_threadsafe(*call)
        return True
    except RuntimeError:
        return False  # the loop has closed: the client is already on its way out


class SignalWatch:
    """Signals as calls on the loop: its own watch on Unix, a handler that hands over on Windows."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        """Nothing watched yet."""
        self.loop = loop
        self.undo: list[Callable[[], object]] = []

    def on(self, name: str, callback: Callable[[], None]) -> bool:
        """Call back on the loop when signal `name` arrives; False if this system has no such signal."""
        number = getattr(signal, name, None)
        if number is None:
            return False
        try:
            self.loop.add_signal_handler(number, callback)
            self.undo.append(lambda: self.loop.remove_signal_handler(number))
        except NotImplementedError:
            previous = signal.signal(number, lambda *_: hand_over(self.loop, callback))
            self.undo.append(lambda: signal.signal(number, previous or signal.SIG_DFL))  # None: not Python's
        return True

    def close(self) -> None:
        """Stop watching: each signal does what it did before."""
        while self.undo:
            self.undo.pop()()


def read_stdin_in_thread(loop: asyncio.AbstractEventLoop, on_line: Callable[[str], None],
                         on_end: Callable[[], None]) -> None:
    """Read stdin's lines in a thread that hands them to the loop (which cannot watch a file, nor Windows)."""
    def read() -> None:
        """The thread: split what stdin gives into lines, until it ends."""
        decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
        for chunk in iter(lambda: raw_stdin.read(65536), b""):
            *lines, pending = (pending + decoder.decode(chunk)).split("\n")
            for line in lines:
                hand_over(loop, on_line, line.removesuffix("\r"))
        if pending:
            hand_over(loop, on_line, pending)  # a last line without a newline still counts
        hand_over(loop, on_end)

    # Unbuffered (UTF-8 on a Windows console too): a daemon thread blocked inside sys.stdin holds
    # its lock, and Python aborts if that lock is held when the client exits.
    raw_stdin = sys.stdin.buffer.raw
    threading.Thread(target=read, name="stdin", daemon=True).start()


async def run_plain(settings: Settings) -> int:
    """Plain line mode: send stdin's lines, print one line per event, leave at end of input."""
    sys.stdout.reconfigure(errors="replace")
    model = Model(settings.url, settings.username)
    interactive = sys.stdin.isatty()  # someone types: offline waits for Enter, as in the split view
    printer = Printer()
    connection = Connection(settings, model, printer.show, reconnect_after_shutdown=interactive,
                            revivable=interactive)
    await connection.connect(first=True)
    connection.start()
    finished = asyncio.Event()  # end of input, /quit or Ctrl-C

    def on_line(line: str) -> None:
        """A stdin line: /quit finishes, too long is refused, else it is sent; offline, any reconnects."""
        if finished.is_set():
            return
        too_long = too_long_note(model, line)
        if line.strip().lower() in QUIT_COMMANDS:
            finished.set()
        elif too_long:
            printer.show([note(model, too_long, kind="error")])
        else:
            connection.wake()
            if line.strip():
                connection.send(line)

    loop = asyncio.get_running_loop()
    read_stdin_in_thread(loop, on_line, finished.set)
    signals = SignalWatch(loop)
    for name in LEAVING_SIGNALS:
        signals.on(name, finished.set)
    try:
        return await finish_plain(connection, finished)
    finally:
        signals.close()
        printer.flush()


async def finish_plain(connection: Connection, finished: asyncio.Event) -> int:
    """Wait for the end of input (or of the session); wait briefly for the echoes; close."""
    waiting = asyncio.create_task(finished.wait())
    await asyncio.wait({waiting, connection.task}, return_when=asyncio.FIRST_COMPLETED)
    if connection.task.done():  # the server ended the session
        waiting.cancel()
        connection.task.result()
        return 1
    rate = connection.model.rate
    pacing_seconds = len(connection.outbox) / rate.per_second if rate else 0.0  # still queued
    try:  # the lines we sent deserve their echoes before we go: one round trip says they came
        if not connection.gave_up:
            await asyncio.wait_for(connection.ask(), REPLY_WAIT_SECONDS + pacing_seconds)
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
        print("! Some lines got no reply from the server in time.", file=sys.stderr)
    await connection.close()
    return 0


# ---- 8. Split view: drawing ------------------------------------------------------
# A frame is the whole screen, painted from the model piece by piece (a resize is just a redraw);
# only the pieces that changed are written, at most FRAMES_PER_SECOND times a second (section 9),
# so a busy room costs a few rows per frame, not a screen per message.

# The sidebar shows by itself from WITH_SIDEBAR_COLUMNS on; a narrower terminal (80x24 is common) gives
# all its width to the messages, and F2 brings a narrower sidebar back.
SIDEBAR_COLUMNS = 22
WITH_SIDEBAR_COLUMNS = 100
NARROW_SIDEBAR_COLUMNS = 16  # the sidebar asked for (F2) on a narrower terminal ...
MIN_SIDEBAR_COLUMNS = 40  # ... that is at least this wide
MIN_COLUMNS, MIN_ROWS = 20, 5
TIME_COLUMNS = 8  # HH:MM:SS
MARKS = {"join": "-->", "leave": "<--", "system": "--", "info": "--", "error": "!!"}
PAINTED_ROWS_KEPT = 1000  # message rows remembered once painted: a few screens' worth


@dataclass
class Layout:
    """Where the parts of the split view go, for one terminal size."""
    width: int
    height: int
    wants_sidebar: bool | None = None  # F2's choice; None: by the width

    def __post_init__(self):
        """The sizes of the parts: the sidebar shows on a wide terminal, or when F2 asked for it."""
        wide = self.width >= WITH_SIDEBAR_COLUMNS
        shown = wide if self.wants_sidebar is None else self.wants_sidebar
        self.sidebar = 0  # its columns; 0: hidden
        if shown and self.width >= MIN_SIDEBAR_COLUMNS:
            self.sidebar = SIDEBAR_COLUMNS if wide else NARROW_SIDEBAR_COLUMNS
        self.messages = self.width - self.sidebar  # columns of the message area
        self.body = self.height - 3  # rows between the header and the status bar
        self.names = 12 if self.messages >= 64 else 8  # columns for the name (or mark) before a message
        self.text = max(self.messages - TIME_COLUMNS - 1 - self.names - 3 - 1, 4)  # after " │ ", a margin


@dataclass
class Row:
    """One screen row of the message area: a line, and which part of its wrapped text."""
    line: Line
    text: str
    first: bool  # the first row of a line shows its time and name


def visible_rows(room: Room, layout: Layout) -> tuple[list[Row], int]:
    """The rows on screen (oldest first) and the scroll offset, held inside the room's history."""
    rows: list[Row] = []  # the wrapped rows of the newest lines above the view, as many as needed
    for line in reversed(list(room.lines)[:len(room.lines) - room.lines_below]):
        rows[:0] = [Row(line, part, index == 0) for index, part in enumerate(wrap(line.text, layout.text))]
        if len(rows) >= layout.body + room.scroll_rows:
            break
    scroll = min(room.scroll_rows, max(0, len(rows) - layout.body))
    end = len(rows) - scroll
    return rows[max(0, end - layout.body):end], scroll


def scroll_view(room: Room, rows: int, width: int) -> None:
    """Scroll a room's view by rows (up > 0); down, lines below it come back one by one, then the newest."""
    room.scroll_rows += rows
    while room.scroll_rows < 0 and room.lines_below:
        room.lines_below -= 1
        line = room.lines[len(room.lines) - room.lines_below - 1]
        room.scroll_rows += len(wrap(line.text, width))
    if room.scroll_rows <= 0 and not room.lines_below:
        show_newest(room)


def paint(pieces: list[tuple[Callable[[str], str], str]], width: int) -> str:
    """Styled pieces of text in exactly width columns: clipped where they run out, padded after."""
    out, left = [], width
    for style, text in pieces:
        text = clip(text, left)
        left -= text_width(text)
        out.append(style(text) if text else "")
    return "".join(out) + " " * left


def dim(term: blessed.Terminal) -> Callable[[str], str]:
    """Grey, for times and borders; plain on 8 colours, where blessed's grey is a broken sequence."""
    return term.bright_black if term.number_of_colors >= 16 else str


def username_style(term: blessed.Terminal, username: str, own: bool = False) -> Callable[[str], str]:
    """A username's colour, from the palette this terminal can show; your own name in bold too."""
    palette = USERNAME_COLOURS if term.number_of_colors >= 16 else BASIC_USERNAME_COLOURS
    colour = term.color(username_colour(username, palette))
    return (lambda text: term.bold + colour(text)) if own else colour


def header(term: blessed.Terminal, model: Model, layout: Layout) -> str:
    """The top row: room, your name (no sidebar: how many are here), server; the connection state last."""
    width = layout.width
    state = f" {model.state}" + (f": {model.state_detail} " if model.state_detail else " ")
    state = clip(state, max(width // 2, 0))
    colour = {"connected": term.black_on_green, "offline": term.white_on_red}.get(
        model.state, term.black_on_yellow)
    count = current_room(model).user_count
    here = "" if layout.sidebar else f" · {count} user{'' if count == 1 else 's'} here"
    title = f" #{model.room} · {model.username}{here} · {model.server}"
    return paint([(term.reverse, fit(title, width - text_width(state))), (colour, state)], width)


def message_row(term: blessed.Terminal, model: Model, row: Row, layout: Layout) -> str:
    """One row of the message area: time, name or mark, separator, text."""
    line = row.line
    if not row.first:  # a wrapped line's later rows: its text only
        return painted_row(term, line.kind, "", "", row.text, False, layout.names, layout.messages)
    mark = line.username if line.kind == "message" else MARKS.get(line.kind, "--")
    own = line.kind == "message" and mark.lower() == model.username.lower()
    return painted_row(term, line.kind, line.time, mark, row.text, own, layout.names, layout.messages)


@functools.lru_cache(maxsize=PAINTED_ROWS_KEPT)
def painted_row(term: blessed.Terminal, kind: str, time: str, mark: str, text: str, own: bool,
                names: int, width: int) -> str:
    """A message row in its colours, remembered: in a busy room rows just move up, and a look-up is cheap."""
    name_style = {"message": username_style(term, mark, own), "join": term.green, "leave": term.red,
                  "error": term.bold_red}.get(kind, term.cyan)
    text_style = {"error": term.red, "system": term.cyan, "info": term.cyan}.get(kind, str)
    mark = clip(mark, names - 1) + "…" if text_width(mark) > names else mark  # a long name ends in …
    return paint([(dim(term), f"{time:{TIME_COLUMNS}} "), (name_style, term.rjust(mark, names)),
                  (dim(term), " │ "), (text_style, text)], width)


def sidebar(term: blessed.Terminal, model: Model, layout: Layout) -> list[str]:
    """The sidebar, a string per body row behind a border: your rooms (unread counts), the room's users."""
    width = layout.sidebar - 2
    entries = [paint([(term.bold, "Rooms")], width)]
    for name in sorted(model.rooms, key=room_order):
        unread = model.rooms[name].unread
        count = f" {unread}" if unread else ""
        style = term.reverse if name == model.room else term.bold if unread else str
        name_part = fit(f"#{name}", width - len(count))
        entries.append(paint([(style, name_part), (term.bold_yellow, count)], width))
    room = current_room(model)
    entries += [" " * width, paint([(term.bold, f"Users ({room.user_count})")], width)]
    for name in room.users:
        own = name.lower() == model.username.lower()
        entries.append(paint([(username_style(term, name, own), name)], width))
    if len(entries) > layout.body:  # a long list ends in "+N more"
        hidden = len(entries) - layout.body + 1
        entries = entries[:layout.body - 1] + [paint([(dim(term), f"+{hidden} more")], width)]
    entries += [" " * width] * (layout.body - len(entries))
    return [dim(term)("│") + " " + entry for entry in entries]


def fitting(parts: list[tuple[int, str]], width: int, separator: str = " · ") -> str:
    """As many of the (rank, text) parts as fit in width, in their order; the highest ranks go first."""
    ranks = sorted(rank for rank, _ in parts)
    while ranks:
        text = separator.join(part for rank, part in parts if rank <= ranks[-1])
        if text_width(text) <= width:
            return text
        ranks.pop()
    return ""


# The status bar's hints, ranked: on a narrow terminal the highest ranks are left out.
HINTS = [(3, "Enter sends"), (4, "Tab completes"), (5, "PgUp/PgDn scroll"), (2, "F2 rooms & users"),
         (1, "/help lists commands"), (0, "/quit leaves")]


def status_bar(term: blessed.Terminal, model: Model, layout: Layout, scroll: int) -> str:
    """The row above the input: scrolled up (new messages below), unread rooms, or hints, in whole parts."""
    room, style, width = current_room(model), term.reverse, layout.width - 1
    if scroll or room.lines_below:
        news = room.new_below
        below = [(2, f"{news} new message{'s' if news != 1 else ''} below")] if news else []
        text = "-- " + fitting([(0, "scrolled up")] + below + [(1, "PgDn goes back down --")], width - 3)
        text = text.replace("up · ", "up: ")
        style = term.black_on_yellow if news else style
    elif not layout.sidebar and any(room.unread for room in model.rooms.values()):
        unread = [r for r in model.rooms.values() if r.unread]
        text = "unread: " + fitting(list(enumerate(f"#{r.name} {r.unread}" for r in unread)), width - 8, ", ")
    else:
        text = fitting([hint for hint in HINTS if layout.sidebar == 0 or hint[0] != 2], width)
    return paint([(style, fit(" " + text, layout.width))], layout.width)


def input_window(text: str, cursor: int, width: int) -> tuple[str, str, str]:
    """The visible part of the input line: (before the cursor, under it, after it), within width."""
    under = text[cursor] if cursor < len(text) else " "
    room = max(width - text_width(under), 0)
    before = clip(text[:cursor], room, keep_end=True)
    after = clip(text[cursor + 1:], room - text_width(before))
    return before, under, after


def input_row(term: blessed.Terminal, model: Model, width: int) -> tuple[str, int]:
    """The bottom row (prompt with the room, the line being typed, its cursor); the cursor's column."""
    prompt, length, limit = f"#{model.room} › ", len(model.input.text), model.limit_chars
    counter = f" {length}/{limit}" if limit and length >= NEAR_LIMIT_FRACTION * limit else ""
    counter_style = term.bold_red if length > limit else term.yellow
    room = max(width - text_width(prompt) - len(counter), 1)
    before, under, after = input_window(model.input.text, model.input.cursor, room)
    pieces = [(term.bold, prompt), (str, before), (term.reverse, under), (str, after)]
    left = paint(pieces, width - len(counter))
    column = min(text_width(prompt) + text_width(before), width - 1)
    return left + paint([(counter_style, counter)], min(len(counter), width)), column


@dataclass
class Frame:
    """The screen as one redraw paints it: styled pieces by (row, column), and the cursor's place."""
    layout: Layout
    pieces: dict[tuple[int, int], str]  # each piece exactly fills its part of a row
    cursor: tuple[int, int]  # (row, column) where the user types
    scroll: int  # the message area's scroll offset, held inside the room's history


def draw_screen(term: blessed.Terminal, model: Model, layout: Layout) -> Frame:
    """The whole screen as a frame: header, message rows, sidebar rows, status bar, input line."""
    if layout.width < MIN_COLUMNS or layout.height < MIN_ROWS:
        return Frame(layout, {(0, 0): "Terminal too small."}, (0, 0), 0)
    rows, scroll = visible_rows(current_room(model), layout)
    messages = [message_row(term, model, row, layout) for row in rows]
    messages[:0] = [" " * layout.messages] * (layout.body - len(messages))  # bottom-aligned
    side = sidebar(term, model, layout) if layout.sidebar else []
    pieces = {(0, 0): header(term, model, layout)}
    for y in range(layout.body):
        pieces[(1 + y, 0)] = messages[y]
        if side:
            pieces[(1 + y, layout.messages)] = side[y]
    pieces[(layout.height - 2, 0)] = status_bar(term, model, layout, scroll)
    pieces[(layout.height - 1, 0)], column = input_row(term, model, layout.width)
    return Frame(layout, pieces, (layout.height - 1, column), scroll)


def frame_output(term: blessed.Terminal, shown: Frame | None, frame: Frame) -> str:
    """The pieces of `frame` that differ from `shown` (None: clear, paint all), then the cursor."""
    fresh = shown is None or shown.layout != frame.layout
    out, before = ([term.clear], {}) if fresh else ([], shown.pieces)
    for (y, x), piece in frame.pieces.items():
        if before.get((y, x)) != piece:
            out.append(term.move_yx(y, x) + piece)
    if out or shown.cursor != frame.cursor:
        out.append(term.move_yx(*frame.cursor))
    return "".join(out)


# ---- 9. Split view: keys, commands, signals, terminal modes -----------------------


class SplitView:
    """The full-screen client: draws the model and turns keys into edits and commands."""

    def __init__(self, term: blessed.Terminal, model: Model):
        """Nothing drawn yet; the connection is attached before the run."""
        self.term, self.model = term, model
        self.connection: Connection | None = None
        self.dirty = asyncio.Event()  # the model changed since the last frame
        self.may_draw = asyncio.Event()  # set a frame's time after each redraw, or at once by a key
        self.shown: Frame | None = None  # what the terminal shows; None: unknown, so repaint it all
        self.page_rows = 1  # message rows at the last redraw, for PgUp/PgDn
        self.wants_sidebar: bool | None = None  # F2's choice; None: the sidebar shows on a wide terminal
        self.done = asyncio.Event()  # /quit, Ctrl-C or Ctrl-D
        self.hung_up = False  # the terminal has gone (its window closed): restoring it may fail too
        self.shell_modes = termios.tcgetattr(sys.stdin.fileno()) if CAN_SUSPEND else None  # back on Ctrl-Z

    # -- drawing --
    def show(self, lines: list[Line]) -> None:
        """The model changed: redraw at the next frame (a burst of events shares one)."""
        self.dirty.set()

    def redraw(self) -> None:
        """Bring the screen up to date with the model, writing only what changed."""
        layout = self.layout()
        frame = draw_screen(self.term, self.model, layout)
        current_room(self.model).scroll_rows = frame.scroll  # scrolling stops at the oldest line
        self.page_rows = max(layout.body, 1)
        output, self.shown = frame_output(self.term, self.shown, frame), frame
        try:
            if output:
                self.term.stream.write(output)
                self.term.stream.flush()
        except OSError:  # the terminal has gone (its window closed): leave, as SIGHUP says too
            self.hang_up()

    async def draw_forever(self) -> None:
        """Redraw when the model changed, at most FRAMES_PER_SECOND a second; events share a frame."""
        loop, timer = asyncio.get_running_loop(), None
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            self.redraw()
            self.may_draw.clear()
            if timer is not None:
                timer.cancel()  # a key cut the last wait short: its timer must not shorten this one
            timer = loop.call_later(1 / FRAMES_PER_SECOND, self.may_draw.set)
            await self.may_draw.wait()

    def repaint(self) -> None:
        """Redraw from a blank screen (after a resize, or Ctrl-L)."""
        self.shown = None
        self.dirty.set()

    def suspend(self) -> None:
        """Ctrl-Z: give the terminal back to the shell, stop, and redraw when continued (fg)."""
        term, keyboard = self.term, sys.stdin.fileno()
        chat_modes = termios.tcgetattr(keyboard)
        termios.tcsetattr(keyboard, termios.TCSADRAIN, self.shell_modes)
        term.stream.write(term.exit_fullscreen + term.normal_cursor)
        term.stream.flush()
        os.kill(os.getpid(), signal.SIGSTOP)  # the process stops here until `fg`
        termios.tcsetattr(keyboard, termios.TCSADRAIN, chat_modes)
        term.stream.write(term.enter_fullscreen + term.hide_cursor)
        self.repaint()

    # -- keys --
    async def read_keys(self) -> None:
        """Handle keystrokes when the loop sees stdin readable, never blocking (Windows: a thread reads)."""
        loop, keyboard, readable = asyncio.get_running_loop(), sys.stdin.fileno(), asyncio.Event()
        try:
            loop.add_reader(keyboard, readable.set)
        except NotImplementedError:
            return await self.read_keys_in_thread()
        try:
            while True:
                await readable.wait()
                readable.clear()
                for key in iter(lambda: self.term.inkey(timeout=0, esc_delay=ESC_DELAY_SECONDS), ""):
                    self.on_key(key)
        except (EOFError, OSError):  # the terminal has gone (its window closed)
            self.hang_up()
        finally:
            loop.remove_reader(keyboard)

    async def read_keys_in_thread(self) -> None:
        """Read keys in a thread that hands them over; it wakes every KEY_WAIT_SECONDS to stop in time."""
        loop, stop = asyncio.get_running_loop(), threading.Event()

        def read() -> None:
            """The thread: wait for a keystroke, pass it on, until told to stop (or the loop has closed)."""
            while not stop.is_set():
                try:
                    key = self.term.inkey(timeout=KEY_WAIT_SECONDS, esc_delay=ESC_DELAY_SECONDS)
                except (EOFError, OSError):  # the terminal has gone
                    return hand_over(loop, self.quit)
                if key and not hand_over(loop, self.on_key, key):
                    return

        reader = threading.Thread(target=read, name="keys", daemon=True)
        reader.start()
        try:
            await loop.create_future()  # until the run ends and cancels this task
        finally:
            stop.set()
            reader.join(KEY_WAIT_SECONDS + 1)

    async def watch_size(self) -> None:
        """Repaint when the terminal's size changes, by looking (where no SIGWINCH says so)."""
        size = (self.term.width, self.term.height)
        while True:
            await asyncio.sleep(SIZE_CHECK_SECONDS)
            if (self.term.width, self.term.height) != size:
                size = (self.term.width, self.term.height)
                self.repaint()

    def on_key(self, key: blessed.keyboard.Keystroke) -> None:
        """One keystroke: an action from KEY_ACTIONS, or a character to insert."""
        line = self.model.input
        if key.name != "KEY_TAB":
            line.completion = None
        action = KEY_ACTIONS.get(key.name) or KEY_ACTIONS.get(str(key))
        if action is not None:
            action(self)
        elif key and not key.is_sequence:
            line.insert(clean(str(key)))  # clean() drops control keys nobody bound
        self.dirty.set()
        self.may_draw.set()

    def submit(self) -> None:
        """Enter: /quit leaves; offline, any line reconnects; a too long line stays, to be shortened."""
        text = self.model.input.text
        if text.strip().lower() in QUIT_COMMANDS:
            return self.quit()
        too_long = too_long_note(self.model, text)
        if too_long:
            note(self.model, too_long, kind="error")
            return
        self.connection.wake()
        if not text.strip():
            self.model.input.set("")
            return
        if not self.connection.logged_in:
            note(self.model, "Not connected right now: the line goes out once we are back.")
        show_newest(current_room(self.model))  # what you send shows at the bottom
        self.connection.send(self.model.input.take())

    def scroll(self, pages: int) -> None:
        """PgUp/PgDn: scroll the current room by (almost) a page."""
        scroll_view(current_room(self.model), pages * max(self.page_rows - 2, 1), self.layout().text)

    def layout(self) -> Layout:
        """The layout for the terminal's size now (and F2's choice)."""
        return Layout(self.term.width, self.term.height, self.wants_sidebar)

    def toggle_sidebar(self) -> None:
        """F2 (or Ctrl-G): hide the sidebar if it shows, show it if it is hidden."""
        self.wants_sidebar = not self.layout().sidebar

    def switch_room(self, step: int) -> None:
        """Ctrl-N/Ctrl-P: make the next/previous of your rooms current (a /join to the server)."""
        names = sorted(self.model.rooms, key=room_order)
        if self.connection.logged_in and self.model.room in names and len(names) > 1:
            target = names[(names.index(self.model.room) + step) % len(names)]
            self.connection.send(f"/join {target}")

    def complete(self) -> None:
        """Tab: complete a command, a room name or a username."""
        line = self.model.input
        line.complete(completion_pool(self.model, line.text[:line.cursor]))

    def quit_if_empty(self) -> None:
        """Ctrl-D: leave, but only on an empty line."""
        if not self.model.input.text:
            self.quit()

    def quit(self) -> None:
        """Leave the chat (the terminal is restored on the way out)."""
        self.done.set()

    def hang_up(self) -> None:
        """SIGHUP, or a failed write: the terminal window has closed. Leave all the same, with a goodbye."""
        self.hung_up = True
        self.quit()

    # -- the whole run --
    async def run(self) -> None:
        """Handle keys, redraws and the connection until you leave; a crashed task ends it."""
        signals = SignalWatch(asyncio.get_running_loop())  # handlers run on the loop, between callbacks
        for name in LEAVING_SIGNALS:
            signals.on(name, self.hang_up if name == "SIGHUP" else self.quit)
        if CAN_SUSPEND:
            signals.on("SIGTSTP", self.suspend)
        tasks = {asyncio.create_task(self.read_keys()), asyncio.create_task(self.draw_forever())}
        if not signals.on("SIGWINCH", self.repaint):  # no SIGWINCH (Windows): look at the size now and then
            tasks.add(asyncio.create_task(self.watch_size()))
        self.connection.start()
        self.repaint()
        tasks |= {self.connection.task, asyncio.create_task(self.done.wait())}
        try:
            while not self.done.is_set():
                finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()  # raises if the task crashed; the connection task may just end
        finally:
            helpers = tasks - {self.connection.task}
            for task in helpers:
                task.cancel()
            if helpers:
                await asyncio.wait(helpers)  # the key reader has stopped before the terminal is restored
            signals.close()
            await self.connection.close()  # a goodbye even after a crash, or with the terminal gone


def ctrl(letter: str) -> str:
    """The character a Ctrl-letter key sends: ctrl("a") is "\\x01"."""
    return chr(ord(letter) & 0x1F)


def editing(edit: Callable[[InputLine], None]) -> Callable[[SplitView], None]:
    """A key's action that edits the input line, for KEY_ACTIONS."""
    return lambda view: edit(view.model.input)


TO_START = editing(lambda line: line.move(-len(line.text)))  # Home, Ctrl-A
TO_END = editing(lambda line: line.move(len(line.text)))  # End, Ctrl-E

# Keys by blessed's name (KEY_ENTER ...) or, for Ctrl-letters, by the character they send; a pair to a line.
KEY_ACTIONS: dict[str, Callable[[SplitView], None]] = {
    "KEY_ENTER": SplitView.submit, "KEY_TAB": SplitView.complete,
    "KEY_BACKSPACE": editing(InputLine.backspace), "KEY_DELETE": editing(InputLine.delete),
    "KEY_LEFT": editing(lambda line: line.move(-1)), "KEY_RIGHT": editing(lambda line: line.move(1)),
    "KEY_HOME": TO_START, "KEY_END": TO_END, ctrl("a"): TO_START, ctrl("e"): TO_END,
    ctrl("w"): editing(InputLine.delete_word), ctrl("u"): editing(lambda line: line.set("")),
    "KEY_UP": editing(InputLine.history_back), "KEY_DOWN": editing(InputLine.history_forward),
    "KEY_PGUP": lambda view: view.scroll(1), "KEY_PGDOWN": lambda view: view.scroll(-1),
    ctrl("n"): lambda view: view.switch_room(1), ctrl("p"): lambda view: view.switch_room(-1),
    "KEY_F2": SplitView.toggle_sidebar, ctrl("g"): SplitView.toggle_sidebar, ctrl("l"): SplitView.repaint,
    ctrl("d"): SplitView.quit_if_empty,
    ctrl("c"): SplitView.quit,  # a terminal usually turns Ctrl-C into SIGINT; where it arrives as a key
}


class LogToMessageArea(logging.Handler):
    """In the split view, log records (say, a Tornado warning) become error lines, not screen litter."""

    def __init__(self, view: SplitView):
        """Warnings and worse go to this view's message area."""
        super().__init__(logging.WARNING)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        """Show one log record as an error line."""
        note(self.view.model, clean(f"{record.name}: {record.getMessage()}"), kind="error")
        self.view.dirty.set()


async def run_split(settings: Settings) -> int:
    """The split view: log in, then take over the terminal until /quit, Ctrl-C or Ctrl-D."""
    term = blessed.Terminal()
    if not term.does_styling:  # NO_COLOR makes blessed send no sequences at all, not even cursor moves
        print("client.py: the split view needs terminal sequences (is NO_COLOR set?); using plain line mode.",
              file=sys.stderr)
        return await run_plain(settings)
    model = Model(settings.url, settings.username)
    view = SplitView(term, model)
    view.connection = Connection(settings, model, view.show, reconnect_after_shutdown=True, revivable=True)
    await view.connection.connect(first=True)  # before the screen changes: errors print plainly
    handler = LogToMessageArea(view)
    logging.getLogger().addHandler(handler)
    try:
        with term.fullscreen(), term.cbreak(), term.hidden_cursor():
            await view.run()
    except TERMINAL_ERRORS:
        if not view.hung_up:
            raise  # a terminal that is still there: this is a bug, and its traceback is shown
    finally:
        logging.getLogger().removeHandler(handler)
    return 0


# ---- 10. Main -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Pick the mode and run it; a failure to start is one sentence on stderr and exit code 1."""
    try:
        settings = parse_settings(argv)
        plain = settings.plain or not (sys.stdin.isatty() and sys.stdout.isatty())
        return asyncio.run(run_plain(settings) if plain else run_split(settings))
    except ClientError as error:
        print(f"client.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the chat started
        return 130


if __name__ == "__main__":
    sys.exit(main())
