"""A start-up hook that makes time run N times faster for the Python it is imported into.

Python imports `sitecustomize` at start-up from the first directory on its path that
has one, so a test starts a program (chat.py) with this directory on PYTHONPATH to
run its clock fast: two hours of the program's time pass in a minute of ours. Only
that program's clock changes; the test, the clients and the browser keep real time,
as they would in a lesson.

CHAT_CLOCK_SPEED=N (a number above 0; unset, empty or 1: nothing changes):
- `time.monotonic()` (and `time.monotonic_ns()`) return start + (real - start) * N,
  where start is the moment this hook ran: every duration the program measures on
  it is N times what really passed. The asyncio loop's clock (`loop.time()`, which
  Tornado's IOLoop and its WebSocket pings use) reads `time.monotonic`, so it runs
  fast too, as do chat.py's idle timer, its rate buckets and GET /status's uptime.
- Every selector the loop waits on (selectors.DefaultSelector, which asyncio's loop
  creates) waits timeout / N real seconds, so `loop.call_later(20, f)` and
  `asyncio.sleep(20)` end after 20 / N real seconds, 20 s by the program's clock.
  Waits for input with no timeout still wait until the input comes.
- `time.time()` is left alone, on purpose: message timestamps and log lines keep the
  true time of day, and chat.py measures no duration with it (only with monotonic).
  `time.sleep`, `time.perf_counter` and threads' timeouts are left alone too: chat.py
  does all its waiting on the loop.
- Only loops that wait on a selector are sped up (Unix, and Windows' SelectorEventLoop);
  Windows' default ProactorEventLoop waits elsewhere, so its timers keep real time
  (the tests that use this hook need a pseudo-terminal, and skip on Windows anyway).
"""

import os
import selectors
import time


def install(speed: float) -> None:
    """From now on monotonic time runs `speed` times faster, and the loop's waits are that much shorter."""
    real_monotonic = time.monotonic
    start = real_monotonic()

    def monotonic() -> float:
        """The fast clock: `speed` seconds for every real second since the hook ran."""
        return start + (real_monotonic() - start) * speed

    def monotonic_ns() -> int:
        """The fast clock in nanoseconds."""
        return int(monotonic() * 1e9)

    class FastSelector(selectors.DefaultSelector):
        """The platform's selector, waiting 1/speed of each timeout it is given."""

        def select(self, timeout=None):
            """Wait for the sockets at most timeout / speed real seconds (None: until one is ready)."""
            if timeout is not None and timeout > 0:
                timeout = timeout / speed
            return super().select(timeout)

    FastSelector.__name__ = FastSelector.__qualname__ = f"Fast{selectors.DefaultSelector.__name__}"
    time.monotonic, time.monotonic_ns = monotonic, monotonic_ns
    selectors.DefaultSelector = FastSelector


def clock_speed(text: str) -> float:
    """CHAT_CLOCK_SPEED's value as a number; 1 (no change) when it is empty."""
    speed = float(text or 1)
    if not speed > 0:
        raise ValueError(f"CHAT_CLOCK_SPEED must be a number above 0, not {text!r}")
    return speed


SPEED = clock_speed(os.environ.get("CHAT_CLOCK_SPEED", ""))
if SPEED != 1:
    install(SPEED)
