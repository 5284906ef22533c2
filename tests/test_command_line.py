"""`python chat.py` as a program: flags, the port rule and start-up errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from conftest import ROOT, free_port, wait_for_port

import chat


def run_chat(*flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run chat.py to completion (for --help and start-up errors)."""
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *flags], capture_output=True, check=False,
                          text=True, timeout=20, env=None if env is None else {**os.environ, **env})


def status(port: int) -> dict:
    """GET /status from a server on this machine."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        return json.load(response)


@pytest.mark.parametrize("flag", [
    "--port", "--address", "--max-message-length", "--rate-per-second", "--rate-burst",
    "--idle-timeout", "--room-capacity", "--max-connections", "--resume-grace", "--max-backlog",
    "--ping-interval", "--announce-limit",
])
def test_help_lists_every_flag(flag):
    """`python chat.py --help` lists each flag."""
    result = run_chat("--help")
    assert result.returncode == 0
    assert flag in result.stdout + result.stderr


def test_help_gives_each_limit_a_default_and_a_unit():
    """Each limit's help names its unit and its default."""
    text = " ".join((run_chat("--help").stdout + run_chat("--help").stderr).split())
    for phrase in ["in characters (default 500)", "seconds", "bytes", "(default 8888)"]:
        assert phrase in text


def test_help_sets_apart_the_limits_lesson_one_does_not_use():
    """--help lists Part I's limits and Part II's under separate headings."""
    help_text = run_chat("--help").stdout
    part_one, part_two = help_text.split("limits (Part I enforces these)")[1].split("limits Part II adds")
    assert "--max-backlog" in part_one and "--rate-per-second" not in part_one
    assert "--rate-per-second" in part_two and "--max-backlog" not in part_two


def test_lesson_one_runs_with_only_the_limits_part_one_enforces(chat_process):
    """`--lesson=1` does not advertise Part II's limits: /status shows Part I's four."""
    _, port = chat_process("--lesson=1")
    assert set(status(port)["limits"]) == {field.name for field in dataclasses.fields(chat.Limits)}


def test_the_port_flag_starts_the_server_there(chat_process):
    """`python chat.py --port=N` serves on N (chat_process passes --port)."""
    _, port = chat_process()
    assert status(port)["connections"] == 0


def test_chat_port_sets_the_port_when_no_flag_is_given():
    """`CHAT_PORT=N python chat.py` serves on N."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "chat.py")], env={**os.environ, "CHAT_PORT": str(port)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        assert status(port)["rooms"] == [{"name": "lobby", "users": 0}]
    finally:
        process.kill()
        process.wait()


def test_the_port_flag_wins_over_chat_port(chat_process):
    """With both given, --port is used and CHAT_PORT ignored."""
    decoy = free_port()
    _, port = chat_process(env={"CHAT_PORT": str(decoy)})
    assert status(port)["connections"] == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", decoy), timeout=0.5).close()


@pytest.mark.parametrize("value", ["eighty", "0", "70000", "-1", "²", "８０"])
def test_a_bad_chat_port_is_a_clear_error(value):
    """A CHAT_PORT that is not a port number stops the server with one sentence, not a traceback."""
    result = run_chat(env={"CHAT_PORT": value})
    assert result.returncode != 0
    assert "CHAT_PORT must be a port number" in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_a_clear_error():
    """Starting on a busy port says so in one sentence and exits non-zero."""
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        result = run_chat(f"--port={busy.getsockname()[1]}")
    assert result.returncode != 0
    assert "cannot listen on port" in result.stderr and "Traceback" not in result.stderr


def test_limit_flags_reach_the_server(chat_process):
    """Limit flags set the server's limits, as /status reports them."""
    _, port = chat_process("--max-message-length=42", "--rate-per-second=0", "--idle-timeout=0")
    limits = status(port)["limits"]
    assert (limits["max_message_length"], limits["rate_per_second"], limits["idle_timeout"]) == (42, 0, 0)


def test_the_defaults_suit_a_class():
    """100 users can share one room, and people may type a few lines a second."""
    limits = chat.CrowdLimits()
    assert limits.room_capacity >= 100 and limits.rate_burst >= 5 and limits.rate_per_second >= 2
    assert limits.max_message_length == 500 and limits.max_backlog == 1024 * 1024
    assert limits.idle_timeout >= 2 * 3600  # a silent student is never closed during a lesson
    assert 4096 <= limits.max_frame_bytes <= 16 * 1024


@pytest.mark.parametrize("flag", ["--max-connections=-1", "--idle-timeout=-5", "--rate-burst=0", "--max-backlog=500"])
def test_a_nonsensical_limit_is_a_clear_error(flag):
    """A negative limit (or a burst of 0) stops the server with one sentence, not a traceback."""
    result = run_chat(flag)
    assert result.returncode != 0
    assert flag.split("=")[0] in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, says", [
    (["--nope"], "unrecognized arguments: --nope"),
    (["--port=abc"], "--port: must be a port number"),
    (["--port", "70000"], "--port: must be a port number"),
    (["--rate-burst=many"], "--rate-burst: invalid int value"),
])
def test_an_unknown_flag_or_a_bad_value_is_one_sentence_pointing_to_help(flags, says):
    """A mistyped flag gets one line on stderr that names it and points to --help; no usage dump."""
    result = run_chat(*flags)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert says in result.stderr and "--help" in result.stderr and "Traceback" not in result.stderr


def test_a_flag_value_may_follow_after_a_space(chat_process):
    """`--port 9000` works as well as `--port=9000`, for every flag."""
    process, port = chat_process("--max-message-length", "42")  # chat_process passes --port=N
    assert status(port)["limits"]["max_message_length"] == 42


def test_a_flag_spelled_with_underscores_is_refused_in_one_line():
    """`--max_message_length=42` is not a flag: one line names it, with where to look."""
    result = run_chat("--max_message_length=42")
    assert result.returncode == 2 and "--max_message_length" in result.stderr
    assert result.stderr.count("\n") == 1 and "python chat.py --help" in result.stderr


def test_help_lists_the_flags_in_the_readme_order_without_machine_paths():
    """--help shows chat.py's own flags, in the order of the README's table, and no file paths."""
    help_text = run_chat("--help").stdout
    flags_section = (ROOT / "README.md").read_text().split("## Flags and limits")[1].split("\n## ")[0]
    readme_flags = re.findall(r"^\| `(--[a-z-]+)`", flags_section, re.M)
    positions = [re.search(rf"^  {flag}\b", help_text, re.M).start() for flag in readme_flags]
    assert readme_flags and positions == sorted(positions)
    assert str(ROOT) not in help_text and "site-packages" not in help_text


def start_up_lines(chat_process, *flags: str) -> tuple[str, int]:
    """What the server prints when it starts, up to its status line (then it is stopped)."""
    process, port = chat_process(*flags)
    watchdog = threading.Timer(20, process.kill)  # a missing line fails the test, never hangs it
    watchdog.start()
    lines = []
    for line in process.stdout:  # the server prints its start-up lines right after it listens
        lines.append(line)
        if "status:" in line:
            break
    watchdog.cancel()
    process.terminate()
    rest, _ = process.communicate(timeout=20)
    return "".join(lines) + rest, port


def test_start_up_names_the_addresses_people_can_use(chat_process):
    """On every interface, the server prints this machine's URL and each LAN address's, with the client command."""
    output, port = start_up_lines(chat_process)
    assert f"http://localhost:{port}/" in output
    for ip in chat.lan_addresses():
        assert f"http://{ip}:{port}/" in output and f"python client.py NAME --host {ip} --port {port}" in output
    assert "Ctrl-C" in output


def test_start_up_on_one_address_names_only_that_one(chat_process):
    """With --address=127.0.0.1 the server says localhost and no LAN address (nobody else can reach it)."""
    output, port = start_up_lines(chat_process, "--address=127.0.0.1")
    assert f"http://localhost:{port}/" in output
    assert not any(f"http://{ip}:{port}/" in output for ip in chat.lan_addresses())


def test_lan_addresses_are_ipv4_and_never_loopback():
    """The addresses offered to other laptops are real IPv4 addresses of this machine, not 127.x."""
    for ip in chat.lan_addresses():
        assert ip.count(".") == 3 and not ip.startswith("127.")


@pytest.mark.parametrize("host, url", [("localhost", "http://localhost:8888/"),
                                       ("192.168.1.20", "http://192.168.1.20:8888/"),
                                       ("::1", "http://[::1]:8888/"), ("fe80::1", "http://[fe80::1]:8888/")])
def test_the_page_url_to_share_puts_ipv6_addresses_in_brackets(host, url):
    """The address people are told to open is a valid URL for IPv4, IPv6 and names alike."""
    assert chat.page_url(host, 8888) == url


def test_a_bad_address_is_named_in_the_error():
    """A --address the machine does not have is blamed on the address, not only the port."""
    result = run_chat("--port=8999", "--address=192.0.2.77")  # a documentation address: never ours
    assert result.returncode != 0
    assert "cannot listen on 192.0.2.77 port 8999" in result.stderr and "--address" in result.stderr


def test_start_up_is_one_block_to_read_out_lan_addresses_first_and_no_log_prefixes(chat_process):
    """What to tell the class: each LAN address with its client command, localhost last and labelled."""
    output, port = start_up_lines(chat_process)
    block = output[output.index("Tell the class") if chat.lan_addresses() else output.index("Only this"):]
    block = block[:block.index("(status:")]
    assert "[I " not in block and "chat:" not in block  # no log prefixes in what is read out
    urls = re.findall(r"http://\S+/", block)
    assert urls == [chat.page_url(ip, port) for ip in chat.lan_addresses()] + [f"http://localhost:{port}/"]
    assert "To stop the server, press Ctrl-C." in block
    assert "On this laptop only:" in block or not chat.lan_addresses()


@pytest.mark.parametrize("flag", ["--idle-timeout=5", "--rate-per-second=1", "--resume-grace=0"])
def test_a_part_two_flag_with_lesson_one_gets_a_one_line_warning(chat_process, flag):
    """Part I does not enforce Part II's limits: `--lesson=1 --idle-timeout=5` says so instead of ignoring it."""
    process, port = chat_process("--lesson=1", flag)
    process.terminate()
    output, _ = process.communicate(timeout=20)
    name = flag.split("=")[0]
    warnings = [line for line in output.splitlines() if name in line]
    assert warnings == [f"chat.py: {name} is a Part II limit; --lesson=1 does not enforce it."]


def test_part_two_flags_at_their_defaults_give_lesson_one_no_warning(chat_process):
    """Only a Part II limit that was changed is worth a warning."""
    process, _ = chat_process("--lesson=1")
    process.terminate()
    output, _ = process.communicate(timeout=20)
    assert "Part II limit" not in output


def test_a_bad_trusted_proxy_is_one_line():
    """`--trusted-proxy=junk` stops the server with one sentence naming the flag."""
    result = run_chat("--trusted-proxy=junk")
    assert result.returncode == 2 and "--trusted-proxy" in result.stderr and "IP addresses" in result.stderr
    assert result.stderr.count("\n") == 1
