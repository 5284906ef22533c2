"""A start-up hook that makes this Python look like another platform to chat.py and client.py.

Python imports `sitecustomize` at start-up from the first directory on its path that
has one, so a test runs a program with this directory on PYTHONPATH to change what
the program finds. Only the product's own code (chat.py and client.py) is fooled:
Tornado, blessed and the standard library keep what they need, as they would on the
real platform, where they have their own ways round the missing pieces.

STANDIN_WINDOWS=1, what the product meets on Windows:
- the Unix-only modules (resource, termios, fcntl, tty ...) cannot be imported;
- the `signal` module has only the signals Windows has, plus SIGBREAK (Ctrl-Break),
  played here by SIGTTIN, a signal nothing else in these tests sends;
- the loop's add_signal_handler and add_reader (and their kin) raise
  NotImplementedError, as Windows' ProactorEventLoop does.

STANDIN_RLIMIT="SOFT,HARD,MOST", the open-file limit of another system: the
`resource` module reports (SOFT, HARD) ("inf" is RLIM_INFINITY) and refuses any
soft limit above MOST with the ValueError macOS gives (MOST=0: every raise is
refused). Each limit it accepts is appended to the file STANDIN_RLIMIT_LOG.
"""

import asyncio.selector_events
import builtins
import functools
import os
import signal
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PRODUCT_FILES = {str(ROOT / "chat.py"), str(ROOT / "client.py")}

UNIX_ONLY_MODULES = {"resource", "termios", "fcntl", "tty", "pty", "grp", "pwd", "posix", "syslog",
                     "curses", "readline", "crypt", "nis", "spwd"}

# What `signal` offers on Windows (the CTRL_* events and SIGBREAK aside, which Linux lacks).
WINDOWS_SIGNAL_NAMES = ["SIGABRT", "SIGFPE", "SIGILL", "SIGINT", "SIGSEGV", "SIGTERM", "SIG_DFL", "SIG_IGN",
                        "NSIG", "Handlers", "Signals", "default_int_handler", "getsignal", "raise_signal",
                        "set_wakeup_fd", "signal", "strsignal", "valid_signals"]
STANDIN_SIGBREAK = getattr(signal, "SIGTTIN", None)


@functools.lru_cache(maxsize=None)
def is_product(filename: object) -> bool:
    """Whether code from this file is chat.py's or client.py's."""
    return isinstance(filename, str) and str(Path(filename).resolve()) in PRODUCT_FILES


def windows_signal_module() -> types.ModuleType:
    """A `signal` module with only what Windows has, SIGBREAK included."""
    module = types.ModuleType("signal", signal.__doc__)
    for name in WINDOWS_SIGNAL_NAMES:
        if hasattr(signal, name):
            setattr(module, name, getattr(signal, name))
    module.SIGBREAK = STANDIN_SIGBREAK
    return module


def hide_unix_modules() -> None:
    """chat.py and client.py cannot import the Unix-only modules, and see Windows' `signal`."""
    real_import, windows_signal = builtins.__import__, windows_signal_module()

    def product_import(name, globals=None, locals=None, fromlist=(), level=0):
        """The import statement, as chat.py and client.py would meet it on Windows."""
        if level == 0 and globals and is_product(globals.get("__file__")):
            if name.partition(".")[0] in UNIX_ONLY_MODULES:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            if name == "signal":
                return windows_signal
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = product_import


def refuse_to_product(method):
    """Wrap a loop method so that calls from chat.py or client.py raise NotImplementedError."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        """NotImplementedError for the product, as on Windows; the real method for everyone else."""
        if is_product(sys._getframe(1).f_code.co_filename):
            raise NotImplementedError(f"{method.__name__} is not available on this loop (a Windows stand-in)")
        return method(self, *args, **kwargs)
    return wrapper


def windows_loops() -> None:
    """The loop cannot watch signals or file descriptors for chat.py and client.py (Tornado still can)."""
    import asyncio.unix_events

    for cls, names in ((asyncio.selector_events.BaseSelectorEventLoop,
                        ("add_reader", "remove_reader", "add_writer", "remove_writer")),
                       (asyncio.unix_events._UnixSelectorEventLoop,
                        ("add_signal_handler", "remove_signal_handler"))):
        for name in names:
            setattr(cls, name, refuse_to_product(getattr(cls, name)))


def rlimit_module(soft: int, hard: int, most: int, log: str) -> types.ModuleType:
    """A `resource` module whose open-file limit is (soft, hard) and which refuses a soft limit over `most`."""
    import resource

    fake = types.ModuleType("resource", "A stand-in for another system's open-file limit.")
    fake.RLIMIT_NOFILE, fake.RLIM_INFINITY, fake.error = resource.RLIMIT_NOFILE, resource.RLIM_INFINITY, OSError
    limits = {resource.RLIMIT_NOFILE: (soft, hard)}

    def getrlimit(which: int) -> tuple[int, int]:
        """The current (soft, hard) limit."""
        return limits.get(which) or resource.getrlimit(which)

    def setrlimit(which: int, new: tuple[int, int]) -> None:
        """Accept a soft limit up to `most` (and a hard limit no higher than before), as macOS does."""
        if which != resource.RLIMIT_NOFILE:
            return resource.setrlimit(which, new)
        (new_soft, new_hard), old_hard, infinite = new, limits[which][1], resource.RLIM_INFINITY
        if old_hard != infinite and (new_hard == infinite or new_hard > old_hard):
            raise ValueError("not allowed to raise maximum limit")
        if new_soft == infinite or new_soft > most or (new_hard != infinite and new_soft > new_hard):
            raise ValueError("current limit exceeds maximum limit")
        limits[which] = (new_soft, new_hard)
        with open(log, "a") as accepted:
            accepted.write(f"{new_soft} {'inf' if new_hard == infinite else new_hard}\n")

    fake.getrlimit, fake.setrlimit = getrlimit, setrlimit
    return fake


def limit(text: str) -> int:
    """A number of files, or "inf"."""
    import resource

    return resource.RLIM_INFINITY if text == "inf" else int(text)


if os.environ.get("STANDIN_WINDOWS") == "1":
    hide_unix_modules()
    windows_loops()

if os.environ.get("STANDIN_RLIMIT"):
    soft_text, hard_text, most_text = os.environ["STANDIN_RLIMIT"].split(",")
    sys.modules["resource"] = rlimit_module(limit(soft_text), limit(hard_text), int(most_text),
                                            os.environ["STANDIN_RLIMIT_LOG"])
