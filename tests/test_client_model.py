"""client.py without a terminal or a network: safe text, layout helpers, the model, the input line.

In the order of client.py's sections: text first, then events folded into the
model, then the input line, then the connection's pure decisions, then layout.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import re
import time

import blessed
import pytest
from hypothesis import given
from hypothesis import strategies as st

import chat
import client
from client import InputLine, Line, Model, Room, apply_event


@pytest.fixture
def utc(monkeypatch):
    """Local time is UTC for this test, so HH:MM:SS can be asserted."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset() is Unix only: on this system a process cannot switch its own time zone")
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def logged_in(username: str = "carol", rooms=("lobby",), room: str = "lobby") -> Model:
    """A model after welcome and joined: carol in the lobby, with alice and bob there too."""
    model = Model("ws://localhost:8888/ws", username)
    apply_event(model, {"type": "welcome", "username": username, "room": room, "rooms": list(rooms),
                        "token": "t" * 32, "limits": {"max_message_length": 500}})
    apply_event(model, {"type": "joined", "room": room, "users": ["alice", "bob", username], "user_count": 3})
    return model


def message(room: str, text: str, username: str = "bob", **extra) -> dict:
    """A message event, as the server sends it."""
    return {"type": "message", "timestamp": "2026-11-25T19:48:04.123Z", "username": username,
            "room": room, "text": text, **extra}


# ---- 1. Settings -------------------------------------------------------------------


@pytest.mark.parametrize("flag, address, url", [
    ("--host", "localhost", "ws://localhost:8888/ws"),
    ("--host", "192.168.1.20", "ws://192.168.1.20:8888/ws"),
    ("--host", "127.0.0.1:9000", "ws://127.0.0.1:9000/ws"),  # HOST:PORT
    ("--host", "http://127.0.0.1:8888/", "ws://127.0.0.1:8888/ws"),  # the page's address, pasted
    ("--host", "https://chat.example.org/", "wss://chat.example.org/ws"),  # a URL's own port: 443
    ("--host", "ws://127.0.0.1:8888/ws", "ws://127.0.0.1:8888/ws"),
    ("--host", " Laptop.local ", "ws://laptop.local:8888/ws"),
    ("--host", "[::1]:9000", "ws://[::1]:9000/ws"),  # IPv6 in brackets
    ("--host", "[::1]", "ws://[::1]:8888/ws"),
    ("--host", "::1", "ws://[::1]:8888/ws"),  # a bare IPv6 address gets its brackets
    ("--url", "ws://127.0.0.1:8888", "ws://127.0.0.1:8888/ws"),  # /ws is added to a URL without a path
    ("--url", "ws://127.0.0.1:8888/", "ws://127.0.0.1:8888/ws"),
    ("--url", "wss://host/chat/ws?x=1", "wss://host/chat/ws?x=1"),  # a path behind a proxy is kept
    ("--url", "http://127.0.0.1:8888/", "ws://127.0.0.1:8888/ws"),
])
def test_the_server_address_is_read_in_every_form_people_paste(flag, address, url):
    """HOST, HOST:PORT, [IPv6]:PORT, http(s):// and ws(s):// URLs all name the same server."""
    assert client.server_url(flag, address, None if flag == "--url" else 8888) == url


@pytest.mark.parametrize("address", [
    "", "a b", "ftp://host/", "host:abc", "host:99999", "http://:8888/", "alice@host", "[::1", "#lobby",
])
def test_anything_else_is_one_sentence_naming_the_flag_and_the_value(address):
    """A mistake is a ClientError with one sentence (main prints it), never a traceback."""
    with pytest.raises(client.ClientError) as refused:
        client.server_url("--host", address, 8888)
    assert str(refused.value).startswith(f"--host {address!r} is not a server address") and "\n" not in str(refused.value)


@pytest.mark.parametrize("value, port", [("9000", 9000), ("1", 1), ("65535", 65535), (None, 8888)])
def test_chat_port_is_read_as_the_server_reads_it(monkeypatch, value, port):
    """CHAT_PORT sets the default port, as for chat.py."""
    if value is None:
        monkeypatch.delenv("CHAT_PORT", raising=False)
    else:
        monkeypatch.setenv("CHAT_PORT", value)
    assert client.default_port() == port


@pytest.mark.parametrize("value", ["abc", "0", "65536", "-1", "²", "８８８８", " 8888", ""])
def test_a_chat_port_that_is_no_port_number_is_refused_in_the_servers_words(monkeypatch, value):
    """chat.py's rule and sentence: a whole number 1-65535 in plain ASCII digits."""
    monkeypatch.setenv("CHAT_PORT", value)
    with pytest.raises(client.ClientError) as refused:
        client.default_port()
    assert str(refused.value) == f"CHAT_PORT must be a port number (1-65535), not {value!r}."
    assert not chat.is_port_number(value)


@pytest.mark.parametrize("argv, url", [
    (["carol"], "ws://localhost:8888/ws"),
    (["carol", "--host", "10.0.0.5", "--port", "9000"], "ws://10.0.0.5:9000/ws"),
    (["carol", "--host", "10.0.0.5:9001", "--port", "9000"], "ws://10.0.0.5:9001/ws"),  # the address's port wins
    (["carol", "--url", "ws://h:1", "--host", "ignored"], "ws://h:1/ws"),
])
def test_the_command_line_gives_the_url(monkeypatch, argv, url):
    """--url beats --host; a port in --host beats --port."""
    monkeypatch.delenv("CHAT_PORT", raising=False)
    assert client.parse_settings(argv).url == url


# ---- 2. Safe text ----------------------------------------------------------------


@pytest.mark.parametrize("raw, shown", [
    ("hello", "hello"),
    ("\x1b[2J\x1b[31mred", "[2J[31mred"),  # ESC goes, so the rest is harmless text
    ("bell\x07 and nul\x00", "bell and nul"),
    ("del\x7f", "del"),
    ("c1\x9b31m", "c131m"),  # C1 CSI is as dangerous as ESC [
    ("\u202eevil\u202c", "evil"),  # bidi override
    ("\u2066isolate\u2069", "isolate"),
    ("tab\tnew\nline\r", "tab new line "),  # whitespace controls become spaces
    ("lone \ud800 surrogate", "lone  surrogate"),  # cannot be encoded for the terminal
    ("zero\u200bwidth\u2060 \ufeffmarks\u00ad", "zerowidth marks"),  # format characters hide text
    ("next\u0085line\u2028and\u2029more", "nextline and more"),  # NEL is a C1 control; separators space
    ("\U0001f469\u200d\U0001f4bb", "\U0001f469\u200d\U0001f4bb"),  # an emoji's zero-width joiner stays
    ("你好 🎉 café", "你好 🎉 café"),  # ordinary Unicode stays
])
def test_clean_strips_control_characters_from_server_text(raw, shown):
    """No control character, ESC, DEL or bidi override the server sends ever reaches the terminal."""
    assert client.clean(raw) == shown


@pytest.mark.parametrize("value, shown", [(None, ""), (42, "42"), (["x"], "['x']")])
def test_clean_turns_any_value_into_text(value, shown):
    """A field of the wrong type is shown as text, not a crash."""
    assert client.clean(value) == shown


@pytest.mark.parametrize("text, width", [
    ("abc", 3), ("你好", 4), ("🎉", 2), ("e\u0301", 1), ("", 0), ("a你b", 4),
])
def test_text_width_counts_terminal_columns(text, width):
    """CJK characters and emoji take two columns; combining marks none."""
    assert client.text_width(text) == width


@pytest.mark.parametrize("text, width, rows", [
    ("hello world", 20, ["hello world"]),
    ("hello world", 5, ["hello", "world"]),
    ("hello big world", 9, ["hello big", "world"]),
    ("abcdefghij", 4, ["abcd", "efgh", "ij"]),  # a word longer than a row is cut
    ("你好世界", 5, ["你好", "世界"]),  # a wide character is never split across rows
    ("", 10, [""]),
])
def test_wrap_breaks_text_into_rows_that_fit(text, width, rows):
    """Wrapping breaks at spaces where possible and never exceeds the width."""
    assert client.wrap(text, width) == rows


@given(st.text(alphabet=st.sampled_from("ab 你🎉\u0301"), max_size=60), st.integers(min_value=2, max_value=30))
def test_wrapped_rows_never_exceed_the_width(text, width):
    """Whatever the text, every wrapped row fits the width (wide characters included)."""
    assert all(client.text_width(row) <= width for row in client.wrap(text, width))


@pytest.mark.parametrize("text, width, shown", [
    ("hello", 3, "hel"), ("你好", 3, "你 "), ("ab", 4, "ab  "),
])
def test_fit_clips_or_pads_to_exactly_the_width(text, width, shown):
    """fit() gives exactly width columns, padding where a wide character would not fit."""
    assert client.fit(text, width) == shown


def test_local_time_shows_the_server_timestamp_as_local_clock_time(utc):
    """An ISO 8601 UTC timestamp becomes local HH:MM:SS."""
    assert client.local_time("2026-11-25T19:48:04.123Z") == "19:48:04"


def test_local_time_falls_back_to_now_for_a_missing_timestamp():
    """A missing or unreadable timestamp shows the time of arrival instead of failing."""
    assert len(client.local_time(None)) == len(client.local_time("yesterday")) == len("12:00:00")


def test_a_username_always_gets_the_same_colour():
    """The colour comes from crc32 of the folded name (0xF5CBB140 for bob), the same in every run and client."""
    assert client.username_colour("bob") == client.username_colour("Bob") == client.USERNAME_COLOURS[
        0xF5CBB140 % len(client.USERNAME_COLOURS)]


# ---- 3 and 4. Events into the model ------------------------------------------------


def test_welcome_and_joined_set_the_current_room_and_its_users():
    """After logging in, the current room is the lobby, with its users listed."""
    model = logged_in()
    assert model.room == "lobby" and list(model.rooms) == ["lobby"]
    assert model.rooms["lobby"].users == ["alice", "bob", "carol"]
    assert model.state == "connected" and model.limit_chars == 500


def test_a_message_in_the_current_room_goes_to_its_scrollback(utc):
    """A message event appends a line with time, username and text."""
    model = logged_in()
    apply_event(model, message("lobby", "hi"))
    assert model.rooms["lobby"].lines[-1] == Line("message", "hi", "19:48:04", "bob", "lobby")


def test_a_message_in_another_room_counts_as_unread():
    """Messages of a room that is not current are kept, and counted as unread."""
    model = logged_in(rooms=("lobby", "general"))
    apply_event(model, message("general", "one"))
    apply_event(model, message("general", "two"))
    assert model.rooms["general"].unread == 2 and model.rooms["lobby"].unread == 0
    assert [line.text for line in model.rooms["general"].lines] == ["one", "two"]


def test_switching_to_a_room_clears_its_unread_count_and_keeps_its_scrollback():
    """joined for a known room makes it current; its messages are still there."""
    model = logged_in(rooms=("lobby", "general"))
    apply_event(model, message("general", "while you were away"))
    apply_event(model, {"type": "joined", "room": "general", "users": ["bob", "carol"]})
    assert model.room == "general" and model.rooms["general"].unread == 0
    assert [line.text for line in model.rooms["general"].lines] == ["while you were away"]


def test_joining_a_new_room_adds_it_and_notes_who_else_is_there():
    """joined for a new room adds it to our rooms with a line naming the others in it."""
    model = logged_in()
    lines = apply_event(model, {"type": "joined", "room": "general", "users": ["carol", "bob"], "user_count": 2})
    assert sorted(model.rooms) == ["general", "lobby"] and model.room == "general"
    assert model.rooms["general"].users == ["bob", "carol"]
    assert lines[0].text == "Now in #general with bob." and list(model.rooms["general"].lines) == lines


@pytest.mark.parametrize("users, user_count, sentence", [
    (["carol"], 1, "Now in #general: nobody else is here yet."),
    (["Carol"], 1, "Now in #general: nobody else is here yet."),  # names ignore case
    (["alice", "carol"], 2, "Now in #general with alice."),
    ([f"u{n:02d}" for n in range(11)] + ["carol"], 12, "Now in #general with u00, u01, u02, u03, u04, "
                                                       "u05, u06, u07, u08, u09 and 1 more."),
])
def test_the_joined_line_names_the_others_never_the_reader(users, user_count, sentence):
    """carol alone in a room is told nobody else is there, not that she is there with carol."""
    model = logged_in()
    joined = {"type": "joined", "room": "general", "users": users, "user_count": user_count}
    lines = apply_event(model, joined)
    assert lines[0].text == sentence


def test_leaving_a_room_forgets_it_and_makes_room_now_current():
    """left removes the room; room_now becomes the current room."""
    model = logged_in(rooms=("lobby", "general"), room="general")
    apply_event(model, {"type": "left", "room": "general", "room_now": "lobby"})
    assert list(model.rooms) == ["lobby"] and model.room == "lobby"


def test_a_room_left_and_joined_again_gets_its_scrollback_back():
    """Leaving a room keeps its lines aside; joining it again shows them."""
    model = logged_in(rooms=("lobby", "general"))
    apply_event(model, message("general", "old news"))
    apply_event(model, {"type": "left", "room": "general", "room_now": "lobby"})
    apply_event(model, {"type": "joined", "room": "general", "users": ["carol"]})
    assert model.rooms["general"].lines[0].text == "old news"


@pytest.mark.parametrize("event, users", [
    ({"event": "join", "username": "dave"}, ["alice", "bob", "carol", "dave"]),
    ({"event": "leave", "username": "bob"}, ["alice", "carol"]),
    ({"event": "notice"}, ["alice", "bob", "carol"]),
])
def test_join_and_leave_notices_update_the_users_of_that_room(event, users):
    """system join/leave events keep the sidebar's user list current."""
    model = logged_in()
    apply_event(model, {"type": "system", "timestamp": "2026-11-25T19:48:04Z", "text": "x", "room": "lobby", **event})
    assert model.rooms["lobby"].users == users and model.rooms["lobby"].user_count == len(users)


def test_an_error_is_shown_in_the_current_room_as_its_sentence():
    """error events become visible error lines: the sentence for people, not the code for programs."""
    model = logged_in()
    apply_event(model, {"type": "error", "code": "message_too_long", "text": "Too long."})
    line = model.rooms["lobby"].lines[-1]
    assert (line.kind, line.text) == ("error", "Too long.")


def test_an_error_without_a_sentence_still_says_something():
    """A server that sends only a code gets a sentence around it."""
    model = logged_in()
    apply_event(model, {"type": "error", "code": "odd"})
    assert model.rooms["lobby"].lines[-1].text == "The server refused that (odd)."


def test_a_replayed_message_is_shown_once():
    """A missed message replayed on resume is not shown twice if it had already arrived."""
    model = logged_in()
    apply_event(model, message("lobby", "hi"))
    assert apply_event(model, message("lobby", "hi", replayed=True)) == []
    assert apply_event(model, message("lobby", "new", replayed=True))[0].text == "new"
    assert [line.text for line in model.rooms["lobby"].lines][-2:] == ["hi", "new"]


def test_the_highest_seq_seen_is_kept():
    """Every message carries the server's seq; the client keeps the highest, whatever the room."""
    model = logged_in(rooms=("lobby", "general"))
    for room, seq in (("lobby", 5), ("general", 9), ("lobby", 7)):
        apply_event(model, message(room, f"number {seq}", seq=seq))
    assert model.last_seq == 9


def test_a_replayed_message_is_shown_once_by_its_seq():
    """A replayed message whose seq was already seen is skipped, even when its text repeats an older line."""
    model = logged_in()
    apply_event(model, message("lobby", "hi", seq=8))
    assert apply_event(model, message("lobby", "hi", seq=8, replayed=True)) == []
    assert apply_event(model, message("lobby", "hi", seq=11, replayed=True))[0].text == "hi"
    assert [line.text for line in model.rooms["lobby"].lines][-2:] == ["hi", "hi"] and model.last_seq == 11


def test_a_new_session_forgets_the_seq_of_the_old_one():
    """After a fresh login (say the server restarted), the old seq means nothing; a resume keeps it."""
    model = logged_in()
    apply_event(model, message("lobby", "hi", seq=40))
    apply_event(model, {"type": "welcome", "username": "carol", "rooms": ["lobby"], "token": "t2",
                        "resumed": True})
    assert model.last_seq == 40
    apply_event(model, {"type": "welcome", "username": "carol", "rooms": ["lobby"], "token": "t3"})
    assert model.last_seq == 0


@pytest.mark.parametrize("extra, sentences", [
    ({"missed": 2}, ["Reconnected: your session is back (2 missed messages follow)."]),
    ({"missed": 1, "lost": 0}, ["Reconnected: your session is back (1 missed message follows)."]),
    ({"missed": 100, "lost": 3},
     ["Reconnected: your session is back (100 missed messages follow).",
      "3 earlier messages could not be replayed: the server no longer had them."]),
    ({"missed": 0, "lost": 1}, ["Reconnected: your session is back.",
                                "1 earlier message could not be replayed: the server no longer had it."]),
])
def test_a_resume_says_how_many_messages_follow_and_how_many_were_lost(extra, sentences):
    """welcome's missed and lost become sentences; a loss is an error line, so it cannot be overlooked."""
    model = logged_in()
    lines = apply_event(model, {"type": "welcome", "username": "carol", "rooms": ["lobby"], "token": "t",
                                "resumed": True, **extra})
    assert [line.text for line in lines] == sentences
    assert [line.kind for line in lines] == ["info", "error"][:len(sentences)]


@pytest.mark.parametrize("limits, length, idle", [
    ({"max_message_length": 140, "idle_timeout": 7200}, 140, 7200.0),
    ({"max_message_chars": 140, "idle_timeout_seconds": 600}, 0, 0.0),  # the old names are gone
])
def test_the_limits_are_read_under_their_names(limits, length, idle):
    """welcome.limits.max_message_length sets the n/limit counter, idle_timeout the idle sentence."""
    model = Model("ws://x/ws", "carol")
    apply_event(model, {"type": "welcome", "username": "carol", "rooms": ["lobby"], "token": "t",
                        "limits": limits})
    assert (model.limit_chars, model.idle_seconds) == (length, idle)


def test_control_characters_in_any_field_never_reach_the_model():
    """Usernames, room names and text are all cleaned before they are stored."""
    model = logged_in()
    apply_event(model, message("lobby", "\x1b]0;pwned\x07hi", username="b\x1bob"))
    line = model.rooms["lobby"].lines[-1]
    assert "\x1b" not in line.text + line.username and line.text == "]0;pwnedhi"


def test_a_resumed_welcome_keeps_the_scrollback_of_our_rooms():
    """After a resume, rooms and their lines are still there."""
    model = logged_in(rooms=("lobby", "general"))
    apply_event(model, message("general", "before the drop"))
    apply_event(model, {"type": "welcome", "username": "carol", "room": "lobby", "rooms": ["lobby", "general"],
                        "token": "t", "resumed": True, "missed": 0})
    assert [line.text for line in model.rooms["general"].lines] == ["before the drop"]


@pytest.mark.parametrize("event", [
    {"type": "rooms", "rooms": [{"name": "lobby", "users": 3}, {"name": "general", "users": 1}]},
    {"type": "users", "room": "lobby", "users": ["alice", "bob", "carol"]},
    {"type": "help", "commands": [{"usage": "/rooms", "description": "list rooms"}]},
])
def test_command_replies_are_shown_as_info_lines(event):
    """Replies to /rooms, /users and /help appear in the current room."""
    model = logged_in()
    lines = apply_event(model, event)
    assert lines and all(line.kind == "info" for line in lines) and model.rooms["lobby"].lines[-1] == lines[-1]


def test_a_rooms_reply_that_lists_only_the_biggest_rooms_says_how_many_more_there_are():
    """A server with many rooms lists the biggest and counts the rest in `more`."""
    lines = apply_event(logged_in(), {"type": "rooms", "rooms": [{"name": "lobby", "users": 3}], "more": 12})
    assert lines[0].text == "Rooms: #lobby (3) and 12 more"


@pytest.mark.parametrize("event", [{"type": "brand_new"}, {"no": "type"}, {"type": "message", "text": 5}])
def test_unknown_or_odd_events_do_no_harm(event):
    """An event type the client does not know, or odd field types, never crash it."""
    apply_event(logged_in(), event)


def test_a_frame_that_is_not_an_event_becomes_an_error():
    """Unreadable frames are shown as an error, not a crash."""
    assert client.parse_event("not json")["type"] == "error"
    assert client.parse_event("[1, 2]")["type"] == "error"


# ---- 5. Input line ---------------------------------------------------------------


def typed(text: str, cursor: int | None = None) -> InputLine:
    """An input line holding text, the cursor at `cursor` (default: the end)."""
    line = InputLine()
    line.set(text)
    line.cursor = len(text) if cursor is None else cursor
    return line


@pytest.mark.parametrize("edit, text, cursor", [
    (lambda line: line.insert("X"), "heXllo", 3),
    (lambda line: line.backspace(), "hllo", 1),
    (lambda line: line.delete(), "helo", 2),
    (lambda line: line.move(-5), "hello", 0),
    (lambda line: line.move(9), "hello", 5),
])
def test_editing_keys_change_the_line_at_the_cursor(edit, text, cursor):
    """Insert, Backspace, Delete and cursor moves act at the cursor and stay inside the line."""
    line = typed("hello", cursor=2)
    edit(line)
    assert (line.text, line.cursor) == (text, cursor)


def test_ctrl_w_deletes_the_word_before_the_cursor():
    """Ctrl-W removes one word (and the spaces after it)."""
    line = typed("hello big world")
    line.delete_word()
    assert line.text == "hello big "
    line.delete_word()
    assert line.text == "hello "


def test_up_and_down_browse_the_history_and_come_back_to_the_draft():
    """Up recalls sent lines, newest first; Down returns to what was being typed."""
    line = InputLine()
    for text in ("first", "second"):
        line.set(text)
        line.take()
    line.set("draft")
    line.history_back()
    assert line.text == "second"
    line.history_back()
    line.history_back()
    assert line.text == "first"
    line.history_forward()
    line.history_forward()
    assert line.text == "draft"


@pytest.mark.parametrize("edit", [
    lambda line: (line.set(""), line.insert("new words")),  # Ctrl-U, then typing
    lambda line: (line.backspace(), line.insert("new words")),
    lambda line: (line.delete_word(), line.insert("new words")),
])
def test_an_edited_history_line_becomes_the_draft(edit):
    """Up, edit, Up, Down, Down: the edited line comes back; browsing never loses what was typed."""
    line = InputLine()
    for text in ("first", "second"):
        line.set(text)
        line.take()
    line.history_back()
    edit(line)
    draft = line.text
    line.history_back()
    assert line.text == "second"
    line.history_forward()
    line.history_forward()
    assert line.text == draft and draft.endswith("new words")


def test_enter_hands_over_the_line_and_clears_it():
    """take() returns the line, clears it, and remembers it."""
    line = typed("hi there")
    assert line.take() == "hi there" and line.text == "" and line.history == ["hi there"]


HELP = {"type": "help", "commands": [{"usage": "/join <room>", "description": "join a room"},
                                    {"usage": "/topic <text>", "description": "a student's new command"}]}


@pytest.mark.parametrize("before, pool", [
    ("/jo", ["/join", "/quit", "/topic"]),
    ("/join gen", ["general", "lobby"]),
    ("/join #g", ["#general", "#lobby"]),
    ("hi b", ["alice", "bob"]),
])
def test_tab_completes_commands_then_rooms_then_usernames(before, pool):
    """The first word completes to a command, /join's argument to a room, anything else to a username."""
    model = logged_in(rooms=("lobby", "general"))
    assert client.on_help(model, HELP, quiet=True) == []  # the client's own question: nothing shown
    assert client.completion_pool(model, before) == pool


def test_before_the_servers_help_arrives_tab_completes_only_quit():
    """The commands come from the server; the client knows only its own /quit."""
    assert client.completion_pool(logged_in(), "/") == ["/quit"]


def test_repeated_tab_cycles_through_the_matches():
    """Tab puts the first match in place; another Tab the next one."""
    line = typed("hi b")
    line.complete(["alice", "bob", "bobby"])
    assert line.text == "hi bob "
    line.complete(["alice", "bob", "bobby"])
    assert line.text == "hi bobby "


# ---- 6. Connection decisions -------------------------------------------------------


def test_reconnect_delays_double_up_to_a_cap_with_jitter():
    """Backoff doubles from 0.5 s to at most 10 s; jitter takes 50-100 % of it."""
    assert [client.backoff_seconds(n, rand=lambda: 1.0) for n in (1, 2, 3, 6, 20)] == [0.5, 1, 2, 10, 10]
    assert client.backoff_seconds(3, rand=lambda: 0.0) == 1.0


@pytest.mark.parametrize("close_code, after_shutdown, retry", [
    (None, False, True), (1006, False, True), (1011, False, True), (1009, False, True), (4009, True, True),
    (1000, False, True),  # Tornado's "ping timed out" (the laptop slept): the session is held for us
    (1001, True, True), (1001, False, False),
    (4004, True, True),  # the server forgot the session: a fresh login at once
    (1002, True, False), (4001, True, False), (4002, True, False), (4003, True, False), (4005, True, False),
    (4008, True, False), (4010, True, False), (4029, True, False),
])
def test_only_a_deliberate_end_of_the_session_keeps_the_client_offline(close_code, after_shutdown, retry):
    """A close we did not ask for is retried, unless it was a refusal, the idle timeout or a takeover."""
    assert client.should_reconnect(close_code, after_shutdown) is retry


def test_the_stay_offline_set_is_the_decided_rule():
    """FINAL_CLOSE_CODES, the set chat.html shares: protocol error, refusals, idle, takeover, flooding."""
    assert client.FINAL_CLOSE_CODES == {1002, 4001, 4002, 4003, 4005, 4008, 4010, 4029}


@pytest.mark.parametrize("value, shown", [
    (1, "1 second"), (45, "45 seconds"), (600, "10 minutes"), (90, "1.5 minutes"), (3600, "1 hour"),
    (7200, "2 hours"), (5400, "1.5 hours"),
])
def test_durations_read_in_the_largest_unit(value, shown):
    """The idle sentence says "after 10 minutes", not "after 600 s"."""
    assert client.duration(value) == shown


def offline_connection(**limits) -> client.Connection:
    """carol's connection after login (with these welcome limits), on a terminal: offline waits for Enter."""
    model = logged_in(rooms=("lobby", "general"), room="general")
    apply_event(model, {"type": "welcome", "username": "carol", "rooms": ["lobby", "general"], "room": "general",
                        "token": "t", "resumed": True, "limits": limits})
    return client.Connection(client.Settings("carol", "ws://x/ws", False), model, lambda lines: None,
                             True, revivable=True)


@pytest.mark.parametrize("limits, sentence", [
    ({"idle_timeout": 7200}, "You were disconnected after 2 hours without typing."),
    ({"idle_timeout": 600}, "You were disconnected after 10 minutes without typing."),
    ({}, "Disconnected after 600 s without a message."),  # no limit in welcome: the server's own notice
])
def test_an_idle_close_says_how_long_you_were_silent(limits, sentence):
    """4008: one sentence with the idle time from welcome.limits.idle_timeout, and how to come back."""
    connection = offline_connection(**limits)
    connection.receive(json.dumps({"type": "system", "event": "idle", "text": "Disconnected after 600 s without "
                                                                              "a message."}))
    assert connection.offline_text(4008, "idle timeout") == sentence
    connection.give_up(4008, sentence)
    assert client.current_room(connection.model).lines[-1].text == (
        f"{sentence} Press Enter to reconnect, or /quit to leave.")
    assert connection.model.state == "offline" and connection.model.state_detail == "you were idle for too long"


@pytest.mark.parametrize("close_code, sentence", [
    (4010, "Disconnected: your session was taken over by a newer connection (another client of yours?)."),
    (4029, "Disconnected: you kept sending after the server asked you to slow down."),
    (4005, "Disconnected: too many connections come from your address."),
    (1002, "Disconnected: the server found a protocol error and ended the session."),
])
def test_every_deliberate_close_names_its_real_reason(close_code, sentence):
    """Kicked by a newer connection, flooding, a full address: the sentence says which."""
    assert offline_connection().offline_text(close_code, "") == sentence


@pytest.mark.parametrize("last_close, sentence", [
    (None, "The server no longer knows this session (it restarted, or the session expired): "
           "logging in afresh as carol, then rejoining #general."),
    (1001, "The server no longer knows this session (it restarted, or the session expired): "
           "logging in afresh as carol, then rejoining #general."),
    (4008, "Logging in afresh as carol, then rejoining #general."),  # no false "did it restart?"
])
def test_a_forgotten_session_blames_a_restart_only_when_the_server_ended_nothing_on_purpose(last_close, sentence):
    """After an idle close, Enter logs in afresh without claiming the server restarted."""
    connection = offline_connection()
    connection.last_close = last_close
    connection.forget_session()
    assert client.current_room(connection.model).lines[-1].text == sentence
    assert connection.token == "" and connection.rejoin == ["general"]


def test_a_normal_close_from_the_server_names_its_reason():
    """A 1000 from the server is Tornado's ping timeout: the reason is shown."""
    reason = client.describe_close(1000, "ping timed out")
    assert reason == "the server closed the connection (ping timed out)"


def test_an_os_error_reads_well_in_the_middle_of_a_sentence():
    """OS error texts start lower-case: "...: connection reset by peer."."""
    error = ConnectionResetError(104, "Connection reset by peer")
    assert client.describe_error(error) == "connection reset by peer"


@pytest.mark.parametrize("rooms, current, rejoin", [
    (["lobby", "room10", "general", "room2"], "lobby", ["general", "room2", "room10", "lobby"]),
    (["lobby", "room2", "general"], "general", ["room2", "general"]),
    (["lobby"], "lobby", []),
])
def test_after_a_fresh_login_the_previously_current_room_is_joined_last(rooms, current, rejoin):
    """The last /join makes its room current, so the user ends up where they were, even in #lobby."""
    assert client.rejoin_order(rooms, current) == rejoin


def test_the_logging_in_afresh_note_is_written_into_every_room():
    """Whichever room the user ends up looking at after a fresh login, the note is there."""
    model = logged_in(rooms=("lobby", "general"), room="general")
    connection = client.Connection(client.Settings("carol", "ws://x/ws", True), model, lambda lines: None, False)
    connection.forget_session()
    assert {name: room.lines[-1].text.startswith("The server no longer knows this session")
            for name, room in model.rooms.items()} == {"lobby": True, "general": True}


def test_rooms_sort_naturally():
    """#room2 comes before #room10 in the sidebar and for Ctrl-N/Ctrl-P."""
    names = ["room10", "lobby", "room2", "room1", "general"]
    assert sorted(names, key=client.room_order) == ["general", "lobby", "room1", "room2", "room10"]


def test_the_login_url_carries_the_username_and_the_token():
    """Resuming adds &token=; names are URL-encoded."""
    assert client.login_url("ws://h:1/ws", "carol", "") == "ws://h:1/ws?username=carol"
    assert client.login_url("ws://h:1/ws", "carol", "a+b") == "ws://h:1/ws?username=carol&token=a%2Bb"


@pytest.mark.parametrize("token, last_seq, query", [
    ("tok", 42, "username=carol&token=tok&last_seq=42"),
    ("tok", 0, "username=carol&token=tok"),  # nothing seen yet: the server replays what arrived while held
    ("", 42, "username=carol"),  # a fresh login has nothing to resume
])
def test_a_resume_says_the_last_message_seen(token, last_seq, query):
    """With a token, &last_seq=N asks the server for the messages after the last one we saw."""
    assert client.login_url("ws://h:1/ws", "carol", token, last_seq) == f"ws://h:1/ws?{query}"


def test_every_welcome_brings_the_token_for_the_next_resume():
    """Tokens work once: the token from the latest welcome is the one kept."""
    connection = client.Connection(client.Settings("carol", "ws://x/ws", True), Model("ws://x/ws", "carol"),
                                   lambda lines: None, False)
    for token in ("first", "second"):
        welcome = {"type": "welcome", "username": "carol", "rooms": ["lobby"], "token": token}
        connection.receive(json.dumps(welcome))
    assert connection.token == "second"


@pytest.mark.parametrize("close_code, sentence", [
    (1002, "the server found a protocol error and ended the session"),
    (4005, "too many connections come from your address"),
    (4029, "you kept sending after the server asked you to slow down"),
])
def test_the_newer_close_codes_are_a_sentence_and_no_reconnect_loop(close_code, sentence):
    """Flooding, a full address and a protocol error are explained; the client stays offline until Enter."""
    assert client.describe_close(close_code) == sentence
    assert client.should_reconnect(close_code, after_shutdown=True) is False


@pytest.mark.parametrize("held, retry_after, wait", [
    (True, 12.5, 13.0), (True, 0.0, 1.0), (False, 12.5, 0.0),
])
def test_a_held_name_is_tried_again_just_after_the_server_frees_it(held, retry_after, wait):
    """username_taken with held and retry_after: wait that long (and a little); other refusals: no wait."""
    refused = client.Refused("username_taken", "taken", 4002, held=held, retry_after=retry_after)
    assert client.held_wait(refused) == wait


def test_connections_that_keep_dropping_soon_after_login_wait_longer_each_time():
    """A server that accepts and drops us again and again gets growing delays, never a tight loop."""
    connection = client.Connection(client.Settings("carol", "ws://x/ws", True), Model("ws://x/ws", "carol"),
                                   lambda lines: None, False)
    connection.connected_at = 100.0
    for _ in range(4):
        connection.count_drop(now=101.0)  # each lasted a second
    # whatever the jitter, four quick drops wait at least as long as a fifth attempt would
    slowest_first = client.backoff_seconds(1, rand=lambda: 1.0)
    shortest_fifth = client.backoff_seconds(5, rand=lambda: 0.0)
    assert connection.quick_drops == 4 and connection.delay_before(1) >= shortest_fifth > slowest_first
    connection.count_drop(now=100.0 + client.STABLE_SECONDS + 1)  # this one lasted: start afresh
    assert connection.quick_drops == 0 and connection.delay_before(1) <= client.BACKOFF_FIRST_SECONDS


class FakeSocket:
    """A connected WebSocket that records what the client writes."""

    def __init__(self):
        """Nothing written yet."""
        self.written: list[str] = []

    def write_message(self, line: str) -> concurrent.futures.Future:
        """Record one line; the write succeeds at once."""
        self.written.append(line)
        done = concurrent.futures.Future()
        done.set_result(None)
        return done


@pytest.mark.gen_test
async def test_lines_typed_before_login_are_sent_in_order_after_the_joined_and_a_quiet_help():
    """Typed lines wait for the login, then go out in order, after the client's own quiet /help."""
    shown = []
    model = Model("ws://x/ws", "carol")
    connection = client.Connection(client.Settings("carol", "ws://x/ws", True), model, shown.extend, False)
    connection.send("/join x")
    connection.send("/help")
    connection.ws = FakeSocket()
    connection.receive('{"type": "welcome", "username": "carol", "room": "lobby", "rooms": ["lobby"], "token": "t"}')
    assert connection.ws.written == []
    connection.receive('{"type": "joined", "room": "lobby", "users": ["carol"]}')
    assert connection.ws.written == ["/help", "/join x", "/help"] and connection.token == "t"
    connection.receive(json.dumps(HELP))  # the answer to the client's question: nothing shown
    assert model.commands == ["/join", "/quit", "/topic"] and not any("/topic" in line.text for line in shown)
    connection.receive(json.dumps(HELP))  # the answer to the /help typed: shown
    assert [line.text for line in shown if "/topic" in line.text] == ["/topic <text>  a student's new command"]


@pytest.mark.gen_test
async def test_the_end_of_input_wait_is_one_round_trip_after_every_line_sent():
    """ask() sends a quiet /help after the queued lines; its answer means every line before it was answered."""
    connection = client.Connection(client.Settings("carol", "ws://x/ws", True), logged_in(), lambda lines: None, False)
    connection.ws, connection.logged_in = FakeSocket(), True
    connection.send("hello")
    answered = connection.ask()
    assert connection.ws.written == ["hello", "/help"] and not answered.done()
    connection.receive(json.dumps(message("lobby", "hello", username="carol")))
    assert not answered.done()
    connection.receive(json.dumps(HELP))
    assert answered.result() is True


@pytest.mark.gen_test
async def test_a_question_lost_with_the_connection_ends_the_wait():
    """The link drops before the answer: the wait ends (as the lines' echoes will never come either)."""
    connection = client.Connection(client.Settings("carol", "ws://x/ws", True), logged_in(), lambda lines: None, False)
    connection.ws, connection.logged_in = FakeSocket(), True
    answered = connection.ask()
    connection.lose_connection()
    assert answered.result() is False


@pytest.mark.parametrize("line, shown", [
    (Line("message", "hi", "12:01:02", "bob", "general"), "[12:01:02] #general <bob> hi"),
    (Line("join", "bob joined #lobby", "12:01:02", "bob", "lobby"), "[12:01:02] #lobby * bob joined #lobby"),
    (Line("system", "Goodbye!", "12:01:02"), "[12:01:02] * Goodbye!"),
    (Line("error", "Too long.", "12:01:02"), "! Too long."),
    (Line("info", "Rooms: #lobby (2)", "12:01:02"), "* Rooms: #lobby (2)"),
])
def test_plain_mode_prints_each_line_readably(line, shown):
    """Plain mode's one-line formats: messages, notices, errors, replies."""
    assert client.plain_text(line) == shown


# ---- 8. Layout -------------------------------------------------------------------


def test_the_input_window_keeps_the_cursor_visible_on_a_long_line():
    """A line wider than the screen scrolls sideways so the cursor stays in view."""
    before, under, after = client.input_window("x" * 50 + "END", 53, 10)
    assert before.endswith("END") and under == " " and client.text_width(before + under + after) <= 10


def test_scrolling_stops_at_the_oldest_line():
    """Scrolling up further than the history goes shows the oldest rows, no further."""
    room = Room("lobby")
    room.lines.extend(Line("message", f"line {n}", "12:00:00", "bob") for n in range(30))
    room.scroll_rows = 1000
    rows, scroll = client.visible_rows(room, client.Layout(100, 13))
    assert scroll == 20 and rows[0].text == "line 0" and len(rows) == 10


def scrollback(count: int) -> Room:
    """A room with `count` one-row messages: line 0 ... line count-1."""
    room = Room("lobby")
    room.lines.extend(Line("message", f"line {n}", "12:00:00", "bob", "lobby") for n in range(count))
    return room


def test_a_scrolled_up_view_stays_put_while_new_lines_arrive_below():
    """Scrolled up, new lines do not move the view; they are counted for the "new messages below" marker."""
    model, layout = logged_in(), client.Layout(100, 13)
    model.rooms["lobby"] = room = scrollback(50)
    client.scroll_view(room, 15, layout.text)
    before, _ = client.visible_rows(room, layout)
    for n in range(3):
        client.add_line(model, Line("message", f"new {n}", "12:00:01", "bob", "lobby"))
    client.add_line(model, Line("join", "dave joined #lobby", "12:00:01", "dave", "lobby"))
    after, _ = client.visible_rows(room, layout)
    assert [row.text for row in after] == [row.text for row in before] and room.new_below == 3
    term = blessed.Terminal(kind="xterm-256color", stream=io.StringIO(), force_styling=True)
    marker = client.status_bar(term, model, layout, 15)
    assert "scrolled up: 3 new messages below · PgDn goes back down" in marker


def test_scrolling_down_past_the_new_lines_follows_the_newest_again():
    """PgDn brings the lines below back one by one; at the bottom the view follows new lines again."""
    model, layout = logged_in(), client.Layout(100, 13)
    model.rooms["lobby"] = room = scrollback(50)
    client.scroll_view(room, 15, layout.text)
    client.add_line(model, Line("message", "new", "12:00:01", "bob", "lobby"))
    client.scroll_view(room, -10, layout.text)
    assert room.lines_below == 1 and room.scroll_rows == 5  # still up: "new" is below the view
    client.scroll_view(room, -10, layout.text)
    assert (room.scroll_rows, room.lines_below, room.new_below) == (0, 0, 0)
    client.add_line(model, Line("message", "newer", "12:00:02", "bob", "lobby"))
    assert client.visible_rows(room, layout)[0][-1].text == "newer"


def test_a_frame_after_a_new_message_writes_only_the_rows_that_changed():
    """One new line rewrites the message rows it moved, never the header, the sidebar or the status bar."""
    term = blessed.Terminal(kind="xterm-256color", stream=io.StringIO(), force_styling=True)
    model = logged_in()
    layout = client.Layout(100, 24)
    first = client.draw_screen(term, model, layout)
    apply_event(model, message("lobby", "just arrived"))
    second = client.draw_screen(term, model, layout)
    output = client.frame_output(term, first, second)
    assert "just arrived" in output and "Rooms" not in output and "Enter sends" not in output
    assert term.clear not in output and client.frame_output(term, second, second) == ""


def test_the_first_frame_clears_the_screen_and_paints_everything():
    """With nothing known about the screen (start, resize, Ctrl-L), the whole frame is written."""
    term = blessed.Terminal(kind="xterm-256color", stream=io.StringIO(), force_styling=True)
    frame = client.draw_screen(term, logged_in(), client.Layout(100, 24))
    output = client.frame_output(term, None, frame)
    assert output.startswith(term.clear) and all(piece in output for piece in frame.pieces.values())


def test_every_frame_leaves_the_cursor_where_the_user_types():
    """The terminal's cursor ends on the input line, after the prompt and the text before the cursor."""
    term = blessed.Terminal(kind="xterm-256color", stream=io.StringIO(), force_styling=True)
    model = logged_in()
    model.input.set("hello world")
    model.input.move(-6)
    frame = client.draw_screen(term, model, client.Layout(100, 24))
    assert frame.cursor == (23, len("#lobby › hello"))
    assert client.frame_output(term, None, frame).endswith(term.move_yx(23, len("#lobby › hello")))


def test_the_sidebar_folds_away_below_100_columns_and_f2_brings_it_back():
    """Below 100 columns the message area takes the whole width; asked for, a narrower sidebar shows."""
    assert client.Layout(99, 20).sidebar == 0 and client.Layout(100, 20).sidebar == client.SIDEBAR_COLUMNS
    assert client.Layout(80, 24, wants_sidebar=True).sidebar == client.NARROW_SIDEBAR_COLUMNS
    assert client.Layout(120, 24, wants_sidebar=False).sidebar == 0
    assert client.Layout(30, 24, wants_sidebar=True).sidebar == 0  # too narrow for both


@pytest.mark.parametrize("columns, text", [(80, 55), (100, 53), (60, 39)])
def test_the_message_column_keeps_its_width_on_an_80_column_terminal(columns, text):
    """At 80x24 a message gets 55 columns or more (37 before the sidebar folded away)."""
    assert client.Layout(columns, 24).text == text


@pytest.mark.parametrize("columns", [40, 60, 80, 100, 160])
@pytest.mark.parametrize("sidebar", [None, True])
def test_the_status_bar_fits_its_width_with_whole_hints(columns, sidebar):
    """Whatever the width, the status bar leaves hints out whole, most useful kept: never "/quit l"."""
    term = blessed.Terminal(force_styling=None)
    layout = client.Layout(columns, 24, sidebar)
    text = client.status_bar(term, logged_in(), layout, 0)
    hints = [hint.strip() for hint in text.split(" · ")]
    assert client.text_width(text) == columns and "/quit leaves" in text
    assert set(hints) <= {hint for _, hint in client.HINTS}
    assert ("F2 rooms & users" in hints) is (columns >= 60 and not layout.sidebar)


def test_without_the_sidebar_the_header_says_how_many_are_here():
    """The users are still a glance away: the header counts them; F2 lists them."""
    term = blessed.Terminal(force_styling=None)
    assert client.header(term, logged_in(), client.Layout(80, 24)).startswith(" #lobby · carol · 3 users here · ws:")
    assert client.header(term, logged_in(), client.Layout(100, 24)).startswith(" #lobby · carol · ws:")


def test_the_scrolled_up_marker_and_the_unread_rooms_fit_a_narrow_status_bar():
    """Narrow, the parts that do not fit are left out whole."""
    term = blessed.Terminal(force_styling=None)
    model = logged_in(rooms=("lobby", "general", "random"))
    for room in ("general", "random"):
        apply_event(model, message(room, "hi"))
    assert client.status_bar(term, model, client.Layout(28, 24), 0).rstrip() == " unread: #general 1"
    room = client.current_room(model)
    room.scroll_rows, room.lines_below, room.new_below = 3, 2, 2
    wide = client.status_bar(term, model, client.Layout(100, 24), 3)
    assert wide.rstrip() == " -- scrolled up: 2 new messages below · PgDn goes back down --"
    assert client.status_bar(term, model, client.Layout(40, 24), 3).rstrip() == " -- scrolled up: PgDn goes back down --"


@pytest.mark.parametrize("kind", ["xterm", "linux", "screen"])
def test_drawing_sends_only_colours_an_8_colour_terminal_has(kind):
    """On an 8-colour terminal, grey and bright colours fall back instead of becoming broken sequences."""
    term = blessed.Terminal(kind=kind, stream=io.StringIO(), force_styling=True)
    model = logged_in()
    for username in ("alice", "bob", "carol", "dave", "erin", "frank"):
        apply_event(model, message("lobby", "hi", username=username))
    screen = "".join(client.draw_screen(term, model, client.Layout(100, 24)).pieces.values())
    assert "\x1b[38m" not in screen and not re.search(r"\x1b\[3\d\dm", screen)


@pytest.mark.parametrize("limits, first_waits", [
    ({"rate_per_second": 5, "rate_burst": 10}, [0.0] * 8),  # a burst of 8: two under the server's 10
    ({"rate_per_second": 0, "rate_burst": 10}, None),  # 0: the server has no limit, so no pacing
    ({}, None),  # an older server says nothing: no pacing
])
def test_the_pacer_keeps_under_the_servers_rate_limit(limits, first_waits):
    """Lines go out at once up to a smaller burst, then at 90% of the server's rate."""
    pacer = client.Pacer.from_limits(limits)
    if first_waits is None:
        assert pacer is None
        return
    pacer.tokens = pacer.burst  # after a quiet while
    assert [pacer.wait(0.0) for _ in first_waits] == first_waits
    assert pacer.wait(0.0) == pytest.approx(1 / (0.9 * limits["rate_per_second"]))


# ---- The same protocol as chat.py ---------------------------------------------------
# client.py does not import chat.py (a student may copy the client alone), so these
# tests are what keeps the two speaking the same protocol.


def test_the_client_knows_every_close_code_the_server_sends_by_the_same_name():
    """Each chat.CLOSE_* has a client constant of the same name and number, and a sentence for people."""
    codes = {name: value for name, value in vars(chat).items() if name.startswith("CLOSE_")}
    assert codes
    for name, value in codes.items():
        assert getattr(client, name, None) == value, name
        assert value in client.CLOSE_REASONS, name


def test_tab_completes_exactly_the_servers_commands_and_the_clients_own_quit():
    """From chat.py's /help reply, the client learns chat.py's COMMANDS, each with a slash, plus /quit."""
    model = logged_in()
    client.on_help(model, chat.help_event(), quiet=True)
    assert set(model.commands) == {f"/{name}" for name in chat.COMMANDS} | {"/quit"}


def test_the_lobby_and_the_default_port_are_the_servers():
    """Both programs agree where everyone starts and where to connect by default."""
    assert (client.LOBBY, client.DEFAULT_PORT) == (chat.LOBBY, chat.DEFAULT_PORT)


def test_the_limits_the_client_reads_from_welcome_are_limits_the_server_has():
    """The length counter, the idle sentence and the pacer read welcome.limits under chat.CrowdLimits' names."""
    fields = {field.name for field in dataclasses.fields(chat.CrowdLimits)}
    assert {"max_message_length", "idle_timeout", "rate_per_second", "rate_burst"} <= fields


def test_every_character_the_server_cleans_the_client_cleans_too():
    """Whatever chat.clean_text removes or replaces, client.clean never lets through either."""
    leaks = [hex(code) for code in range(0x110000)
             if chat.clean_text(chr(code)) != chr(code) and chr(code) in client.clean(chr(code))]
    assert leaks == []


@pytest.fixture
def topic_command(monkeypatch):
    """chat.py's command table with one more command, as a student's exercise adds one."""
    monkeypatch.setitem(chat.COMMANDS, "topic", chat.Command("/topic <text>", "set the room's topic",
                                                             lambda manager, user, argument: None))


@pytest.mark.gen_test
async def test_tab_completes_a_command_the_student_added_to_the_servers_table(topic_command, chat_server):
    """The client asks the real server for /help after logging in, quietly: /topic completes, nothing is shown."""
    from conftest import wait_until

    model, shown = Model("ws://x/ws", "carol"), []
    url = f"ws://127.0.0.1:{chat_server.port}/ws"
    connection = client.Connection(client.Settings("carol", url, True), model, shown.extend, False)
    await connection.connect(first=True)
    connection.start()
    await wait_until(lambda: "/topic" in model.commands, "the server's commands learnt")
    line = typed("/to")
    line.complete(client.completion_pool(model, line.text))
    assert line.text == "/topic "
    assert not any("topic" in line.text for line in shown)
    await connection.close()
