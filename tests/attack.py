"""One busy room against a quiet one: does the busy room starve the others? (A measurement.)

Run it:      python tests/attack.py                      (chat.py at its defaults, 200 x 5 lines/s)
             python tests/attack.py --flag=--room-budget=0   (the same without the room budget)
             python tests/attack.py --help
Not a test:  pytest does not collect it (the name does not match test_*.py).

It starts `chat.py` on 127.0.0.1 (on a CPU of its own where there are two or
more, pings off), puts N users in #busy, each sending R lines a
second (the default rate limit lets 5 through) for S seconds, and meanwhile a
probe in #quiet sends a line every 0.25 s and times its own echo. It prints the
probe's latency (p50, p90, max), how many of the busy room's lines were relayed
and refused, and the server's CPU. The flood clients read what they receive as raw
bytes (they never parse it), so they stay cheap; the whole load is bounded in
count and time, on this machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROBE_SECONDS = 0.25  # under the default rate limit (5 lines a second)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The sizes of the attack, and extra flags for chat.py."""
    parser = argparse.ArgumentParser(prog="python tests/attack.py", description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=200, help="users in the busy room (default 200)")
    parser.add_argument("--rate", type=float, default=5.0, help="lines a second each sends (default 5)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long they send (default 10)")
    parser.add_argument("--flag", action="append", default=[], help="a flag for chat.py (repeatable)")
    return parser.parse_args(argv)


def free_port() -> int:
    """A TCP port nobody is listening on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def masked_text_frame(text: str) -> bytes:
    """One client text frame (masked, as clients must)."""
    payload, mask = text.encode(), os.urandom(4)
    length = len(payload)
    header = bytes([0x81, 0x80 | length]) if length < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, length)
    return header + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


class Client:
    """A raw WebSocket client: it logs in, sends lines, and reads (or counts) what arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def join(cls, port: int, username: str, room: str) -> "Client":
        """Connect, do the handshake, and /join the room."""
        reader, writer = await asyncio.open_connection(HOST, port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws?username={username} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                     .encode())
        await reader.readuntil(b"\r\n\r\n")
        client = cls(reader, writer)
        client.say(f"/join {room}")
        return client

    def say(self, line: str) -> None:
        """Send one line."""
        self.writer.write(masked_text_frame(line))

    async def read_event(self) -> dict:
        """The next event (server frames are unmasked; pings are skipped, a close ends the run)."""
        while True:
            head = await self.reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(length)
            if head[0] & 0x0F == 0x8:
                raise SystemExit(f"the server closed the probe: {payload[:2].hex()} {payload[2:].decode()}")
            if head[0] & 0x0F == 0x1:
                return json.loads(payload)


async def flood(client: Client, rate: float, until: float, counts: dict) -> None:
    """Send `rate` lines a second until `until`, counting what comes back in the raw bytes."""
    async def read() -> None:
        while True:
            chunk = await client.reader.read(65536)
            if not chunk:
                return
            counts["relayed"] += chunk.count(b'"type":"message"')
            counts["refused"] += chunk.count(b'"code":"rate_limited"')

    reading = asyncio.ensure_future(read())
    while time.monotonic() < until:
        client.say("x" * 60)
        await asyncio.sleep(1 / rate)
    await asyncio.sleep(1)
    reading.cancel()


async def probe(client: Client, until: float) -> list[float]:
    """Send a line every PROBE_SECONDS and time its echo: the quiet room's latency, in ms."""
    latencies = []
    while time.monotonic() < until:
        sent = time.monotonic()
        client.say(f"probe {sent}")
        while True:
            event = await client.read_event()
            if event.get("type") == "error":
                raise SystemExit(f"the probe's line was refused: {event}")
            if event.get("type") == "message" and event.get("text") == f"probe {sent}":
                break
        latencies.append(1000 * (time.monotonic() - sent))
        await asyncio.sleep(max(0.0, PROBE_SECONDS - (time.monotonic() - sent)))
    return latencies


async def busy_room(args: argparse.Namespace, port: int, start: float, counts: dict) -> None:
    """The flood: every user joins #busy, and from `start` on sends its lines."""
    flooders = [await Client.join(port, f"busy{number}", "busy") for number in range(args.users)]
    await asyncio.sleep(max(0.0, start - time.time()))
    until = time.monotonic() + args.seconds
    await asyncio.gather(*(flood(client, args.rate, until, counts) for client in flooders))


def run_busy_room(args: argparse.Namespace, port: int, start: float, results) -> None:
    """In a process of its own, so the probe's timing is not the flood's: run the flood."""
    counts = {"relayed": 0, "refused": 0}
    asyncio.run(busy_room(args, port, start, counts))
    results.put(counts)


async def attack(args: argparse.Namespace, port: int, pid: int) -> None:
    """Start the flood (another process) and the probe together, then report."""
    results = multiprocessing.Queue()
    start = time.time() + 3 + args.users / 200  # the logins settle first
    flooders = multiprocessing.Process(target=run_busy_room, args=(args, port, start, results))
    flooders.start()
    quiet = await Client.join(port, "probe", "quiet")
    await asyncio.sleep(max(0.0, start - time.time()))
    cpu_before, load_before = cpu_seconds(pid), cpu_seconds(flooders.pid)
    latencies = await probe(quiet, time.monotonic() + args.seconds)
    cpu, load = cpu_seconds(pid) - cpu_before, cpu_seconds(flooders.pid) - load_before
    counts = results.get(timeout=30)
    flooders.join(timeout=10)
    latencies.sort()

    def at(share: float) -> float:
        """The latency below which this share of the probe's echoes came."""
        return latencies[min(len(latencies) - 1, int(share * len(latencies)))]

    print(f"{args.users} users x {args.rate:g} lines/s in #busy for {args.seconds:g} s "
          f"(chat.py {' '.join(args.flag) or 'defaults'}):")
    print(f"  #quiet's probe: {len(latencies)} echoes, latency p50 {at(0.5):.1f} ms, p90 {at(0.9):.1f} ms, "
          f"max {latencies[-1]:.1f} ms")
    print(f"  #busy: {counts['relayed']:,} deliveries, {counts['refused']:,} lines refused (rate_limited); "
          f"CPU in {args.seconds:g} s: server {cpu:.1f} s, flood {load:.1f} s")


def main(argv: list[str]) -> None:
    """Start chat.py, attack it, stop it."""
    args = parse_args(argv)
    port = free_port()
    # Keepalive off: these raw clients do not answer pings. The server gets a CPU of its own.
    server = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), f"--port={port}", f"--address={HOST}",
                               "--logging=warning", "--ping-interval=0", *args.flag], cwd=ROOT)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) >= 2:
        os.sched_setaffinity(server.pid, cpus[:1])
        os.sched_setaffinity(0, cpus[1:])  # this process and the flood's: the other CPUs
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "chat.py did not start"
                time.sleep(0.05)
        asyncio.run(attack(args, port, server.pid))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main(sys.argv[1:])
