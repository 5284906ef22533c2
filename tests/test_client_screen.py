"""The split view in a real pseudo-terminal: what carol and bob see on their screens.

Each client runs `python client.py NAME` in its own pseudo-terminal against the real
server in its own process; a terminal emulator (pyte) turns the output into the
screen a person would see, and the tests read it like a person would.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest
from conftest import free_port
from screen import (CAROL_EVENTS, HOSTILE_EVENTS, NO_PTY, PlainClient, Screen, ScriptedServer, display_width,
                    held_refusal, start_server, stop_server, wait_for)

import client

termios = pytest.importorskip("termios", reason=NO_PTY)  # every test here runs the client in a pseudo-terminal

ROWS, COLS = 24, 100
PAGE_UP, PAGE_DOWN, UP, DOWN = "\x1b[5~", "\x1b[6~", "\x1b[A", "\x1b[B"
TAB, CTRL_C, CTRL_Z, F2 = "\t", "\x03", "\x1a", "\x1bOQ"


@pytest.fixture
def screens():
    """Start split-view clients; every one is stopped at the end of the test."""
    started = []

    def start(username: str, port: int, rows: int = ROWS, cols: int = COLS) -> Screen:
        """Start one client and wait until it is connected."""
        screen = Screen(username, f"--port={port}", rows=rows, cols=cols)
        started.append(screen)
        screen.wait_for_text("connected")
        return screen

    yield start
    for screen in started:
        screen.close()


@pytest.fixture
def port(chat_process) -> int:
    """A chat server (no rate limit, so tests may type fast); its port."""
    return chat_process("--rate-per-second=0")[1]


@pytest.fixture
def carol_and_bob(screens, port) -> tuple[Screen, Screen]:
    """carol and bob, both in the lobby, each in a terminal of their own."""
    carol = screens("carol", port)
    bob = screens("bob", port)
    carol.wait_for_text("bob joined #lobby")
    return carol, bob


def sidebar(screen: Screen) -> list[str]:
    """The sidebar's rows, as text."""
    return [row[-client.SIDEBAR_COLUMNS:].strip("│ ") for row in screen.lines()[1:-2]]


def test_the_header_shows_the_room_the_username_the_server_and_the_state(screens, port):
    """The top row names the current room, you, the server, and that you are connected."""
    carol = screens("carol", port)
    header = carol.header()
    assert header.startswith(f" #lobby · carol · ws://localhost:{port}/ws") and header.rstrip().endswith("connected")


def test_a_message_typed_by_one_user_appears_in_the_others_message_area(carol_and_bob):
    """bob types a line and presses Enter; carol sees it with the time and bob's name."""
    carol, bob = carol_and_bob
    bob.send("hello carol")
    carol.wait_for_text("bob │ hello carol")
    bob.wait_for_text("bob │ hello carol")  # the sender sees the echo too


def test_the_sidebar_lists_the_rooms_and_both_users(carol_and_bob):
    """The sidebar shows your rooms and the users of the current room."""
    carol, _ = carol_and_bob
    wait_for(lambda: sidebar(carol)[:6] == ["Rooms", "#lobby", "", "Users (2)", "bob", "carol"],
             what=lambda: carol.text())


def test_join_switches_the_header_to_the_new_room(carol_and_bob):
    """After /join general, the header and the prompt name #general."""
    carol, _ = carol_and_bob
    carol.send("/join general")
    wait_for(lambda: carol.header().startswith(" #general · carol") and carol.input_line().startswith("#general ›")
             and carol.shows("Now in #general: nobody else is here yet."), what=lambda: carol.text())


def test_messages_in_another_room_are_counted_as_unread_and_kept(carol_and_bob):
    """bob talks in #general while carol looks at the lobby: the sidebar counts 2; switching shows them."""
    carol, bob = carol_and_bob
    bob.send("/join general")
    wait_for(lambda: bob.header().startswith(" #general"))
    carol.send("/join general")
    carol.wait_for_text("Now in #general with bob.")
    carol.send("/join lobby")
    wait_for(lambda: carol.header().startswith(" #lobby"))
    bob.send("first in general")
    bob.send("second in general")
    wait_for(lambda: "#general           2" in sidebar(carol), what=lambda: carol.text())
    carol.send("/join general")
    wait_for(lambda: carol.shows("first in general") and carol.shows("second in general")
             and "#general" in sidebar(carol), what=lambda: carol.text())


def test_a_resize_redraws_the_screen_for_the_new_size(carol_and_bob):
    """Shrinking the terminal redraws it: header on top, input at the bottom, no sidebar when narrow."""
    carol, bob = carol_and_bob
    bob.send("a message long enough to wrap when the terminal gets narrow, as it will in a moment")
    carol.wait_for_text("a message long enough")
    carol.resize(12, 50)
    wait_for(lambda: carol.header().startswith(" #lobby · carol") and carol.lines()[-1].startswith("#lobby ›")
             and "Rooms" not in carol.text() and carol.shows("moment"), what=lambda: carol.text())
    assert all(display_width(row) <= 50 for row in carol.lines())
    carol.resize(ROWS, COLS)
    wait_for(lambda: "Rooms" in sidebar(carol), what=lambda: carol.text())


def test_wide_characters_do_not_break_the_layout(carol_and_bob):
    """CJK and emoji take two columns each: rows still end at the sidebar's border."""
    carol, bob = carol_and_bob
    bob.send("你好世界🎉 " * 12)
    carol.wait_for_text("你好世界🎉")
    border = COLS - client.SIDEBAR_COLUMNS
    for row in carol.lines()[1:-2]:
        assert display_width(row[:row.rindex("│")]) == border, row


def test_server_errors_show_in_the_message_area_in_red(carol_and_bob):
    """/leave in your only room is refused; the server's sentence is visible (not its code), and red."""
    carol, _ = carol_and_bob
    carol.send("/leave")
    carol.wait_for_text("!! │ You cannot leave #lobby")
    assert not carol.shows("last_room")
    row = next(y for y, line in enumerate(carol.lines()) if "cannot leave" in line)
    x = carol.lines()[row].index("You cannot")
    assert carol.screen.buffer[row][x].fg == "red"


def test_a_length_counter_appears_near_the_limit(screens, chat_process):
    """Near welcome.limits.max_message_chars, the input line shows n/limit."""
    _, port = chat_process("--max-message-length=20")
    carol = screens("carol", port)
    carol.type("x" * 15)
    wait_for(lambda: "x" * 15 in carol.input_line())
    assert "/20" not in carol.input_line()
    carol.type("x" * 2)
    wait_for(lambda: carol.input_line().rstrip().endswith("17/20"), what=lambda: carol.input_line())


def test_tab_completes_commands_and_up_recalls_the_last_line(carol_and_bob):
    """Tab turns /jo into /join; Up brings back what was sent."""
    carol, _ = carol_and_bob
    carol.type("/jo" + TAB)
    wait_for(lambda: carol.input_line().startswith("#lobby › /join "), what=lambda: carol.input_line())
    carol.send("general")
    wait_for(lambda: carol.header().startswith(" #general"))
    carol.type(UP)
    wait_for(lambda: carol.input_line().startswith("#general › /join general"), what=lambda: carol.input_line())


def test_ctrl_keys_edit_the_line_and_ctrl_d_on_an_empty_line_leaves(screens, port):
    """Ctrl-W deletes a word, Ctrl-A goes home, Ctrl-U clears the line; Ctrl-D on an empty line quits."""
    carol = screens("carol", port)
    carol.type("one two three" + client.ctrl("w"))
    wait_for(lambda: carol.input_line().rstrip() == "#lobby › one two", what=lambda: carol.input_line())
    carol.type(client.ctrl("a") + ">")
    wait_for(lambda: carol.input_line().rstrip() == "#lobby › >one two", what=lambda: carol.input_line())
    carol.type(client.ctrl("u"))
    wait_for(lambda: carol.input_line().rstrip() == "#lobby ›", what=lambda: carol.input_line())
    carol.type(client.ctrl("d"))
    assert carol.wait_exit() == 0


def test_page_up_scrolls_back_through_the_room(carol_and_bob):
    """PgUp shows older lines and says so in the status bar."""
    carol, bob = carol_and_bob
    for number in range(40):
        bob.send(f"line {number}")
    carol.wait_for_text("line 39")
    assert not carol.shows("line 5 ")
    carol.type(PAGE_UP)
    carol.wait_for_text("scrolled up")
    assert carol.shows("line 5 ") and not carol.shows("line 39")


def test_scrolled_up_the_view_stays_still_and_says_how_many_new_messages_wait_below(carol_and_bob):
    """carol reads back with PgUp: bob's new lines leave her view still, a marker counts them."""
    carol, bob = carol_and_bob
    for number in range(40):
        bob.send(f"line {number}")
    carol.wait_for_text("line 39")
    carol.type(PAGE_UP)
    carol.wait_for_text("scrolled up")
    view = carol.lines()[1:-2]
    bob.send("fresh one")
    bob.send("fresh two")
    carol.wait_for_text("scrolled up: 2 new messages below · PgDn goes back down")
    assert carol.lines()[1:-2] == view
    carol.type(PAGE_DOWN + PAGE_DOWN)
    wait_for(lambda: carol.shows("bob │ fresh two") and not carol.shows("scrolled up"),
             what=lambda: carol.text())


def input_text(screen: Screen) -> str:
    """What the input line holds, after the prompt."""
    return screen.input_line().partition("› ")[2].rstrip()


def test_browsing_the_history_keeps_a_line_typed_meanwhile(screens, port):
    """Up, Ctrl-U, type, Up, Down, Down: what was typed is back in the input line, not lost."""
    carol = screens("carol", port)
    for line in ("first", "second"):
        carol.send(line)
        carol.wait_for_text(f"carol │ {line}")
    carol.type(UP)
    wait_for(lambda: input_text(carol) == "second", what=lambda: carol.input_line())
    carol.type(client.ctrl("u") + "my draft")
    wait_for(lambda: input_text(carol) == "my draft", what=lambda: carol.input_line())
    carol.type(UP)
    wait_for(lambda: input_text(carol) == "second", what=lambda: carol.input_line())
    carol.type(DOWN + DOWN)
    wait_for(lambda: input_text(carol) == "my draft", what=lambda: carol.input_line())


def test_a_relaunch_while_your_old_session_is_held_waits_for_the_name_and_gets_in():
    """The server still holds carol's name for the session her crashed client left: she is told it is
    probably hers, the client waits for the name to be free, and logs in by itself."""
    server = ScriptedServer(CAROL_EVENTS, refusals=[held_refusal(retry_after=1.0)])
    carol = Screen("carol", f"--port={server.port}", rows=ROWS, cols=COLS)
    try:
        wait_for(lambda: b"held for a session that dropped a moment ago, probably yours" in carol.raw,
                 what=lambda: carol.raw.decode(errors="replace"))
        wait_for(lambda: carol.header().rstrip().endswith("connected"), what=lambda: carol.text())
        assert [login["username"] for login in server.logins] == ["carol", "carol"]
    finally:
        carol.close()
        server.stop()


def test_a_relaunch_right_after_a_crash_waits_for_the_name_the_server_holds(screens, chat_process):
    """carol's client is killed; started again within the resume grace it says the name is probably
    held for her, waits for it, and opens the chat."""
    _, port = chat_process("--resume-grace=2")
    crashed = screens("carol", port)
    os.kill(crashed.proc.pid, signal.SIGKILL)  # no goodbye: the server holds the session for resume
    wait_for(lambda: sessions_held(port) == 1, timeout=10)
    carol = Screen("carol", f"--port={port}", rows=ROWS, cols=COLS)
    try:
        wait_for(lambda: b"probably yours" in carol.raw, what=lambda: carol.raw.decode(errors="replace"))
        wait_for(lambda: carol.header().rstrip().endswith("connected"), timeout=10, what=lambda: carol.text())
    finally:
        carol.close()


def terminal_is_restored(screen: Screen) -> bool:
    """Alternate screen left, cursor shown again, echo and line editing back on."""
    modes = screen.terminal_modes()[3]
    left_fullscreen = screen.raw.rfind(b"\x1b[?1049l") > screen.raw.rfind(b"\x1b[?1049h")
    return left_fullscreen and not screen.cursor_hidden() and bool(modes & termios.ECHO and modes & termios.ICANON)


def test_quit_exits_and_restores_the_terminal(screens, port):
    """/quit: exit code 0, the terminal as it was before."""
    carol = screens("carol", port)
    carol.send("/quit")
    assert carol.wait_exit() == 0 and terminal_is_restored(carol)


def test_ctrl_c_exits_and_restores_the_terminal(screens, port):
    """Ctrl-C leaves just as cleanly."""
    carol = screens("carol", port)
    carol.type(CTRL_C)
    assert carol.wait_exit() == 0 and terminal_is_restored(carol)


def test_after_a_server_restart_the_client_logs_in_afresh_and_rejoins_its_rooms(screens):
    """The server dies and comes back: the header says reconnecting, then carol is back in #general."""
    port = free_port()
    server = start_server(port)
    try:
        carol = screens("carol", port, cols=200)  # wide enough for the notice on one row
        carol.send("/join general")
        wait_for(lambda: carol.header().startswith(" #general"))
        stop_server(server)
        wait_for(lambda: "reconnecting" in carol.header(), what=lambda: carol.text())
        server = start_server(port)
        carol.wait_for_text("logging in afresh as carol, then rejoining #general", timeout=15)
        wait_for(lambda: carol.header().startswith(" #general") and "connected" in carol.header(),
                 what=lambda: carol.text())
    finally:
        stop_server(server)


def test_after_a_server_restart_the_client_ends_in_the_room_that_was_current_even_the_lobby(screens):
    """carol was in #general but looking at #lobby: after the fresh login she is in both, in #lobby."""
    port = free_port()
    server = start_server(port)
    try:
        carol = screens("carol", port, cols=200)
        carol.send("/join general")
        wait_for(lambda: carol.header().startswith(" #general"))
        carol.send("/join lobby")
        wait_for(lambda: carol.header().startswith(" #lobby"))
        stop_server(server)
        wait_for(lambda: "reconnecting" in carol.header(), what=lambda: carol.text())
        server = start_server(port)
        carol.wait_for_text("logging in afresh as carol, then rejoining #general,", timeout=15)
        wait_for(lambda: carol.header().startswith(" #lobby") and "connected" in carol.header()
                 and "#general" in sidebar(carol), what=lambda: carol.text())
    finally:
        stop_server(server)


def test_a_server_shutdown_is_noted_and_the_client_keeps_trying(screens):
    """A graceful shutdown (1001) shows the server's goodbye, and the split view tries to reconnect."""
    port = free_port()
    server = start_server(port)
    try:
        carol = screens("carol", port)
        server.send_signal(signal.SIGTERM)
        carol.wait_for_text("The server is shutting down")
        carol.wait_for_text("!! │ Disconnected: the server is shutting down.")
        wait_for(lambda: "reconnecting" in carol.header(), what=lambda: carol.text())
    finally:
        stop_server(server)


def process_state(pid: int) -> str:
    """The process's state letter from /proc: R running, S sleeping, T stopped."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


def test_ctrl_z_gives_the_terminal_back_and_continuing_redraws(screens, port):
    """Ctrl-Z restores the terminal before the client stops; `fg` (SIGCONT) brings the screen back."""
    carol = screens("carol", port)
    carol.type("half a line")
    wait_for(lambda: "half a line" in carol.input_line())
    carol.type(CTRL_Z)
    wait_for(lambda: process_state(carol.proc.pid) == "T", what=lambda: process_state(carol.proc.pid))
    wait_for(lambda: terminal_is_restored(carol))  # the reader thread may still be catching up
    os.kill(carol.proc.pid, signal.SIGCONT)  # what the shell's `fg` does
    wait_for(lambda: carol.raw.rfind(b"\x1b[?1049h") > carol.raw.rfind(b"\x1b[?1049l"))
    carol.type(" and the rest\r")
    carol.wait_for_text("carol │ half a line and the rest")


def test_an_idle_timeout_goes_offline_with_one_line_that_says_how_to_come_back(screens, chat_process):
    """Closed for idling (4008): the header says offline, one line says why and what to do; /quit works."""
    _, port = chat_process("--idle-timeout=1")
    carol = screens("carol", port, cols=160)
    wait_for(lambda: "offline: you were idle for too long" in carol.header(), what=lambda: carol.text())
    carol.wait_for_text("You were disconnected after 1 second without typing. "
                        "Press Enter to reconnect, or /quit to leave.")
    assert carol.text().lower().count("disconnected") == 1
    carol.send("/quit")
    assert carol.wait_exit() == 0


def test_a_line_typed_after_an_idle_timeout_connects_again_and_is_sent(screens, chat_process):
    """Offline is no dead end: Enter logs in again (afresh, as the session is gone) and the line goes out,
    with no false "did the server restart?" on the way (issue 19, item 1)."""
    _, port = chat_process("--idle-timeout=2")
    carol = screens("carol", port, cols=160)
    wait_for(lambda: "offline" in carol.header(), what=lambda: carol.text())
    carol.send("back again")
    carol.wait_for_text("carol │ back again")
    assert not carol.shows("no longer knows") and not carol.shows("restart")


def test_a_ping_timeout_is_not_a_goodbye_and_the_session_resumes(screens, chat_process):
    """Stopped past the server's ping timeout (a close with 1000), the client resumes its session."""
    _, port = chat_process("--ping-interval=1")
    carol = screens("carol", port, cols=160)
    os.kill(carol.proc.pid, signal.SIGSTOP)  # as if the laptop slept
    try:
        wait_for(lambda: sessions_held(port) == 1, timeout=15)
    finally:
        os.kill(carol.proc.pid, signal.SIGCONT)
    carol.wait_for_text("Disconnected: the server closed the connection (ping timed out). Reconnecting...")
    carol.wait_for_text("Reconnected: your session is back.")
    wait_for(lambda: carol.header().rstrip().endswith("connected"), what=lambda: carol.text())


def sessions_held(port: int) -> int:
    """How many sessions the server holds for resume, from GET /status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        return json.load(response)["sessions_held"]


def test_a_line_over_the_length_limit_stays_in_the_input_line_with_a_red_note(screens, chat_process):
    """Enter on a line longer than the limit sends nothing: a red note says so and the text stays to edit."""
    _, port = chat_process("--max-message-length=20")
    carol = screens("carol", port, cols=160)
    carol.send("x" * 25)
    carol.wait_for_text("Your line has 25 characters; the limit is 20. Shorten it and press Enter again.")
    assert "x" * 25 in carol.input_line() and not carol.shows("carol │ xxx")
    row = next(y for y, line in enumerate(carol.lines()) if "Your line has" in line)
    assert carol.screen.buffer[row][carol.lines()[row].index("Your line")].fg == "red"


def test_enter_on_a_line_of_only_spaces_clears_it(screens, port):
    """Nothing is sent, and the spaces are gone."""
    carol = screens("carol", port)
    prompt = len("#lobby › ")
    carol.type("   ")
    wait_for(lambda: cursor_column(carol) == prompt + 3, what=lambda: carol.input_line())
    carol.type("\r")
    wait_for(lambda: cursor_column(carol) == prompt, what=lambda: carol.input_line())
    assert not carol.shows("carol │")


def cursor_column(screen: Screen) -> int | None:
    """Where the input line's cursor is drawn (a reverse-video cell), if anywhere."""
    with screen.lock:
        row = screen.screen.buffer[screen.screen.lines - 1]
        return next((x for x in range(screen.screen.columns) if row[x].reverse), None)


def test_control_characters_from_the_server_never_reach_the_terminal(screens):
    """A hostile server's escape sequences, BEL, C1 and bidi controls are shown as harmless text."""
    hostile = ScriptedServer(HOSTILE_EVENTS)
    try:
        carol = screens("carol", hostile.port)
        carol.wait_for_text("hi [2J]0;PWNED31mevil")
        carol.send("/quit")
        assert carol.wait_exit() == 0
    finally:
        hostile.stop()
    assert b"\x1b]" not in carol.raw and b"\x07" not in carol.raw  # no OSC (window title), no BEL
    assert "\u202e".encode() not in carol.raw and "\x9b".encode() not in carol.raw


# ---- leaving when the terminal window closes (SIGHUP) ---------------------------------


@pytest.fixture
def bob_listening(chat_process):
    """A chat server with the default resume grace (30 s), and bob in plain mode in its lobby."""
    _, port = chat_process()
    bob = PlainClient("bob", port)
    yield bob, port
    bob.proc.kill()
    bob.proc.wait()


def test_sighup_leaves_like_quit_with_a_goodbye_and_the_terminal_restored(screens, bob_listening):
    """SIGHUP (what closing the terminal window sends) ends the client as /quit does: exit code 0, the
    terminal restored, and a close frame, so bob sees carol leave at once, not after the 30 s grace."""
    bob, port = bob_listening
    carol = screens("carol", port, rows=24, cols=80)
    bob.wait_for_line(r"carol joined #lobby$")
    os.kill(carol.proc.pid, signal.SIGHUP)
    assert carol.wait_exit() == 0 and terminal_is_restored(carol)
    bob.wait_for_line(r"\* carol left")  # within WAIT_SECONDS x 2, well inside the 30 s grace
    assert sessions_held(port) == 0


def test_closing_the_terminal_window_leaves_with_a_goodbye(screens, bob_listening):
    """The window closes: the pseudo-terminal's master side goes, the kernel sends SIGHUP, and writes to
    the terminal fail. The client still says goodbye (bob sees carol leave at once, no session is held)
    and exits with status 0."""
    bob, port = bob_listening
    carol = screens("carol", port, rows=24, cols=80)
    bob.wait_for_line(r"carol joined #lobby$")
    carol.hang_up()
    wait_for(lambda: process_state(carol.proc.pid) == "Z", what=lambda: "the client to exit")  # exited, unreaped
    assert carol.proc.wait() == 0  # no traceback from restoring a terminal that is no longer there
    bob.wait_for_line(r"\* carol left")
    assert sessions_held(port) == 0


# ---- an 80x24 terminal, and a 60x20 one ---------------------------------------------------------


def message_column(screen: Screen, text: str) -> int:
    """Columns the message area gives a message's text, measured on screen from the row showing `text`."""
    row = next(line for line in screen.lines() if text in line)
    start = row.index(" │ ") + 3
    border = row.find("│", start)
    return (border if border >= 0 else len(row)) - start - 1  # a column of margin before the edge or border


def status_hints(screen: Screen) -> list[str]:
    """The status bar's hints, as written on screen."""
    return [hint.strip() for hint in screen.lines()[-2].split(" · ")]


@pytest.mark.parametrize("rows, cols, column", [(24, 80, 55), (20, 60, 39)])
def test_a_narrow_terminal_gives_the_messages_its_width_and_a_status_bar_that_fits(carol_and_bob, screens, port,
                                                                                   rows, cols, column):
    """At 80x24 the sidebar folds away: the message column is 55 wide (it was 37), the header counts the
    users, and the status bar holds whole hints only (never "/quit l"), F2 among them."""
    _, bob = carol_and_bob
    dave = screens("dave", port, rows=rows, cols=cols)
    text = " ".join(["word"] * 40)[:column].rstrip()
    bob.send(text)
    dave.wait_for_text(f"bob │ {text}")  # on one row
    assert message_column(dave, text) == column
    assert "Rooms" not in dave.text() and "3 users here" in dave.header()
    hints = status_hints(dave)
    assert hints[-1] == "/quit leaves" and "F2 rooms & users" in hints
    assert set(hints) <= {hint for _, hint in client.HINTS} and display_width(dave.lines()[-2]) == cols


def test_f2_shows_the_rooms_and_users_on_a_narrow_terminal_and_hides_them_again(carol_and_bob, screens, port):
    """Rooms and users stay a key away: F2 (or Ctrl-G) brings the sidebar back, F2 again folds it."""
    dave = screens("dave", port, rows=24, cols=80)
    dave.type(F2)
    wait_for(lambda: "│ Rooms" in dave.text() and "│ Users (3)" in dave.text(), what=dave.text)
    assert display_width(dave.lines()[-2]) == 80
    dave.type(F2)
    wait_for(lambda: "Rooms" not in dave.text(), what=dave.text)
    dave.type(client.ctrl("g"))
    wait_for(lambda: "│ Rooms" in dave.text(), what=dave.text)


# ---- Tab completes the server's commands -----------------------------------------------------


def test_tab_completes_a_command_only_the_servers_help_lists(screens):
    """A server whose command table has /topic (a student's new command): Tab completes /to to /topic,
    and the client's own question for the list shows nothing on screen."""
    server = ScriptedServer(CAROL_EVENTS)
    try:
        carol = screens("carol", server.port)
        wait_for(lambda: "/help" in server.lines, what=lambda: f"the client's /help (lines: {server.lines})")
        carol.type("ready\r")  # echoed after the help reply: once it shows, the client knows the commands
        wait_for(lambda: carol.shows("carol │ ready"), what=carol.text)
        carol.type("/to" + TAB)
        wait_for(lambda: carol.input_line().startswith("#lobby › /topic "), what=lambda: carol.input_line())
        assert not carol.shows("set the room's topic") and not carol.shows("carol │ /help")
    finally:
        server.stop()
