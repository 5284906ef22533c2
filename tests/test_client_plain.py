"""client.py in plain line mode, over pipes, against the real server in its own process.

Plain mode is what `printf '/join x\\nhello\\n' | python client.py dave` runs: lines
in, one printed line per event out, a clean exit at the end of input.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, free_port
from screen import (CAROL_EVENTS, HOSTILE_EVENTS, WAIT_SECONDS, PlainClient, Proxy, Screen, ScriptedServer, client_env,
                    held_refusal, wait_for)

import client

TIME = r"\[\d\d:\d\d:\d\d\]"


def run_client(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run client.py with its stdin from a pipe, to the end."""
    return subprocess.run([sys.executable, str(ROOT / "client.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=20, env=client_env(), cwd=ROOT, check=False)


def online_users(port: int) -> list[str]:
    """The users the server counts as online, from GET /status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=WAIT_SECONDS) as response:
        return json.load(response)["users"]


@pytest.fixture
def server(chat_process) -> int:
    """A chat server in its own process; its port."""
    return chat_process()[1]


@pytest.fixture
def bob(server):
    """bob, connected in plain mode and listening in the lobby."""
    listener = PlainClient("bob", server)
    yield listener
    if listener.proc.poll() is None:
        listener.proc.kill()
    listener.proc.wait()


def test_piped_lines_are_sent_and_the_client_exits_cleanly_at_end_of_input(server):
    """`printf '/join x\\nhello\\n' | client.py dave --plain`: dave joins x, says hello, exits 0."""
    result = run_client("dave", "--plain", f"--port={server}", stdin="/join x\nhello\n")
    assert result.returncode == 0, result.stderr
    assert "* Now in #x: nobody else is here yet." in result.stdout.splitlines()
    assert re.search(rf"^{TIME} #x <dave> hello$", result.stdout, re.MULTILINE)
    assert result.stderr == ""


def test_piped_lines_are_paced_to_the_servers_rate_limit_and_none_is_refused(chat_process):
    """More lines than the rate limit's burst are sent at the server's pace: all echoed, none rate_limited."""
    _, port = chat_process("--rate-per-second=20", "--rate-burst=3")
    lines = [f"line {n}" for n in range(12)]
    result = run_client("dave", "--plain", f"--port={port}", stdin="".join(f"{line}\n" for line in lines))
    assert result.returncode == 0, result.stderr
    echoed = re.findall(rf"^{TIME} #lobby <dave> (line \d+)$", result.stdout, re.MULTILINE)
    assert echoed == lines and "rate_limited" not in result.stdout


def test_plain_mode_is_automatic_when_stdin_and_stdout_are_pipes(server):
    """Without --plain, pipes still get plain line mode."""
    result = run_client("dave", f"--port={server}", stdin="hello\n")
    assert result.returncode == 0 and re.search(rf"{TIME} #lobby <dave> hello", result.stdout)


def test_the_username_is_free_again_as_soon_as_the_client_exits(server):
    """At end of input the client says goodbye with a close frame, so the server frees the name at once."""
    assert run_client("dave", f"--port={server}", stdin="hello\n").returncode == 0
    assert "dave" not in online_users(server)
    assert run_client("dave", f"--port={server}", stdin="again\n").returncode == 0


def test_another_users_message_and_arrival_print_as_one_line_each(bob, server):
    """bob sees dave arrive and speak: `[12:01:02] #lobby * dave joined #lobby`, `... <dave> hi bob`."""
    run_client("dave", f"--port={server}", stdin="hi bob\n")
    bob.wait_for_line(rf"^{TIME} #lobby \* dave joined #lobby$")
    bob.wait_for_line(rf"^{TIME} #lobby <dave> hi bob$")
    assert bob.end_input() == 0


def test_a_refused_line_prints_the_servers_error(server):
    """An error event prints as `! sentence` (the code is for programs), and the client goes on."""
    result = run_client("dave", f"--port={server}", stdin="/leave\nshort\n")
    assert re.search(r"^! You cannot leave #lobby", result.stdout, re.MULTILINE)
    assert re.search(rf"{TIME} #lobby <dave> short", result.stdout) and result.returncode == 0


def test_a_line_over_the_length_limit_is_not_sent_and_prints_an_error(chat_process):
    """A line longer than welcome's max_message_length prints `! Your line has ...` and is skipped."""
    _, port = chat_process("--max-message-length=10")
    result = run_client("dave", f"--port={port}", stdin="this is far too long\nshort\n")
    assert ("! Your line has 20 characters; the limit is 10. Shorten it and press Enter again."
            in result.stdout.splitlines())
    assert "<dave> this is far too long" not in result.stdout
    assert re.search(rf"{TIME} #lobby <dave> short", result.stdout) and result.returncode == 0


def test_quit_ends_the_session_and_ignores_the_rest_of_the_input(server):
    """/quit is the client's own command: nothing after it is sent."""
    result = run_client("dave", f"--port={server}", stdin="one\n/quit\ntwo\n")
    assert result.returncode == 0 and "<dave> one" in result.stdout and "<dave> two" not in result.stdout


def test_a_taken_username_is_one_clear_sentence_and_a_failure(bob, server):
    """Connecting as `Bob` while bob is online: one line on stderr, exit code 1, no traceback."""
    result = run_client("Bob", f"--port={server}")
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "taken" in result.stderr


def test_a_relaunch_while_your_old_session_is_held_waits_for_the_name_and_gets_in():
    """carol's name is held for her crashed session: one line says it is probably hers; she gets in."""
    scripted = ScriptedServer(CAROL_EVENTS, refusals=[held_refusal(retry_after=1.0)])
    try:
        result = run_client("carol", f"--port={scripted.port}", stdin="hello\n")
    finally:
        scripted.stop()
    assert result.returncode == 0 and re.search(rf"{TIME} #lobby <carol> hello", result.stdout)
    assert len(result.stderr.splitlines()) == 1 and "probably yours" in result.stderr
    assert len(scripted.logins) == 2


def status(port: int) -> dict:
    """The server's GET /status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=WAIT_SECONDS) as response:
        return json.load(response)


def test_a_relaunch_right_after_a_crash_waits_for_the_name_the_server_holds(chat_process):
    """carol's client is killed; started again within the resume grace, it waits for her name and gets in."""
    _, port = chat_process("--resume-grace=2")
    crashed = PlainClient("carol", port)
    crashed.proc.kill()  # no goodbye: the server holds the session for resume
    crashed.proc.wait()
    wait_for(lambda: status(port)["sessions_held"] == 1)
    result = run_client("carol", f"--port={port}", stdin="hello again\n")
    assert result.returncode == 0 and re.search(rf"{TIME} #lobby <carol> hello again", result.stdout)
    assert "probably yours" in result.stderr


def test_messages_lost_on_a_dying_link_are_replayed_after_the_reconnect(chat_process):
    """A link that drops messages and dies: the client resumes from the last message it saw and gets them."""
    _, port = chat_process()
    link = Proxy(port)
    carol, bob = PlainClient("carol", link.port), PlainClient("bob", port)
    try:
        bob.say("one")
        carol.wait_for_line(rf"^{TIME} #lobby <bob> one$")
        link.losing.set()  # from here the server's frames to carol vanish on the way
        bob.say("two")
        bob.say("three")
        bob.wait_for_line(rf"^{TIME} #lobby <bob> three$")
        link.cut()
        carol.wait_for_line(r"^\* Reconnected: your session is back \(2 missed messages follow\)\.$")
        carol.wait_for_line(rf"^{TIME} #lobby <bob> three$")
        assert [line.split("> ")[-1] for line in carol.output if "<bob>" in line] == ["one", "two", "three"]
    finally:
        for listener in (carol, bob):
            listener.proc.kill()
            listener.proc.wait()
        link.close()


def test_a_name_held_for_longer_than_the_client_waits_is_refused_at_once():
    """A retry_after beyond what the client waits for: the server's sentence at once, no wait."""
    too_long = held_refusal(retry_after=client.HELD_WAIT_LIMIT_SECONDS)
    scripted = ScriptedServer(CAROL_EVENTS, refusals=[too_long])
    try:
        result = run_client("carol", f"--port={scripted.port}")
    finally:
        scripted.stop()
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "someone with that name is reconnecting" in result.stderr and len(scripted.logins) == 1


def test_an_invalid_username_is_one_clear_sentence_and_a_failure(server):
    """A name the server refuses is explained in one line."""
    result = run_client("no spaces!", f"--port={server}")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "not a valid username" in result.stderr


def test_an_unreachable_server_is_one_clear_sentence_and_a_failure():
    """Nothing listening: one line naming the server, exit code 1, no traceback."""
    port = free_port()
    result = run_client("dave", f"--port={port}")
    sentence = (f"client.py: Cannot reach the chat server at ws://localhost:{port}/ws: "
                "connection refused (is the server running?).")
    assert result.returncode == 1 and result.stderr.splitlines() == [sentence]


def test_a_silent_server_fails_within_the_connect_timeout_with_one_clear_sentence():
    """A server that accepts TCP but never answers: one sentence within the connect timeout, not HTTP 599."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens (the kernel accepts), never answers
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}/ws"
        started = time.monotonic()
        result = run_client("dave", f"--url={url}")
        elapsed = time.monotonic() - started
    sentence = f"client.py: Cannot reach the chat server at {url}: no answer within 5 s."
    assert result.returncode == 1 and result.stderr.splitlines() == [sentence]
    assert elapsed < client.CONNECT_TIMEOUT_SECONDS + 3


def test_interactive_plain_mode_connects_again_on_enter_after_going_offline(chat_process):
    """On a terminal, --plain goes offline after the idle timeout with a hint; Enter connects again."""
    _, port = chat_process("--idle-timeout=2")
    carol = Screen("carol", f"--port={port}", "--plain", rows=24, cols=200)
    try:
        carol.wait_for_text("Press Enter to reconnect, or /quit to leave.")
        carol.send("")
        wait_for(lambda: carol.text().count(f"Connected to ws://localhost:{port}/ws as carol") == 2,
                 what=lambda: carol.text())
    finally:
        carol.close()


def test_a_server_shutdown_ends_plain_mode_with_a_note(chat_process):
    """When the server shuts down, a plain client prints the notices and exits with code 1."""
    process, port = chat_process()
    listener = PlainClient("bob", port)
    process.terminate()  # SIGTERM: the server says goodbye and closes with 1001
    assert listener.proc.wait(timeout=WAIT_SECONDS) == 1
    listener.wait_for_line(rf"^{TIME} \* The server is shutting down")
    listener.wait_for_line(r"^! Disconnected: the server is shutting down\.$")


def test_control_characters_from_the_server_never_reach_the_output():
    """Whatever a (hostile) server sends, plain mode prints no control or bidi characters."""
    hostile = ScriptedServer(HOSTILE_EVENTS)
    try:
        result = run_client("carol", f"--port={hostile.port}", stdin="hello\n")
    finally:
        hostile.stop()
    assert result.returncode == 0 and "<bob[2J]0;PWNED31mevil> hi [2J]0;PWNED31mevil" in result.stdout
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", result.stdout)


@pytest.mark.parametrize("flag", ["--url", "--host", "--port", "--plain", "8888", "/join <room>", "PgUp"])
def test_help_explains_every_flag_and_the_keys(flag):
    """`client.py --help` lists the flags (with defaults), the commands and the keys."""
    result = run_client("--help")
    assert result.returncode == 0 and flag in result.stdout


# ---- what people paste (issue 19, item 2) ----------------------------------------------------


@pytest.mark.parametrize("flags", [
    ["--host", "127.0.0.1:{port}"],
    ["--host", "http://127.0.0.1:{port}/"],
    ["--host", "ws://127.0.0.1:{port}"],
    ["--url", "ws://127.0.0.1:{port}"],
    ["--host", "[::1]:{port}"],
], ids=["host-port", "page-address", "ws-url", "url-without-ws", "ipv6"])
def test_every_address_form_people_paste_reaches_the_server(chat_process, flags):
    """The forms that ended in a traceback or "non-websocket response" now chat."""
    if "[::1]" in flags[1] and not socket.has_ipv6:
        pytest.skip("this system has no IPv6")
    _, port = chat_process()  # on every interface, IPv6 too
    result = run_client("dave", *[flag.format(port=port) for flag in flags], stdin="hello\n")
    assert result.returncode == 0, result.stderr
    assert re.search(rf"{TIME} #lobby <dave> hello", result.stdout) and result.stderr == ""


@pytest.mark.parametrize("args, env, sentence", [
    (["--host", "http://127.0.0.1:abc/"], {},
     "client.py: --host 'http://127.0.0.1:abc/' is not a server address: give a host name or IP address, "
     "optionally with :PORT (like 192.168.1.20:8888 or [::1]:8888), or the address the server printed "
     "(http://... or ws://...)."),
    ([], {"CHAT_PORT": "abc"}, "client.py: CHAT_PORT must be a port number (1-65535), not 'abc'."),
    (["--port=9000"], {"CHAT_PORT": "²"}, "client.py: CHAT_PORT must be a port number (1-65535), not '²'."),
], ids=["bad-host", "chat-port-abc", "chat-port-superscript"])
def test_a_bad_address_or_chat_port_is_one_line_and_no_traceback(args, env, sentence):
    """A real client.py with a bad value: exactly one line on stderr, exit code 1, nothing else."""
    result = subprocess.run([sys.executable, str(ROOT / "client.py"), "dave", *args], input="", capture_output=True,
                            text=True, timeout=20, env=client_env(**env), cwd=ROOT, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [sentence] and "Traceback" not in result.stderr


# ---- leaving (issue 19, item 3) -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["SIGHUP", "SIGTERM"])
def test_a_hang_up_or_a_kill_ends_plain_mode_with_a_goodbye(bob, server, name):
    """Plain mode too leaves like /quit on SIGHUP (and SIGTERM): bob sees dave leave at once."""
    number = getattr(signal, name, None)
    if number is None:
        pytest.skip(f"this system has no {name}")
    dave = PlainClient("dave", server)
    bob.wait_for_line(r"\* dave joined #lobby$")
    dave.proc.send_signal(number)
    assert dave.exit_code() == 0
    bob.wait_for_line(r"\* dave left")  # at once: within the wait, well inside the 30 s resume grace
    assert status(server)["sessions_held"] == 0
