"""Issue 20, Hardening III: fair doors for IPv6, proxies and the CPU.

Each test replays one attack of issue 20 against a real `python chat.py` (a
subprocess, so its CPU is its own) or the in-process server, bounded in count and
time, and asserts the bound the server promises: it stays up, a newcomer from
another address group gets in during the attack, and the attacker's share
(seats, handshake slots, held names, rooms, CPU) stays within the bound. The
numbers of each attack are in its docstring.

Attackers come from 127.0.0.2 and up (Linux routes all of 127/8 to loopback), the
IPv6 ones from a network namespace the test makes itself (skipped where it cannot),
and a proxy in front of the server is tests/doors_harness.py's ForwardingProxy.
Latencies are not asserted here (timed tests flake on a busy machine): only that
the bystander's lines arrive, each within a generous timeout. `python
tests/attack_doors.py` measures them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tornado.httpclient
from conftest import ROOT, wait_until
from doors_harness import (
    ForwardingProxy,
    OPCODE_TEXT,
    KeepAlive,
    NetNS,
    Peer,
    closed_by_server,
    cpu_seconds,
    echo_probe,
    get_request,
    http_request,
    ipv6_addresses,
    login,
    masked_frame,
    upgrade_request,
)

import chat

pytestmark = [
    pytest.mark.skipif(not hasattr(chat, "address_group"), reason="issue 20 not implemented yet"),
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="needs Linux: 127.0.0.2 and up routed to loopback, TCP_INFO"),
]

HOST = "127.0.0.1"
HARNESS = Path(__file__).resolve().parent / "doors_harness.py"


def start(chat_process, *flags: str) -> tuple[subprocess.Popen, int]:
    """`python chat.py` on 127.0.0.1 with these flags, logging only warnings (a full pipe would stall it)."""
    return chat_process("--address=127.0.0.1", "--logging=warning", *flags)


def assert_up(process: subprocess.Popen) -> None:
    assert process.poll() is None, f"the server exited: {process.communicate()[0][-2000:]}"


async def assert_newcomer_gets_in(port: int, source: str, username: str) -> None:
    """A user from another address group logs in and is relayed (the class goes on)."""
    peer, event = await login(HOST, port, username, source)
    assert event["type"] == "welcome", f"{username} from {source} was not let in: {event}"
    await peer.say(f"hello from {username}")
    await peer.expect("message", text=f"hello from {username}")
    peer.close()


async def assert_status_answers(port: int, source: str) -> dict:
    answer = await http_request(HOST, port, "/status", source)
    assert answer is not None and answer[0] == 200, f"GET /status from {source}: {answer and answer[:2]}"
    return json.loads(answer[2])


# ---- 1. the handshake door -----------------------------------------------------------------


@pytest.mark.gen_test(timeout=40)
async def test_half_open_handshakes_from_39_groups_cannot_shut_out_a_newcomer_or_status(chat_process):
    """Attack: 39 addresses (127.0.0.2-40) x 10 half-open handshakes each, re-opened as the server
    closes them, against --max-handshakes=64 --handshake-timeout=1 (issue 20: 26 x 10 filled all 256
    slots and a real user and /status were refused for as long as it lasted). Bound: no group holds
    more than its share (10) of the slots, the total stays within 64, and newcomers from three other
    addresses log in and GET /status answers while the attack goes on."""
    process, port = start(chat_process, "--max-handshakes=64", "--handshake-timeout=1")
    attackers = [f"127.0.0.{number}" for number in range(2, 41)]
    held: dict[str, list[Peer]] = {source: [] for source in attackers}
    stop = asyncio.Event()

    async def keep_ten_open(source: str) -> None:
        while not stop.is_set():
            for peer in [peer for peer in held[source] if peer.hung_up()]:
                peer.close()
                held[source].remove(peer)
            for number in range(10 - len(held[source])):
                try:
                    peer = await Peer.open(HOST, port, source)
                except (OSError, asyncio.TimeoutError):
                    break
                peer.send_nowait(upgrade_request(HOST, port, f"slow{number}")[:40])  # half a request
                held[source].append(peer)
            await asyncio.sleep(0.2)

    attack = [asyncio.ensure_future(keep_ten_open(source)) for source in attackers]
    try:
        await asyncio.sleep(1.5)  # past the first handshake timeout: the attackers have re-opened
        open_now = {source: sum(not peer.hung_up() for peer in peers) for source, peers in held.items()}
        print(f"\nATTACK 39 x 10 half-open handshakes, max_handshakes=64: {sum(open_now.values())} open, "
              f"biggest holder {max(open_now.values())}")
        for number, source in enumerate(("127.0.0.50", "127.0.0.51", "127.0.0.52")):
            await assert_newcomer_gets_in(port, source, f"newcomer{number}")
            await assert_status_answers(port, f"127.0.0.{60 + number}")
        open_now = {source: sum(not peer.hung_up() for peer in peers) for source, peers in held.items()}
        assert max(open_now.values()) <= 10 and sum(open_now.values()) <= 64, open_now
        assert_up(process)
    finally:
        stop.set()
        await asyncio.gather(*attack, return_exceptions=True)
        for peers in held.values():
            for peer in peers:
                peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_connection_pipelining_get_and_never_reading_is_closed_at_the_handshake_timeout(chat_process):
    """Attack: one connection from 127.0.0.2 pipelines 10,000 `GET /` (about 280 kB, as much as the
    kernel takes) and never reads (issue 20: such connections stayed open past the 10 s handshake
    timeout). Bound: --handshake-timeout (here 1 s) covers the whole HTTP phase: closed within
    1 s + 2 s of margin; a newcomer from 127.0.0.3 gets in meanwhile."""
    process, port = start(chat_process, "--handshake-timeout=1")
    peer = await Peer.open(HOST, port, "127.0.0.2", receive_buffer_bytes=16384)
    try:
        started = time.monotonic()
        requests = get_request(HOST, port, "/") * 10_000
        sent = 0
        while sent < len(requests) and time.monotonic() < started + 0.5:
            sent += peer.send_nowait(requests[sent:])
            await asyncio.sleep(0.01)
        await assert_newcomer_gets_in(port, "127.0.0.3", "carol")
        await asyncio.sleep(max(0.0, started + 3.0 - time.monotonic()))
        closed = await closed_by_server(peer)
        print(f"\nATTACK pipelined GET / x {sent // len(get_request(HOST, port, '/')):,}, never read, "
              f"handshake_timeout=1: closed after 3 s: {closed}")
        assert closed, "still served 3 s after a 1 s handshake timeout"
        assert_up(process)
    finally:
        peer.close()


@pytest.mark.gen_test(timeout=40)
async def test_requests_of_closed_connections_are_not_served_and_a_login_is_prompt(chat_process):
    """Attack: 10 connections from 127.0.0.2 x 2,000 pipelined `GET /` (56 kB each), never read,
    closed by the client after 2 s (issue 20: 16.8 s of 100% CPU after the close, the requests
    already read still served; logins refused for about 40 s). Bound: requests of a connection that
    has closed are not served: from the close until it is idle the server uses under 1 s of CPU, and
    a login from 127.0.0.3 succeeds (within 5 s), and so does GET /status."""
    process, port = start(chat_process)
    peers = []
    try:
        for _ in range(10):
            peer = await Peer.open(HOST, port, "127.0.0.2", receive_buffer_bytes=16384)
            data, sent, until = get_request(HOST, port, "/") * 2000, 0, time.monotonic() + 0.5
            while sent < len(data) and time.monotonic() < until:
                sent += peer.send_nowait(data[sent:])
                await asyncio.sleep(0.005)
            peers.append(peer)
        await asyncio.sleep(2)
        for peer in peers:
            peer.close()
        cpu_before, closed_at = cpu_seconds(process.pid), time.monotonic()
        await assert_newcomer_gets_in(port, "127.0.0.3", "carol")
        login_seconds = time.monotonic() - closed_at
        await assert_status_answers(port, "127.0.0.4")
        # What the closed connections still cost: the server's CPU from the close until it is idle
        # (under 0.05 s in half a second), watched for at most 8 s. CPU time, not wall time: a busy
        # machine that runs the server less makes the work take longer, not cost less.
        while time.monotonic() < closed_at + 8:
            before = cpu_seconds(process.pid)
            await asyncio.sleep(0.5)
            if cpu_seconds(process.pid) - before < 0.05:
                break
        cpu, busy = cpu_seconds(process.pid) - cpu_before, time.monotonic() - closed_at
        print(f"\nATTACK 10 x 2,000 pipelined GET /, closed: login after {login_seconds:.2f} s, "
              f"server CPU {cpu:.2f} s in the {busy:.1f} s after the close until idle")
        # Before the fix: 8-17 s. Under `coverage run` (COVERAGE_RUN is set) tracing costs about 4x the CPU.
        bound = 5.0 if os.environ.get("COVERAGE_RUN") else 1.0
        assert cpu < bound, f"the server kept serving closed connections: {cpu:.2f} s of CPU after the close"
        assert_up(process)
    finally:
        for peer in peers:
            peer.close()


# ---- 2. IPv6: one laptop is many addresses -------------------------------------------------


ATTACKER_PREFIX, CLASSMATE = "fd00:1:2:3::", "fd00:9:9:9::1"


@pytest.fixture
def netns():
    """A network namespace with 200 addresses of fd00:1:2:3::/64 and one of fd00:9:9:9::/64."""
    name = f"chatdoors{os.getpid()}"
    reason = NetNS.unavailable_reason(name)
    if reason:
        pytest.skip(reason)
    with NetNS(name, ipv6_addresses(ATTACKER_PREFIX, 0x100, 200) + [CLASSMATE]) as namespace:
        yield namespace


def run_in_netns(netns: NetNS, server_flags: list[str], attack: list[str]) -> dict:
    """Start chat.py on [::]:8888 in the namespace, run the harness's attack there, stop the server."""
    port = 8888  # the namespace is ours alone
    server = subprocess.Popen(netns.exec_args(sys.executable, str(ROOT / "chat.py"), "--address=::",
                                              f"--port={port}", "--logging=warning", *server_flags),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        client = subprocess.run(netns.exec_args(sys.executable, str(HARNESS), *attack, "--port", str(port)),
                                capture_output=True, text=True, timeout=90, cwd=ROOT)
        assert server.poll() is None, f"the server exited: {server.communicate()[0][-2000:]}"
        assert client.returncode == 0, f"the attack script failed: {client.stderr[-2000:]}"
        return json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        if server.returncode is None:
            server.kill()
            server.communicate()


def test_200_addresses_of_one_ipv6_64_share_one_groups_seats(netns):
    """Attack: in a network namespace, one client with 200 addresses of fd00:1:2:3::/64 logs in from
    each, drops them all (held for resume) and tries 50 more (issue 20: it took all 1,000 seats in
    1.4 s, and a classmate from another /64 got `server_full`). Bound: the /64 is one group:
    at most --max-per-address (10) seats, online plus held, in total; a classmate from
    fd00:9:9:9::/64 logs in."""
    result = run_in_netns(netns, [], ["ipv6-seats", "--addresses", "200", "--retry", "50"])
    print(f"\nATTACK 200 addresses of one /64: {result}")
    assert result["welcomed"] <= 10, result
    assert result["welcomed"] + result["after_drop_welcomed"] <= 10, result
    assert result["classmate"] == "welcome", result


def test_half_open_handshakes_from_50_addresses_of_one_64_hold_one_groups_share(netns):
    """Attack: 50 addresses of one /64 x 10 half-open handshakes each (issue 20: 30 addresses filled
    all 256 handshake slots). Bound: the /64 holds at most its share (--max-per-address, 10) of the
    slots; a classmate from another /64 logs in meanwhile."""
    result = run_in_netns(netns, [], ["ipv6-halfopen", "--addresses", "50", "--per-address", "10"])
    print(f"\nATTACK 50 x 10 half-open handshakes from one /64: {result}")
    assert result["kept_open"] <= 10, result
    assert result["classmate"] == "welcome", result


def test_ipv6_prefix_128_makes_every_address_its_own_group(netns):
    """--ipv6-prefix=128: 20 addresses of one /64, one login each, all get in (one address = one
    group, as before issue 20); the classmate too."""
    result = run_in_netns(netns, ["--ipv6-prefix=128"], ["ipv6-seats", "--addresses", "20", "--retry", "0"])
    print(f"\n--ipv6-prefix=128, 20 addresses of one /64: {result}")
    assert result["welcomed"] == 20, result
    assert result["classmate"] == "welcome", result


def test_address_group_groups_ipv6_by_prefix_and_ipv4_by_address():
    """The grouping itself: IPv4 by address, IPv6 by the first `ipv6_prefix` bits."""
    group = chat.address_group
    assert group("fd00:1:2:3::5", 64) == group("fd00:1:2:3:ffff::9", 64)
    assert group("fd00:1:2:3::5", 64) != group("fd00:1:2:4::5", 64)
    assert group("fd00:1:2:3::5", 128) != group("fd00:1:2:3::6", 128)
    assert group("fd00:1:2:3::5", 48) == group("fd00:1:2:4::5", 48)
    assert group("10.0.0.7", 64) != group("10.0.0.8", 64)
    assert group("::ffff:10.0.0.7", 64) == group("10.0.0.7", 64)  # a v4-mapped address is IPv4
    assert chat.CrowdLimits().ipv6_prefix == 64


# ---- 3. behind a reverse proxy -------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--trusted-proxy=127.0.0.1"]], ids=["no-proxy-flag", "trusted-other"])
@pytest.mark.gen_test(timeout=30)
async def test_forwarded_headers_from_a_client_that_is_not_a_trusted_proxy_are_ignored(chat_process, flags):
    """Attack: 5 logins from 127.0.0.2, each claiming another address (X-Forwarded-For: 10.9.9.N,
    X-Real-Ip: 10.9.8.N), with --max-per-address=3. Bound: headers from anyone but a trusted proxy are
    ignored: all 5 count as 127.0.0.2, so the 4th and 5th get `address_full` / 4005."""
    process, port = start(chat_process, "--max-per-address=3", *flags)
    answers, peers = [], []
    for number in range(5):
        peer, event = await login(HOST, port, f"bot{number}", "127.0.0.2",
                                  headers={"X-Forwarded-For": f"10.9.9.{number}",
                                           "X-Real-Ip": f"10.9.8.{number}"})
        answers.append(event.get("code", event["type"]))
        if event["type"] == "error":
            answers[-1] = (answers[-1], await peer.closed())
        if peer is not None:
            peers.append(peer)
    print(f"\nATTACK spoofed X-Forwarded-For from 127.0.0.2: {answers}")
    assert answers == ["welcome"] * 3 + [("address_full", 4005)] * 2
    await assert_newcomer_gets_in(port, "127.0.0.3", "carol")
    assert_up(process)
    for peer in peers:
        peer.close()


def forwarded_as(address: str) -> str:
    """What our proxy says a client is: 127.0.0.7 and .8 stand for 10.0.0.7 and .8; others are themselves."""
    return {"127.0.0.7": "10.0.0.7", "127.0.0.8": "10.0.0.8"}.get(address, address)


@pytest.mark.parametrize("mode", ["x-real-ip", "x-forwarded-for"])
@pytest.mark.gen_test(timeout=40)
async def test_behind_a_trusted_proxy_each_real_client_gets_its_own_share(chat_process, mode):
    """Attack: behind a reverse proxy on 127.0.0.1 (chat.py --trusted-proxy=127.0.0.1), one client
    (forwarded as 10.0.0.7, and sending its own X-Forwarded-For: 10.66.66.N each time) opens 15
    sessions (issue 20: behind nginx or Caddy everyone is 127.0.0.1, exempt: one client took 1,000
    seats in 1.2 s). Bound: at most --max-per-address (10) for 10.0.0.7; a client forwarded as
    127.0.0.1 is not exempt (at most 10 of 12); another forwarded client (10.0.0.8) gets in."""
    process, port = start(chat_process, "--trusted-proxy=127.0.0.1")
    proxy = await ForwardingProxy(HOST, port, mode, claim=forwarded_as).start()
    peers = []

    async def sessions(source: str, count: int, prefix: str) -> list[str]:
        answers = []
        for number in range(count):
            peer, event = await login(HOST, proxy.port, f"{prefix}{number}", source,
                                      headers={"X-Forwarded-For": f"10.66.66.{number}"})
            answers.append(event.get("code", event["type"]))
            if peer is not None:
                peers.append(peer)
        return answers

    try:
        seven = await sessions("127.0.0.7", 15, "seven")
        local = await sessions("127.0.0.1", 12, "local")
        print(f"\nATTACK behind a proxy ({mode}): 10.0.0.7 got {seven.count('welcome')} of 15, "
              f"127.0.0.1 (forwarded) {local.count('welcome')} of 12; answers {seven} {local}")
        assert 1 <= seven.count("welcome") <= 10, seven
        assert 1 <= local.count("welcome") <= 10, local
        peer, event = await login(HOST, proxy.port, "eight", "127.0.0.8")
        assert event["type"] == "welcome", f"10.0.0.8 behind the proxy was refused: {event}"
        peers.append(peer)
        assert_up(process)
    finally:
        for peer in peers:
            peer.close()
        await proxy.stop()


# ---- 4. CPU per address --------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_flooder_is_closed_at_once_and_its_group_waits_the_flood_penalty(chat_process):
    """Attack: a client from 127.0.0.2 sends a line every 2 ms and keeps sending after `flooding`,
    never answering the close (issue 20: it was closed only about 5 s later, and reconnected: 4 such
    connections held a core at 100% for 20 s). Bound: the connection is closed within 2 s of the
    `flooding` error; a login from 127.0.0.2 during --flood-penalty (default 10 s) gets `flooding`
    with `retry_after` and close 4029; a login from 127.0.0.3 is fine."""
    process, port = start(chat_process)
    flooder, event = await login(HOST, port, "mallory", "127.0.0.2")
    assert event["type"] == "welcome"
    flooder.answer_close = False  # it never answers the close frame: it only sends
    told_at = closed_at = None
    sending = True

    async def keep_sending() -> None:
        while sending and not flooder.hung_up():
            flooder.send_nowait(masked_frame(OPCODE_TEXT, b"spam"))
            await asyncio.sleep(0.002)

    sender = asyncio.ensure_future(keep_sending())
    started = time.monotonic()
    try:
        while time.monotonic() < started + 10:
            try:
                event = await flooder.read_event(timeout=10)
            except asyncio.TimeoutError:
                break
            if event is None:
                closed_at = time.monotonic()
                break
            if event.get("code") == "flooding" and told_at is None:
                told_at = time.monotonic()
    finally:
        sending = False
        await sender
        flooder.close()
    assert told_at is not None, "never told `flooding`"
    assert closed_at is not None, "not closed within 10 s"
    print(f"\nATTACK flooder that never answers the close: closed {closed_at - told_at:.2f} s after `flooding`")
    assert closed_at - told_at < 2.0
    again, event = await login(HOST, port, "mallory2", "127.0.0.2")
    assert event["type"] == "error" and event["code"] == "flooding", event
    assert 0 < event["retry_after"] <= 10, event
    assert await again.closed() == 4029
    await assert_newcomer_gets_in(port, "127.0.0.3", "carol")
    assert_up(process)


@pytest.mark.gen_test(timeout=30)
async def test_http_requests_are_rate_limited_per_address_group(chat_process):
    """Attack: 3 kept-alive connections from 127.0.0.2 loop `GET /status` and `GET /` (issue 20: 10
    such connections got 992 requests/s, 362 MB in 10 s, 100% CPU). Bound: --http-rate (default 10 a
    second, bursts of 20) per group: at most 20 + 10 a second answered with 200; the first over it
    gets 429 with Retry-After, and its connection is closed; 127.0.0.3 is still served."""
    process, port = start(chat_process)
    connections = [await KeepAlive.open(HOST, port, "127.0.0.2") for _ in range(3)]
    statuses, started = [], time.monotonic()
    try:
        for number in range(60):
            client = connections[number % 3]
            answer = await client.get("/status" if number % 2 else "/")
            if answer is None:
                statuses.append("closed")
                continue
            statuses.append(answer[0])
            if answer[0] == 429:
                assert "retry-after" in answer[1], answer[1]
                assert await client.read_response(timeout=2) is None, "still open after a 429"
        elapsed = time.monotonic() - started
        served = statuses.count(200)
        print(f"\nATTACK 60 HTTP requests from one address in {elapsed:.2f} s: {served} served, "
              f"{statuses.count(429)} x 429, {statuses.count('closed')} on closed connections")
        assert 429 in statuses, statuses
        assert served <= 20 + 10 * elapsed + 1, statuses
        answer = await http_request(HOST, port, "/", "127.0.0.3")
        assert answer is not None and answer[0] == 200
        await assert_newcomer_gets_in(port, "127.0.0.4", "carol")
        assert_up(process)
    finally:
        for client in connections:
            client.close()


@pytest.mark.gen_test(timeout=30)
async def test_one_kept_alive_connection_is_closed_after_100_requests(chat_process):
    """Attack: one kept-alive connection from 127.0.0.2 sends 150 `GET /status` one after another,
    with --http-rate=0 (per-group rate off). Bound: at most 100 requests on one connection, then it
    is closed."""
    process, port = start(chat_process, "--http-rate=0")
    client = await KeepAlive.open(HOST, port, "127.0.0.2")
    served = 0
    try:
        for _ in range(150):
            answer = await client.get("/status")
            if answer is None:
                break
            served += answer[0] == 200
        print(f"\nATTACK 150 requests on one kept-alive connection: {served} served")
        assert served <= 100 and client.peer.eof
        await assert_newcomer_gets_in(port, "127.0.0.3", "carol")
        assert_up(process)
    finally:
        client.close()


@pytest.mark.gen_test(timeout=20)
async def test_the_page_has_an_etag_and_a_reload_gets_304_without_a_body(chat_process):
    """A reload costs little: `GET /` answers with an ETag; `If-None-Match` with it gets 304, no body."""
    process, port = start(chat_process)
    status, headers, body = await http_request(HOST, port, "/", "127.0.0.2")
    assert status == 200 and body and "etag" in headers, headers
    status, _, body = await http_request(HOST, port, "/", "127.0.0.2", {"If-None-Match": headers["etag"]})
    print(f"\nETag {headers['etag']}: the reload got {status}, {len(body)} bytes")
    assert (status, body) == (304, b"")


class SilentConnection:
    """A stand-in connection for a user made through the manager: it drops what it is sent."""

    address = "127.0.0.1"

    def send(self, outbound) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass


@pytest.mark.limits(max_per_address=0, max_connections=0)
@pytest.mark.gen_test(timeout=30)
async def test_status_stays_small_with_2000_users_online(chat_server):
    """Attack: kept-alive `GET /status` with many users online (issue 20: 119 KB a reply with 10,000
    users, every name; 1.94 GB out in 10 s). Bound: with 2,000 users, the body is under 16 KB: at
    most 200 names in `users`, and `user_count` gives the total."""
    for number in range(2000):
        chat_server.manager.connect(f"user{number:04d}", "", SilentConnection())
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"http://127.0.0.1:{chat_server.port}/status")
    report = json.loads(response.body)
    print(f"\nATTACK /status with 2,000 users: {len(response.body):,} bytes, {len(report['users'])} names")
    assert len(response.body) < 16 * 1024
    assert len(report["users"]) <= 200 and report["user_count"] == 2000
    newcomer = await chat_server.join("newcomer")
    await newcomer.say("hello")
    assert (await newcomer.expect("message"))["text"] == "hello"


# ---- 5. a busy room cannot starve the others -----------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_busy_room_of_200_senders_never_refuses_a_user_in_another_room(chat_process):
    """Attack: 200 users from 200 addresses (127.0.1.1-200) in #busy, each sending 5 lines a second
    (the default rate) for 6 s (issue 20: a user in a quiet room saw p90 59-1,870 ms, max 3.3-4.0 s,
    and a lobby user was refused "room busy"). Bound: a bystander in #quiet and one in the lobby are
    never refused and every line of theirs comes back (each within 5 s). The latencies are measured by
    tests/attack_doors.py, not asserted here."""
    process, port = start(chat_process, "--ping-interval=0")
    flood = subprocess.Popen([sys.executable, str(HARNESS), "busy-room", "--host", HOST, "--port", str(port),
                              "--senders", "200", "--seconds", "6"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    quiet = lobby = None
    try:
        ready = await asyncio.get_running_loop().run_in_executor(None, flood.stdout.readline)
        assert ready.strip() == "ready", f"the flood did not start: {ready} {flood.stderr.read()[-2000:]}"
        quiet, event = await login(HOST, port, "quietly", "127.0.2.1")
        assert event["type"] == "welcome", event
        await quiet.say("/join quiet")
        await quiet.expect("joined", room="quiet")
        lobby, event = await login(HOST, port, "lobbyist", "127.0.2.2")
        assert event["type"] == "welcome", event
        await lobby.expect("joined")
        quiet_ms, lobby_ms = await asyncio.gather(echo_probe(quiet, 16, 0.25), echo_probe(lobby, 8, 0.5))
        outcome = json.loads((await asyncio.get_running_loop().run_in_executor(None, flood.communicate))[0]
                             .strip().splitlines()[-1])
        print(f"\nATTACK 200 senders in #busy: {outcome}; #quiet echo max {max(quiet_ms):.0f} ms, "
              f"lobby echo max {max(lobby_ms):.0f} ms")
        assert len(quiet_ms) == 16 and len(lobby_ms) == 8
        assert outcome["deliveries"] > 0 and outcome["closed"] == 0, outcome  # the flood did run
        assert_up(process)
    finally:
        for peer in (quiet, lobby):
            if peer is not None:
                peer.close()
        if flood.poll() is None:
            flood.kill()
            flood.communicate()


# ---- 6. held sessions cannot squat ---------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_resume_and_drop_cannot_hold_a_name_past_twice_the_grace(chat_process):
    """Attack: with --resume-grace=1, one address (127.0.0.2) logs in as alice, bob and carol, drops,
    and every 0.7 s resumes each and drops again (issue 20: one address kept 10 names indefinitely;
    the real alice was refused 20 of 20 tries). Bound: a held name is released after 2 x the grace of
    held time in total: the real alice, bob and carol (fresh logins, no token, from 127.0.0.3-5,
    trying every 0.25 s) are in within 2 x 1 s + 2 s of the first drop."""
    process, port = start(chat_process, "--resume-grace=1")
    names = ["alice", "bob", "carol"]
    tokens = {}
    for name in names:
        peer, event = await login(HOST, port, name, "127.0.0.2")
        assert event["type"] == "welcome", event
        tokens[name] = event["token"]
        peer.drop()
    first_drop, squatting = time.monotonic(), True
    answers: dict[str, list] = {name: [] for name in names}

    async def squat(name: str) -> None:  # each name resumed every 0.7 s: 4.3 a second, under --handshake-rate
        while squatting and tokens.get(name):
            peer, event = await login(HOST, port, name, "127.0.0.2", token=tokens[name])
            answers[name].append(event.get("code", event["type"]))
            if event["type"] == "welcome":
                tokens[name] = event["token"]
                peer.drop()
            elif event["type"] == "refused":  # shut at the door: the token is still good, try again
                await asyncio.sleep(0.1)
                continue
            else:  # bad_token: the session is gone
                tokens[name] = None
                if peer is not None:
                    peer.close()
            await asyncio.sleep(0.7)

    real_in: dict[str, float] = {}

    async def real_user(name: str, source: str) -> None:
        while time.monotonic() < first_drop + 2 * 1 + 2:
            peer, event = await login(HOST, port, name, source)
            if event["type"] == "welcome":
                real_in[name] = time.monotonic() - first_drop
                peer.close()
                return
            if peer is not None:
                peer.close()
            await asyncio.sleep(0.25)

    squatters = [asyncio.ensure_future(squat(name)) for name in names]
    try:
        await asyncio.gather(*(real_user(name, f"127.0.0.{3 + number}") for number, name in enumerate(names)))
    finally:
        squatting = False
        await asyncio.gather(*squatters)
    print(f"\nATTACK resume-and-drop, resume_grace=1: the real users got in after {real_in}; "
          f"the squatter's resumes {[len(a) for a in answers.values()]}")
    assert sorted(real_in) == sorted(names), f"still squatted: {set(names) - set(real_in)}"
    assert_up(process)


@pytest.mark.limits(max_rooms=5)
@pytest.mark.gen_test(timeout=30)
async def test_rooms_kept_alive_only_by_held_sessions_do_not_stop_a_live_user_opening_one(chat_server):
    """Attack: with --max-rooms=5, three users each open a room and drop without a close frame
    (held for resume), and a fourth room has a live member and a held one: lobby + 4 = 5 rooms
    (issue 20: held sessions from many addresses filled --max-rooms, and a real user could not open
    a room for the grace period). Bound: a live user's `/join newroom` succeeds; the held sessions
    of a room with no live member end to make space; the room with a live member stays."""
    for number in range(3):
        ghost = await chat_server.join(f"ghost{number}")
        await ghost.say(f"/join haunted{number}")
        await ghost.expect("joined", room=f"haunted{number}")
        ghost.drop()
    erin, ghost = await chat_server.join("erin"), await chat_server.join("ghost9")
    for member in (erin, ghost):
        await member.say("/join lived")
        await member.expect("joined", room="lived")
    ghost.drop()
    await wait_until(lambda: chat_server.manager.status()["sessions_held"] == 4, "four sessions held")
    assert len(chat_server.manager.status()["rooms"]) + chat_server.manager.status()["more_rooms"] == 5
    dave = await chat_server.join("dave")
    await dave.say("/join newroom")
    replies = [event for event in await dave.sync() if event["type"] in ("joined", "error")]
    print(f"\nATTACK held sessions keep 4 rooms, max_rooms=5: /join newroom got {replies}")
    assert [(event["type"], event.get("room")) for event in replies] == [("joined", "newroom")]
    rooms = {room["name"] for room in chat_server.manager.status()["rooms"]}
    assert {"lived", "newroom", "lobby"} <= rooms
    await erin.say("still here")
    assert (await erin.expect("message"))["text"] == "still here"
