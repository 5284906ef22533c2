"""Issue 20's CPU attacks, measured: a bystander's latency, quiet and under each attack. (A measurement.)

Run it:      python tests/attack_doors.py                 (chat.py at its defaults, 5 s a phase)
             python tests/attack_doors.py --only busy-room --seconds 10
             python tests/attack_doors.py --flag=--room-budget=20000
Not a test:  pytest does not collect it (the name does not match test_*.py).

It starts `chat.py` on 127.0.0.1 (on a CPU of its own where there are two or more,
pings off, warnings only). A bystander from 127.0.3.1 in #quiet sends a line every
0.25 s and times its own echo. For each attack it measures a quiet baseline first,
then the same probe while the attack runs in a process of its own, and prints one
table: the bystander's p50 / p90 / max in both, the server's CPU during the attack,
how long it stayed busy after the attack ended (the next baseline waits for it),
whether a newcomer from another address got in half-way through, and what the
attack got. The
attacks, each bounded in count and time and from its own 127.x addresses:

  half-open    39 addresses x 10 half-open handshakes, re-opened as the server closes them
  flood        4 clients (4 addresses) that flood until closed and reconnect at once
  get-loop     10 kept-alive connections (one address) looping `GET /`
  pipelined    10 connections (one address) x 2,000 pipelined `GET /`, never read, closed
               after 2 s (the probe goes on after the close)
  status-loop  10 kept-alive connections looping `GET /status` with --status-users online
  busy-room    200 users (200 addresses) in #busy at 5 lines a second (the default rate)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from doors_harness import (  # noqa: E402  (after the path line above)
    OPCODE_TEXT,
    KeepAlive,
    Peer,
    cpu_seconds,
    echo_probe,
    get_request,
    login,
    masked_frame,
    percentile,
    upgrade_request,
    wait_listening,
)

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ATTACKS = ["half-open", "flood", "get-loop", "pipelined", "status-loop", "busy-room"]
PROBE_SECONDS = 0.25  # under the default rate limit (5 lines a second)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python tests/attack_doors.py", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=ATTACKS, help="run only this attack (repeatable)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase (default 5)")
    parser.add_argument("--status-users", type=int, default=900,
                        help="users online for status-loop (default 900; --max-connections is 1000)")
    parser.add_argument("--flag", action="append", default=[], help="a flag for chat.py (repeatable)")
    parser.add_argument("--child", choices=ATTACKS, help=argparse.SUPPRESS)  # run one attack (internal)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- the attacks, each in a child process: print "ready", attack for --seconds, print JSON ----


async def half_open(port: int, until: float) -> dict:
    held: dict[str, list[Peer]] = {f"127.0.0.{n}": [] for n in range(2, 41)}
    opened = 0

    async def keep_ten(source: str) -> None:
        nonlocal opened
        while time.monotonic() < until:
            for peer in [peer for peer in held[source] if peer.hung_up()]:
                peer.close()
                held[source].remove(peer)
            for _ in range(10 - len(held[source])):
                try:
                    peer = await Peer.open(HOST, port, source)
                except (OSError, asyncio.TimeoutError):
                    break
                peer.send_nowait(upgrade_request(HOST, port, "slow")[:40])
                held[source].append(peer)
                opened += 1
            await asyncio.sleep(0.2)

    await asyncio.gather(*(keep_ten(source) for source in held))
    still = sum(not peer.hung_up() for peers in held.values() for peer in peers)
    for peers in held.values():
        for peer in peers:
            peer.close()
    return {"got": f"{opened} opened, {still} open at the end"}


async def flood(port: int, until: float) -> dict:
    logins = closes = 0

    async def flooder(number: int) -> None:
        nonlocal logins, closes
        line, attempt = masked_frame(OPCODE_TEXT, b"spam"), 0
        while time.monotonic() < until:
            attempt += 1
            peer, event = await login(HOST, port, f"flood{number}x{attempt}", f"127.0.4.{1 + number}", timeout=2)
            if peer is None or event["type"] != "welcome":
                if peer is not None:
                    peer.close()
                await asyncio.sleep(0.05)
                continue
            logins += 1
            peer.answer_close = False

            async def drain() -> None:
                while await peer.receive(timeout=30):
                    peer.buffer = b""

            reading = asyncio.ensure_future(drain())
            while time.monotonic() < until and not peer.hung_up() and not reading.done():
                peer.send_nowait(line * 10)
                await asyncio.sleep(0.001)
            reading.cancel()
            closes += 1
            peer.close()

    await asyncio.gather(*(flooder(number) for number in range(4)))
    return {"got": f"{logins} logins, {closes} closed"}


async def get_loop(port: int, until: float, path: str = "/") -> dict:
    served = refused = 0
    received = 0

    async def loop() -> None:
        nonlocal served, refused, received
        client = None
        while time.monotonic() < until:
            if client is None or client.peer.eof:
                try:
                    client = await KeepAlive.open(HOST, port, "127.0.5.1")
                except (OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.05)
                    continue
            answer = await client.get(path)
            if answer is None:
                await asyncio.sleep(0.01)
                continue
            served += answer[0] == 200
            refused += answer[0] != 200
            received += len(answer[2])
        if client is not None:
            client.close()

    await asyncio.gather(*(loop() for _ in range(10)))
    return {"got": f"{served} served, {refused} refused, {received / 1e6:.0f} MB"}


async def pipelined(port: int, until: float) -> dict:
    peers, sent = [], 0
    for _ in range(10):
        peer = await Peer.open(HOST, port, "127.0.5.2", receive_buffer_bytes=16384)
        data, offset, stop = get_request(HOST, port, "/") * 2000, 0, time.monotonic() + 0.5
        while offset < len(data) and time.monotonic() < stop:
            offset += peer.send_nowait(data[offset:])
            await asyncio.sleep(0.005)
        sent += offset
        peers.append(peer)
    await asyncio.sleep(2)
    for peer in peers:
        peer.close()
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    return {"got": f"{sent / 1e3:.0f} kB pipelined, closed after 2 s"}


async def status_loop(port: int, until: float, users: list[Peer]) -> dict:
    result = await get_loop(port, until, "/status")
    for user in users:
        user.close()
    return result


async def child(args: argparse.Namespace) -> dict:
    port = args.port
    users = []
    if args.child == "status-loop":  # the users online: from this machine, exempt from per-address limits
        for number in range(args.status_users):
            peer, event = await login(HOST, port, f"online{number:05d}", HOST)
            assert event["type"] == "welcome", event
            users.append(peer)
    if args.child == "busy-room":
        raise SystemExit("busy-room runs tests/doors_harness.py busy-room")
    print("ready", flush=True)
    until = time.monotonic() + args.seconds
    if args.child == "status-loop":
        return await status_loop(port, until, users)
    return await {"half-open": half_open, "flood": flood, "get-loop": get_loop,
                  "pipelined": pipelined}[args.child](port, until)


# ---- the bystander, the phases and the table ------------------------------------------------


def start_attack(args: argparse.Namespace, name: str, port: int) -> subprocess.Popen:
    if name == "busy-room":
        command = [sys.executable, str(ROOT / "tests" / "doors_harness.py"), "busy-room", "--host", HOST,
                   "--port", str(port), "--senders", "200", "--seconds", str(args.seconds)]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--port", str(port),
                   "--seconds", str(args.seconds), "--status-users", str(args.status_users)]
    attack = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(attack.pid, sorted(os.sched_getaffinity(0))[1:])
    return attack


async def probe_for(peer: Peer, seconds: float) -> list[float] | str:
    try:
        return await echo_probe(peer, max(1, int(seconds / PROBE_SECONDS)), PROBE_SECONDS, timeout=10)
    except AssertionError as error:
        return "refused" if "refused" in str(error) else "closed"
    except asyncio.TimeoutError:
        return "an echo took over 10 s"


async def measure(args: argparse.Namespace, port: int, pid: int) -> list[dict]:
    bystander, event = await login(HOST, port, "bystander", "127.0.3.1")
    assert event["type"] == "welcome", event
    await bystander.say("/join quiet")
    await bystander.expect("joined", room="quiet")
    rows = []
    for number, name in enumerate(args.only or ATTACKS):
        quiet = await probe_for(bystander, args.seconds)
        attack = start_attack(args, name, port)
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, attack.stdout.readline)
        if ready.strip() != "ready":
            rows.append({"attack": name, "quiet": quiet, "under": f"did not start: {attack.stderr.read()[-200:]}"})
            continue
        cpu_before, started = cpu_seconds(pid), time.monotonic()
        newcomer = asyncio.ensure_future(late_newcomer(port, number, args.seconds / 2))
        under = await probe_for(bystander, args.seconds)
        elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu_before
        output, errors = await loop.run_in_executor(None, attack.communicate)
        try:
            outcome = json.loads(output.strip().splitlines()[-1])
        except (ValueError, IndexError):
            outcome = {"got": f"attack failed: {errors.strip()[-100:]}"}
        if name == "busy-room":
            outcome = {"got": f"{outcome['deliveries_per_second']:,} deliveries/s, "
                              f"{outcome['refused']:,} refused"}
        busy_after = await busy_for(pid)  # the next baseline starts once the server is idle again
        rows.append({"attack": name, "quiet": quiet, "under": under, "newcomer": await newcomer,
                     "cpu": 100 * cpu / elapsed, "busy_after": busy_after, **outcome})
    bystander.close()
    return rows


async def busy_for(pid: int, limit: float = 60.0) -> float:
    """Seconds until the server is idle (under 10% CPU over half a second), at most `limit`."""
    started = time.monotonic()
    while time.monotonic() < started + limit:
        before = cpu_seconds(pid)
        await asyncio.sleep(0.5)
        if cpu_seconds(pid) - before < 0.05:
            return time.monotonic() - started - 0.5
    return limit


async def late_newcomer(port: int, number: int, delay: float) -> str:
    """Half-way into an attack, someone from another address logs in."""
    await asyncio.sleep(delay)
    started = time.monotonic()
    peer, event = await login(HOST, port, f"newcomer{number}", f"127.0.6.{1 + number}", timeout=10)
    if peer is not None:
        peer.close()
    if event["type"] == "welcome":
        return f"in, {1000 * (time.monotonic() - started):.0f} ms"
    return event.get("code", "refused at the door")


def cells(latencies: list[float] | str) -> str:
    if isinstance(latencies, str):
        return f"{latencies:>26}"
    return f"{percentile(latencies, 0.5):7.1f} {percentile(latencies, 0.9):8.1f} {max(latencies):8.1f}"


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nbystander echo latency in ms, {args.seconds:g} s a phase (chat.py {' '.join(args.flag) or 'defaults'})")
    print(f"{'attack':<12} {'quiet p50':>9} {'p90':>8} {'max':>8} | {'attack p50':>10} {'p90':>8} {'max':>8} "
          f"| {'CPU':>4} | {'busy after':>10} | {'newcomer':<19} | what the attack got")
    for row in rows:
        print(f"{row['attack']:<12}   {cells(row['quiet'])} |    {cells(row['under'])} "
              f"| {row.get('cpu', 0):3.0f}% | {row.get('busy_after', 0):8.1f} s | {row.get('newcomer', ''):<19} "
              f"| {row.get('got', '')}")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        return
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), f"--port={port}", f"--address={HOST}",
                               "--logging=warning", "--ping-interval=0", *args.flag],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) >= 2:
        os.sched_setaffinity(server.pid, cpus[:1])
        os.sched_setaffinity(0, cpus[1:])
    try:
        asyncio.run(wait_listening(HOST, port))
        rows = asyncio.run(measure(args, port, server.pid))
        print_table(rows, args)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main(sys.argv[1:])
