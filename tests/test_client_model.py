"""client.py without a terminal or a network: safe text, layout helpers, the model, the input line.

In the order of client.py's sections: text first, then events folded into the
model, then the input line, then the connection's pure decisions, then layout.
"""

from __future__ import annotations

import concurrent.futures
import io
import re
import time

import blessed
import pytest
from hypothesis import given
from hypothesis import strategies as st

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
                        "token": "t" * 32, "limits": {"max_message_chars": 500}})
    apply_event(model, {"type": "joined", "room": room, "users": ["alice", "bob", username], "user_count": 3})
    return model


def message(room: str, text: str, username: str = "bob", **extra) -> dict:
    """A message event, as the server sends it."""
    return {"type": "message", "timestamp": "2026-11-25T19:48:04.123Z", "username": username,
            "room": room, "text": text, **extra}


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
    lines = apply_event(model, {"type": "joined", "room": "general", "users": users, "user_count": user_count})
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


def test_enter_hands_over_the_line_and_clears_it():
    """take() returns the line, clears it, and remembers it."""
    line = typed("hi there")
    assert line.take() == "hi there" and line.text == "" and line.history == ["hi there"]


@pytest.mark.parametrize("before, pool", [
    ("/jo", list(client.COMMANDS)),
    ("/join gen", ["general", "lobby"]),
    ("/join #g", ["#general", "#lobby"]),
    ("hi b", ["alice", "bob"]),
])
def test_tab_completes_commands_then_rooms_then_usernames(before, pool):
    """The first word completes to a command, /join's argument to a room, anything else to a username."""
    model = logged_in(rooms=("lobby", "general"))
    assert client.completion_pool(model, before) == pool


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
    (4001, True, False), (4002, True, False), (4003, True, False), (4004, True, False),
    (4008, True, False), (4010, True, False),
])
def test_only_a_deliberate_end_of_the_session_keeps_the_client_offline(close_code, after_shutdown, retry):
    """A close we did not ask for is retried, unless it was a refusal, the idle timeout or a takeover."""
    assert client.should_reconnect(close_code, after_shutdown) is retry


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


@pytest.mark.parametrize("event, reply", [
    (message("lobby", "hi", username="Carol"), True),
    (message("lobby", "hi", username="carol", replayed=True), False),
    (message("lobby", "hi", username="bob"), False),
    ({"type": "joined"}, True), ({"type": "error"}, True), ({"type": "rooms"}, True),
    ({"type": "left"}, False), ({"type": "system"}, False),
])
def test_a_reply_is_our_own_echo_or_a_command_answer(event, reply):
    """Plain mode waits for these before it closes at the end of input."""
    assert client.is_reply(event, "carol") is reply


def test_the_login_url_carries_the_username_and_the_token():
    """Resuming adds &token=; names are URL-encoded."""
    assert client.login_url("ws://h:1/ws", "carol", "") == "ws://h:1/ws?username=carol"
    assert client.login_url("ws://h:1/ws", "carol", "a+b") == "ws://h:1/ws?username=carol&token=a%2Bb"


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


def test_lines_typed_before_login_are_sent_in_order_after_the_joined():
    """Typed lines wait for the login, then go out in order; settled once each got its reply."""
    model = Model("ws://x/ws", "carol")
    connection = client.Connection(client.Settings("carol", "ws://x/ws", True), model, lambda lines: None, False)
    connection.send("/join x")
    connection.send("hello")
    connection.ws = FakeSocket()
    connection.receive('{"type": "welcome", "username": "carol", "room": "lobby", "rooms": ["lobby"], "token": "t"}')
    assert connection.ws.written == [] and not connection.settled.is_set()
    connection.receive('{"type": "joined", "room": "lobby", "users": ["carol"]}')
    assert connection.ws.written == ["/join x", "hello"]
    connection.receive('{"type": "joined", "room": "x", "users": ["carol"]}')
    connection.receive('{"type": "message", "username": "carol", "room": "x", "text": "hello"}')
    assert connection.settled.is_set() and connection.token == "t"


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


def test_the_sidebar_hides_on_a_narrow_terminal():
    """Below 60 columns, the message area takes the whole width."""
    assert client.Layout(59, 20).sidebar == 0 and client.Layout(60, 20).sidebar == client.SIDEBAR_COLUMNS


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
