"""Part II's collaborators alone: each rule of sections 9-14 checked without a server.

FloodGuard, SessionStore and IdleTimer get a clock and timers the test moves by hand;
the pure functions (address groups, the frame builder, close frames, visible text,
room lists) are checked from tables. One behaviour per test, named for it.
"""

import asyncio
import errno
import socket
import struct
import time
from collections import deque

import pytest
import tornado.httputil
from tornado.ioloop import IOLoop

import chat

# ---- helpers --------------------------------------------------------------------------


class FakeClock:
    """A steady clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTimer:
    """What call_later returns: the delay and callback, and whether it was cancelled."""

    def __init__(self, delay: float, callback):
        self.delay, self.callback, self.cancelled = delay, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    """call_later that records each timer; the test fires them by hand."""

    def __init__(self):
        self.made: list[FakeTimer] = []

    def __call__(self, delay: float, callback) -> FakeTimer:
        self.made.append(FakeTimer(delay, callback))
        return self.made[-1]

    def fire_last(self) -> None:
        """Run the newest timer's callback, as the loop would when its delay is over."""
        self.made[-1].callback()


def crowd_user(name: str = "alice", token: str = "t", limits: chat.CrowdLimits = chat.CrowdLimits(),
               now: float = 0.0) -> chat.CrowdUser:
    """A logged-in user with a full bucket (no connection: the collaborators never touch it)."""
    return chat.CrowdUser(name, token, None, bucket=chat.FloodGuard(limits).new_bucket(now))


def room_of(name: str, size: int) -> chat.Room:
    """A room with `size` members."""
    members = {f"u{i}": chat.User(f"u{i}", f"t{i}", None) for i in range(size)}
    return chat.Room(name, members)


def message(seq: int) -> chat.Outbound:
    """A delivered chat message with this seq."""
    return chat.Outbound({"type": "message", "text": f"line {seq}", "seq": seq})


# ---- 11. FloodGuard: the user's bucket, the 4029 rule, the room and server budgets ----


def test_frames_within_the_burst_are_admitted():
    """A user may send --rate-burst frames at once: each takes a token and is admitted."""
    limits = chat.CrowdLimits(rate_per_second=1, rate_burst=3)
    guard, user = chat.FloodGuard(limits), crowd_user(limits=limits)
    assert [guard.admit_frame(user, 0.0) for _ in range(3)] == [True, True, True]


def test_the_first_frame_over_the_rate_is_refused_with_when_to_try_again():
    """The first frame the bucket cannot pay gets `rate_limited` with `retry_after` in seconds."""
    limits = chat.CrowdLimits(rate_per_second=2, rate_burst=1)
    guard, user = chat.FloodGuard(limits), crowd_user(limits=limits)
    guard.admit_frame(user, 0.0)
    with pytest.raises(chat.Refusal) as refused:
        guard.admit_frame(user, 0.0)
    assert refused.value.code == "rate_limited" and refused.value.close_code is None
    assert refused.value.extra["retry_after"] == 0.5


def test_frames_after_the_warning_are_dropped_unanswered_for_a_bursts_worth():
    """After `rate_limited`, --rate-burst more frames are dropped silently (False, no refusal)."""
    limits = chat.CrowdLimits(rate_per_second=1, rate_burst=2)
    guard, user = chat.FloodGuard(limits), crowd_user(limits=limits)
    guard.admit_frame(user, 0.0), guard.admit_frame(user, 0.0)
    with pytest.raises(chat.Refusal):
        guard.admit_frame(user, 0.0)
    assert [guard.admit_frame(user, 0.0) for _ in range(2)] == [False, False]


def test_a_user_who_keeps_sending_after_the_warning_is_closed_with_4029():
    """One frame past the burst's worth of patience is `flooding`, close code 4029."""
    limits = chat.CrowdLimits(rate_per_second=1, rate_burst=2)
    guard, user = chat.FloodGuard(limits), crowd_user(limits=limits)
    guard.admit_frame(user, 0.0), guard.admit_frame(user, 0.0)
    with pytest.raises(chat.Refusal):
        guard.admit_frame(user, 0.0)
    guard.admit_frame(user, 0.0), guard.admit_frame(user, 0.0)
    with pytest.raises(chat.Refusal) as closed:
        guard.admit_frame(user, 0.0)
    assert closed.value.code == "flooding" and closed.value.close_code == chat.CLOSE_FLOODING


def test_an_admitted_frame_forgives_earlier_strikes():
    """Once the bucket pays for a frame again, the count towards 4029 starts from zero."""
    limits = chat.CrowdLimits(rate_per_second=1, rate_burst=1)
    guard, user = chat.FloodGuard(limits), crowd_user(limits=limits)
    guard.admit_frame(user, 0.0)
    with pytest.raises(chat.Refusal):
        guard.admit_frame(user, 0.0)
    assert guard.admit_frame(user, 5.0) and user.strikes == 0
    with pytest.raises(chat.Refusal) as warned_again:  # a warning again, not a close
        guard.admit_frame(user, 5.0)
    assert warned_again.value.code == "rate_limited"


def test_a_message_costs_its_room_one_delivery_per_member():
    """A line to a room of N members takes N of its --room-budget (a tenth of a second's worth at once)."""
    guard = chat.FloodGuard(chat.CrowdLimits(room_budget=1000, server_budget=0))  # burst: 100
    guard.charge_room(room_of("general", 60), now=0.0)
    with pytest.raises(chat.Refusal) as refused:
        guard.charge_room(room_of("general", 60), now=0.0)
    assert refused.value.code == "rate_limited" and "#general is busy" in refused.value.text


def test_each_room_has_a_budget_of_its_own():
    """One busy room does not spend another room's budget."""
    guard = chat.FloodGuard(chat.CrowdLimits(room_budget=1000, server_budget=0))
    guard.charge_room(room_of("busy", 100), now=0.0)
    guard.charge_room(room_of("other", 100), now=0.0)  # no refusal


def test_a_room_budget_of_zero_refuses_nothing():
    """--room-budget=0 switches the room budget off."""
    guard = chat.FloodGuard(chat.CrowdLimits(room_budget=0, server_budget=0))
    for _ in range(100):
        guard.charge_room(room_of("general", 10_000), now=0.0)
    assert guard.room_budgets == {}


def test_busy_rooms_share_the_server_budget():
    """A room past half its own budget also pays the server's; when that is spent, the line is refused."""
    guard = chat.FloodGuard(chat.CrowdLimits(room_budget=1000, server_budget=100))  # server burst: 10
    room, now = room_of("busy", 6), time.monotonic()  # the server's bucket runs on the steady clock
    for _ in range(8):  # 48 of the room's 100: half full is not yet busy ...
        guard.charge_room(room, now)
    guard.charge_room(room, now)  # ... now it is: 6 of the server's 10
    with pytest.raises(chat.Refusal) as refused:
        guard.charge_room(room, now)
    assert "the server is busy" in refused.value.text


def test_a_quiet_room_is_never_refused_for_what_busy_rooms_spent():
    """A room whose own bucket is at least half full never pays the server's budget."""
    guard = chat.FloodGuard(chat.CrowdLimits(room_budget=1000, server_budget=100))
    guard.server_budget = chat.TokenBucket(100, 10, 0, 0.0)  # the busy rooms spent it all
    guard.charge_room(room_of("quiet", 40), now=0.0)  # 60 of 100 left: still quiet, no refusal


def test_a_room_that_disappears_takes_its_budget_along():
    """forget_room drops the room's bucket, so a new room of that name starts full."""
    guard = chat.FloodGuard(chat.CrowdLimits(room_budget=1000, server_budget=0))
    guard.charge_room(room_of("general", 100), now=0.0)
    guard.forget_room("general")
    guard.forget_room("never-had-one")  # no error
    guard.charge_room(room_of("general", 100), now=0.0)  # a full bucket again: no refusal


# ---- 12. IdleTimer ------------------------------------------------------------------------


def test_the_idle_timer_fires_once_nothing_was_typed_for_the_timeout():
    """Nothing typed for `timeout` seconds: on_idle is called."""
    clock, timers, fired = FakeClock(), FakeTimers(), []
    chat.IdleTimer(60.0, lambda: fired.append(clock.now), clock, timers)
    assert timers.made[0].delay == 60.0
    clock.now += 60.0
    timers.fire_last()
    assert fired == [1060.0]


def test_a_typed_line_puts_the_idle_timeout_off():
    """A touch restarts the idle time: the timer looks again when the user could next be idle."""
    clock, timers, fired = FakeClock(), FakeTimers(), []
    timer = chat.IdleTimer(60.0, lambda: fired.append(clock.now), clock, timers)
    clock.now += 40.0
    timer.touch()
    clock.now += 20.0
    timers.fire_last()  # 60 s after arming, but only 20 s since the line
    assert fired == [] and timers.made[-1].delay == 40.0
    clock.now += 40.0
    timers.fire_last()
    assert fired == [1100.0]


def test_a_cancelled_idle_timer_stops_its_loop_timer():
    """cancel() (the connection closed) cancels the timer on the loop."""
    timers = FakeTimers()
    chat.IdleTimer(60.0, lambda: None, FakeClock(), timers).cancel()
    assert timers.made[-1].cancelled


# ---- 13. SessionStore ---------------------------------------------------------------------


def stored_user(store: chat.SessionStore, name: str = "alice", address: str | None = "10.0.0.1"):
    """A new session added to the store."""
    user = chat.CrowdUser(name, store.new_token(), None)
    store.add(user, address)
    return user


def test_a_token_names_its_session():
    """find() returns the session a token names, for its username in any case."""
    store = chat.SessionStore(chat.CrowdLimits())
    user = stored_user(store, "Alice")
    assert store.find("aLICE", user.token) is user and store.find("", user.token) is user


@pytest.mark.parametrize("username, token", [("alice", "nonsense"), ("bob", None)],
                         ids=["unknown token", "someone else's token"])
def test_an_unknown_or_foreign_token_is_refused_with_4004(username, token):
    """A token nobody has, or another user's, is `bad_token` with close code 4004."""
    store = chat.SessionStore(chat.CrowdLimits())
    alice = stored_user(store)
    with pytest.raises(chat.Refusal) as refused:
        store.find(username, token or alice.token)
    assert refused.value.code == "bad_token" and refused.value.close_code == chat.CLOSE_BAD_TOKEN


def test_a_token_from_before_a_restart_is_logged_as_a_return():
    """A token without this run's mark is refused, and the log calls it a return after a restart."""
    store = chat.SessionStore(chat.CrowdLimits())
    earlier = chat.SessionStore(chat.CrowdLimits()).new_token()
    with pytest.raises(chat.Refusal) as refused:
        store.find("alice", earlier)
    assert refused.value.log_as == "alice came back after a restart"
    with pytest.raises(chat.Refusal) as expired:
        store.find("alice", store.new_token())  # this run's, but expired
    assert expired.value.log_as == ""


def test_a_used_token_dies_and_the_session_gets_a_new_one():
    """renew_token: the old token is refused from then on, the new one names the session."""
    store = chat.SessionStore(chat.CrowdLimits())
    user = stored_user(store)
    old = user.token
    store.renew_token(user)
    assert user.token != old and store.find("alice", user.token) is user
    with pytest.raises(chat.Refusal):
        store.find("alice", old)


def test_sessions_are_counted_per_address_group_and_refused_past_the_share():
    """--max-per-address sessions from one group; one more is `address_full` (4005)."""
    store = chat.SessionStore(chat.CrowdLimits(max_per_address=2))
    stored_user(store, "a"), stored_user(store, "b")
    store.check_address("10.0.0.2")  # another group: room left
    with pytest.raises(chat.Refusal) as refused:
        store.check_address("10.0.0.1")
    assert refused.value.code == "address_full" and refused.value.close_code == chat.CLOSE_ADDRESS_FULL


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", None])
def test_this_machine_is_exempt_from_the_per_address_share(address):
    """Sessions from the server's own machine (or a test without a socket) are never address_full."""
    store = chat.SessionStore(chat.CrowdLimits(max_per_address=1))
    stored_user(store, "a", address), stored_user(store, "b", address)
    store.check_address(address)


def test_a_session_that_moves_or_ends_is_counted_against_its_new_group_only():
    """move() takes the session off its old group (forgetting a group at 0), end() off any."""
    store = chat.SessionStore(chat.CrowdLimits())
    user = stored_user(store, address="10.0.0.1")
    store.move(user, "10.0.0.2")
    assert store.per_address == {"10.0.0.2": 1}
    store.end(user, now=0.0)
    assert store.per_address == {} and user.token not in store.by_token


def test_messages_are_numbered_in_order():
    """Each message gets the next seq."""
    store = chat.SessionStore(chat.CrowdLimits())
    events = [{"type": "message"} for _ in range(3)]
    for event in events:
        store.number(event)
    assert [event["seq"] for event in events] == [1, 2, 3] and store.seq == 3


def test_only_the_newest_messages_are_kept_for_replay():
    """A user keeps the last REPLAY_LIMIT_MESSAGES; the seqs of older ones are kept for `lost`."""
    store, user = chat.SessionStore(chat.CrowdLimits()), chat.CrowdUser("alice", "t", None)
    for seq in range(1, chat.REPLAY_LIMIT_MESSAGES + 6):
        store.remember(user, message(seq))
    assert [o.event["seq"] for o in user.history][0] == 6 and list(user.forgotten) == [1, 2, 3, 4, 5]


def test_the_seqs_kept_for_lost_are_bounded():
    """Past 2 x LOST_COUNT_LIMIT forgotten seqs, the oldest LOST_COUNT_LIMIT go: `lost` is then "at least"."""
    store, user = chat.SessionStore(chat.CrowdLimits()), chat.CrowdUser("alice", "t", None)
    user.history = deque((message(s) for s in range(1, 101)), maxlen=chat.REPLAY_LIMIT_MESSAGES)
    user.forgotten = chat.array("q", range(-2 * chat.LOST_COUNT_LIMIT + 1, 1))
    store.remember(user, message(101))
    assert len(user.forgotten) == chat.LOST_COUNT_LIMIT + 1 and user.forgotten[-1] == 1


def test_a_resume_replays_what_came_after_the_clients_last_seq_and_counts_what_is_lost():
    """replay(last_seq) gives the kept messages after it; `lost` counts the later ones no longer kept."""
    store, user = chat.SessionStore(chat.CrowdLimits()), chat.CrowdUser("alice", "t", None)
    for seq in range(1, chat.REPLAY_LIMIT_MESSAGES + 11):  # 1-10 forgotten, 11-110 kept
        store.remember(user, message(seq))
    missed = store.replay(user, last_seq=7)
    assert len(missed) == 100 and missed[0].event["seq"] == 11 and user.lost == 3
    assert [o.event["seq"] for o in store.replay(user, last_seq=108)] == [109, 110] and user.lost == 0


def test_a_client_that_does_not_say_its_last_seq_gets_what_came_while_held():
    """No last_seq: a held session replays what came after it was held; an online one, nothing."""
    store, user = chat.SessionStore(chat.CrowdLimits()), chat.CrowdUser("alice", "t", None)
    for seq in (1, 2, 3):
        store.remember(user, message(seq))
    store.seq, user.held_at_seq = 3, 1
    assert [o.event["seq"] for o in store.replay(user, None)] == [2, 3]
    user.connection = object()  # online: nothing was missed
    assert store.replay(user, None) == []


def test_a_held_session_gets_the_resume_grace_and_a_timer():
    """hold(): the session is held for --resume-grace seconds, and a timer will end it."""
    store, timers = chat.SessionStore(chat.CrowdLimits(resume_grace=30)), FakeTimers()
    user, ended = stored_user(store), []
    over = store.hold(user, now=100.0, expire=lambda: ended.append(user), call_later=timers)
    assert over == [] and user in store.held and user.held_until == 130.0
    assert timers.made[-1].delay == 30.0
    timers.fire_last()
    assert ended == [user]


def test_a_session_is_held_for_at_most_twice_the_grace_over_all_its_drops():
    """Each drop's grace is what is left of 2 x --resume-grace; with none left it may not be held."""
    store, timers = chat.SessionStore(chat.CrowdLimits(resume_grace=30)), FakeTimers()
    user = stored_user(store)
    store.hold(user, now=0.0, expire=lambda: None, call_later=timers)
    store.release(user, now=25.0)  # back after 25 s
    store.hold(user, now=100.0, expire=lambda: None, call_later=timers)
    store.release(user, now=125.0)  # and 25 s more
    assert user.held_for == 50.0 and store.may_hold(user)
    assert store.hold(user, now=200.0, expire=lambda: None, call_later=timers) == []
    assert timers.made[-1].delay == 10.0  # 60 - 50
    store.release(user, now=210.0)
    assert not store.may_hold(user)


def test_no_session_is_held_when_the_resume_grace_is_off():
    """--resume-grace=0: a dropped user leaves at once."""
    store = chat.SessionStore(chat.CrowdLimits(resume_grace=0))
    assert not store.may_hold(stored_user(store))


def test_releasing_a_held_session_stops_its_timer():
    """A session back online (or ending): its grace timer is cancelled and it is no longer held."""
    store, timers = chat.SessionStore(chat.CrowdLimits()), FakeTimers()
    user = stored_user(store)
    store.hold(user, now=0.0, expire=lambda: None, call_later=timers)
    store.release(user, now=1.0)
    assert timers.made[-1].cancelled and user.grace_timer is None and user not in store.held
    store.release(user, now=2.0)  # not held: nothing more is counted
    assert user.held_for == 1.0


def test_held_sessions_past_max_connections_are_returned_oldest_first():
    """hold() returns the oldest held sessions over --max-connections, for the manager to end."""
    store, timers = chat.SessionStore(chat.CrowdLimits(max_connections=2)), FakeTimers()
    users = [stored_user(store, name) for name in ("a", "b", "c", "d")]
    for user in users[:3]:
        store.hold(user, now=0.0, expire=lambda: None, call_later=timers)
    assert store.hold(users[3], now=0.0, expire=lambda: None, call_later=timers) == users[:2]


def test_the_oldest_held_session_with_a_seat_in_a_room_is_found():
    """held_in(room): the longest-held session among the room's members, or None."""
    store, timers = chat.SessionStore(chat.CrowdLimits()), FakeTimers()
    alice, bob, carol = (stored_user(store, name) for name in ("alice", "Bob", "carol"))
    room = chat.Room("general", {"bob": bob, "carol": carol})
    assert store.held_in(room) is None
    for user in (alice, carol, bob):
        store.hold(user, now=0.0, expire=lambda: None, call_later=timers)
    assert store.held_in(room) is carol


@pytest.mark.parametrize("query, last_seq", [
    ("last_seq=42", 42), ("last_seq=0", 0), ("", None), ("last_seq=-1", None), ("last_seq=4x", None),
    ("last_seq=" + "9" * 19, None), ("last_seq=1&last_seq=7", 7),
])
def test_the_clients_last_seq_is_read_from_the_query(query, last_seq):
    """`&last_seq=N`: digits only, fewer than 19 of them (a 64-bit number); the last one counts."""
    start_line = tornado.httputil.RequestStartLine("GET", f"/ws?{query}", "HTTP/1.1")
    headers = tornado.httputil.HTTPHeaders(Host="x")
    request = tornado.httputil.HTTPServerRequest(start_line=start_line, headers=headers)
    assert chat.last_seq_of(request) == last_seq


# ---- 14.1 address groups and the client a proxy names -------------------------------------


@pytest.mark.parametrize("address, prefix, group", [
    ("10.1.2.3", 64, "10.1.2.3"),  # IPv4: the address itself
    ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),  # IPv6: its /64 network ...
    ("2001:db8:1:2:bbbb::9", 64, "2001:db8:1:2::/64"),  # ... which another address of that laptop shares
    ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
    ("fe80::1%eth0", 64, "fe80::/64"),  # a zone index is not part of the address
    ("::ffff:1.2.3.4", 64, "1.2.3.4"),  # an IPv4 client on an IPv6 socket
    ("::1", 64, "::1"),  # loopback stays itself (this machine, exempt)
    ("2001:db8::1", 0, "2001:db8::1"),  # --ipv6-prefix=0: each address itself
    ("2001:db8::1", 128, "2001:db8::1"),  # /128 is the address too
    ("not an address", 64, "not an address"),  # junk is its own group
    ("", 64, ""),
])
def test_addresses_are_grouped_as_machines_are(address, prefix, group):
    """IPv4 by address, IPv6 by its --ipv6-prefix network, mapped IPv4 as IPv4, loopback as itself."""
    assert chat.address_group(address, prefix) == group


@pytest.mark.parametrize("headers, client", [
    ({"X-Real-Ip": "203.0.113.7"}, "203.0.113.7"),
    ({"X-Real-Ip": " 203.0.113.7 ", "X-Forwarded-For": "198.51.100.1"}, "203.0.113.7"),  # X-Real-Ip first
    ({"X-Forwarded-For": "192.0.2.66, 10.0.0.1, 198.51.100.1"}, "198.51.100.1"),  # the proxy added the last
    ({"X-Forwarded-For": "2001:DB8::1"}, "2001:db8::1"),  # written the standard way
    ({"X-Forwarded-For": "198.51.100.1, junk"}, None),  # the last entry is the one the proxy vouches for
    ({"X-Real-Ip": "unknown"}, None),
    ({}, None),
])
def test_a_trusted_proxy_names_the_client_in_x_real_ip_or_the_last_forwarded_entry(headers, client):
    """X-Real-Ip, else the rightmost X-Forwarded-For entry; anything that is not an address names nobody."""
    assert chat.forwarded_client(tornado.httputil.HTTPHeaders(headers)) == client


class FakeContext:
    """The connection context the door fills in."""

    def __init__(self, forwarded: bool):
        self.forwarded = forwarded


class FakeRequest:
    """Just what client_group reads."""

    def __init__(self, remote_ip: str, forwarded: bool):
        self.remote_ip = remote_ip
        self.connection = type("Connection", (), {"context": FakeContext(forwarded)})()


@pytest.mark.parametrize("remote_ip, forwarded, group", [
    ("10.0.0.7", False, "10.0.0.7"),
    ("127.0.0.1", False, "127.0.0.1"),  # this machine: exempt
    ("127.0.0.1", True, "127.0.0.1 via proxy"),  # a proxy's client is never this machine
    ("10.0.0.7", True, "10.0.0.7"),
])
def test_a_client_behind_a_proxy_on_this_machine_is_not_this_machine(remote_ip, forwarded, group):
    """client_group: a forwarded client whose address is local counts as a group of its own."""
    group_found = chat.client_group(FakeRequest(remote_ip, forwarded), 64)
    assert group_found == group and chat.is_local(group_found) == (group in chat.LOCAL_ADDRESSES)


# ---- 9. the frame builder -------------------------------------------------------------------


@pytest.mark.parametrize("length, header", [
    (0, b"\x81\x00"),
    (125, b"\x81\x7d"),  # the longest with a 7-bit length
    (126, b"\x81\x7e" + struct.pack("!H", 126)),  # 16-bit length from here ...
    (65535, b"\x81\x7e" + struct.pack("!H", 65535)),  # ... to here
    (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),  # then 64-bit
])
def test_a_text_frame_has_the_shortest_length_encoding_and_the_payload(length, header):
    """RFC 6455 5.2: FIN + text opcode, no mask, a 7-, 16- or 64-bit length, then the bytes."""
    payload = b"x" * length
    assert chat.websocket_text_frame(payload) == header + payload


# ---- 14.4 close frames ----------------------------------------------------------------------


def close_body(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@pytest.mark.parametrize("data, valid", [
    (b"", True),  # no code at all: a plain close
    (close_body(1000), True),
    (close_body(1001, "au revoir é".encode()), True),
    (close_body(3000), True), (close_body(4999), True),  # registered and private codes
    (b"\x03", False),  # one byte cannot hold a code
    (close_body(1005), False), (close_body(1006), False), (close_body(1015), False),  # never sent
    (close_body(999), False), (close_body(2999), False), (close_body(5000), False),  # out of range
    (close_body(1000, b"\xff\xfe"), False),  # the reason is not UTF-8
])
def test_a_close_frame_body_is_empty_or_a_code_a_peer_may_send_and_a_utf8_reason(data, valid):
    """RFC 6455 5.5.1 and 7.4: anything else is a protocol error (1002)."""
    assert chat.is_valid_close_payload(data) is valid


# ---- 14.5 visible text ------------------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [
    ("hello", "hello"),  # ASCII: as it is
    ("café", "café"),
    ("\u3164", ""), ("\u200b", ""), ("\u2800\u2800", ""), ("\u115f \u1160\uffa0", ""),  # draw nothing
    ("a\u200bb", "ab"),  # a format character is dropped
    ("hi\U000e0041\U000e0042", "hi"),  # invisible tag letters too
    ("\U0001f469\u200d\U0001f4bb", "\U0001f469\u200d\U0001f4bb"),  # the zero-width joiner emoji need stays
    ("e" + "\u0301" * 400, "e" + "\u0301" * chat.MAX_COMBINING_MARKS),  # a tower of marks is cut
    ("Vi\u1ec7\u0323\u0302t", "Vi\u1ec7\u0323\u0302t"),  # a few marks are kept
    ("\u0301\u0301", ""),  # marks alone show nothing
    ("\u3164 x", "\u3164 x"),  # something shows: the line is kept whole
])
def test_only_text_that_shows_is_kept(text, shown):
    """Format characters go (not the ZWJ), runs of marks keep MAX_COMBINING_MARKS, and blank is ""."""
    assert chat.visible_text(text) == shown


# ---- 10 and 14.3: quiet rooms, room caps and room lists ----------------------------------------


def test_a_room_over_the_announce_limit_is_quiet():
    """Rooms with more members than --announce-limit get no join/leave notices."""
    assert not chat.is_quiet(room_of("r", 3), announce_limit=3) and chat.is_quiet(room_of("r", 4), 3)


def test_a_user_in_max_rooms_per_user_rooms_may_join_no_more():
    """--max-rooms-per-user: one more room is `too_many_rooms`, existing or new."""
    limits, user = chat.CrowdLimits(max_rooms_per_user=2), chat.User("alice", "t", None, rooms=["lobby", "a"])
    for room in (room_of("b", 1), None):
        with pytest.raises(chat.Refusal) as refused:
            chat.check_room_caps(user, room, room_count=2, limits=limits)
        assert refused.value.code == "too_many_rooms"


def test_a_new_room_past_max_rooms_is_refused_but_an_existing_room_may_be_joined():
    """--max-rooms: a new room is `no_more_rooms`; joining one that exists is fine."""
    limits, user = chat.CrowdLimits(max_rooms=3), chat.User("alice", "t", None, rooms=["lobby"])
    chat.check_room_caps(user, room_of("a", 1), room_count=3, limits=limits)
    chat.check_room_caps(user, None, room_count=2, limits=limits)
    with pytest.raises(chat.Refusal) as refused:
        chat.check_room_caps(user, None, room_count=3, limits=limits)
    assert refused.value.code == "no_more_rooms"


def test_room_caps_of_zero_are_off():
    """--max-rooms=0 and --max-rooms-per-user=0 refuse nothing."""
    limits = chat.CrowdLimits(max_rooms=0, max_rooms_per_user=0)
    user = chat.User("a", "t", None, rooms=["x"] * 99)
    chat.check_room_caps(user, None, room_count=10**6, limits=limits)


def test_the_biggest_rooms_are_listed_in_name_order():
    """biggest_rooms: the ROOM_LIST_LIMIT biggest (ties by name), sorted by name."""
    rooms = [room_of(f"r{i:03d}", i % 7) for i in range(120)]
    listed = chat.biggest_rooms(rooms)
    assert len(listed) == chat.ROOM_LIST_LIMIT
    assert [room.name for room in listed] == sorted(room.name for room in listed)
    smallest_listed = min(len(room.members) for room in listed)
    assert all(len(room.members) <= smallest_listed for room in rooms if room not in listed)


def test_rooms_of_the_same_size_are_listed_by_name():
    """A tie at the cut keeps the names that sort first."""
    rooms = [room_of(f"r{i:03d}", 1) for i in range(chat.ROOM_LIST_LIMIT + 5)][::-1]
    names = [room.name for room in chat.biggest_rooms(rooms)]
    assert names == [f"r{i:03d}" for i in range(chat.ROOM_LIST_LIMIT)]


# ---- 14.1 the door keeper: pausing without descriptors, its shares, its request handling ------


class ListeningSocket(socket.socket):
    """A listening socket whose accept() raises the errors in `raises`, in turn, then would block."""

    def __init__(self, *raises: OSError):
        super().__init__()
        self.bind(("127.0.0.1", 0))
        self.listen()
        self.setblocking(False)
        self.raises = list(raises)

    def accept(self):
        raise self.raises.pop(0) if self.raises else BlockingIOError()


def door(**limits) -> chat.GuardedHTTPServer:
    """A door keeper for the full server's application, listening nowhere."""
    limits = chat.CrowdLimits(**limits)
    return chat.GuardedHTTPServer(chat.web_app(chat.CrowdRoomManager(limits)), limits)


@pytest.mark.gen_test
async def test_out_of_descriptors_accepting_pauses_then_resumes(caplog):
    """EMFILE on accept: stop watching the socket (no busy loop), then watch it again a pause later."""
    keeper, sock = door(), ListeningSocket(OSError(errno.EMFILE, "Too many open files"))
    loop = IOLoop.current()
    loop.add_handler(sock, keeper.accept, IOLoop.READ)
    try:
        keeper.accept(sock, IOLoop.READ)
        assert sock.fileno() not in loop.handlers
        assert "cannot accept connections: Too many open files" in caplog.text
        await asyncio.sleep(chat.ACCEPT_PAUSE_SECONDS + 0.2)
        assert sock.fileno() in loop.handlers
    finally:
        loop.remove_handler(sock)
        sock.close()


@pytest.mark.gen_test
async def test_a_server_stopped_during_a_pause_does_not_accept_again():
    """resume_accepting after stop(): the socket stays unwatched."""
    keeper, sock = door(), ListeningSocket(OSError(errno.ENFILE, "Too many open files in system"))
    try:
        keeper.accept(sock, IOLoop.READ)
        keeper.stop()
        keeper.resume_accepting(sock)
        assert sock.fileno() not in IOLoop.current().handlers
    finally:
        sock.close()


@pytest.mark.gen_test
async def test_a_connection_gone_before_it_is_accepted_is_skipped():
    """ConnectionAbortedError on accept: go on with the next one, no pause."""
    keeper, sock = door(), ListeningSocket(ConnectionAbortedError(), ConnectionAbortedError())
    try:
        keeper.accept(sock, IOLoop.READ)
        assert sock.raises == []
    finally:
        sock.close()


@pytest.mark.gen_test
async def test_an_accept_error_other_than_running_out_of_descriptors_is_raised():
    """Only the out-of-descriptors errors pause; any other OSError is a bug and propagates."""
    keeper, sock = door(), ListeningSocket(OSError(errno.EBADF, "Bad file descriptor"))
    try:
        with pytest.raises(OSError, match="Bad file descriptor"):
            keeper.accept(sock, IOLoop.READ)
    finally:
        sock.close()


def test_a_group_with_its_share_of_handshakes_pending_is_refused_another():
    """--max-per-address connections in their HTTP phase from one group; one more is refused at once."""
    keeper = door(max_per_address=2, handshake_rate=0)
    keeper.handshakes_from["203.0.113.9"] = 2
    assert keeper.over_limit("203.0.113.9") == "2 connections from 203.0.113.9 already in their HTTP phase"
    assert keeper.over_limit("203.0.113.10") == ""
    keeper.handshakes_from["127.0.0.1"] = 50
    assert keeper.over_limit("127.0.0.1") == ""  # this machine is exempt


def test_the_door_forgets_the_rates_of_quiet_groups_once_it_tracks_many():
    """At 10,000 tracked buckets, those unused for a minute go, so many addresses cannot fill memory."""
    keeper = door()
    old, recent = time.monotonic() - 61, time.monotonic()
    keeper.rates = {("http", f"10.0.{i // 256}.{i % 256}"): chat.TokenBucket(10, 20, 20, old)
                    for i in range(9_999)}
    keeper.rates[("http", "10.99.0.1")] = chat.TokenBucket(10, 20, 20, recent)
    assert keeper.bucket("http", "203.0.113.9", 10) == 0.0
    assert set(keeper.rates) == {("http", "10.99.0.1"), ("http", "203.0.113.9")}


def test_a_system_that_will_not_set_the_send_buffer_keeps_its_own():
    """limit_send_buffer: an OSError from setsockopt is not an error (the connection is served as it is)."""
    class Refusing:
        def setsockopt(self, *args):
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    chat.limit_send_buffer(Refusing())


@pytest.mark.gen_test
async def test_a_request_body_passes_the_door_to_the_application():
    """A POST's body reaches the application, which answers it (405: the page is GET only), not the door."""
    server, _manager, port = chat.serve(chat.CrowdLimits(), 0, "127.0.0.1")  # behind the door keeper
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 405")
    finally:
        server.stop()


@pytest.mark.gen_test
async def test_a_client_that_hangs_up_midway_through_a_request_leaves_no_slot_taken():
    """The application is told the connection closed, and the handshake slot is given back."""
    server, _manager, port = chat.serve(chat.CrowdLimits(), 0, "127.0.0.1")  # behind the door keeper
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part of it")
        await writer.drain()
        await wait_until(lambda: any(stream.requests for stream in server.handshaking))  # headers read
        writer.close()
        await wait_until(lambda: not server.handshaking)
    finally:
        server.stop()


async def wait_until(condition, timeout: float = 5.0) -> None:
    """Poll until `condition()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# ---- 15. the crowd room manager's own steps ---------------------------------------------------


class Line:
    """A stand-in connection from an address group, recording events and its close."""

    last_seq, vanished = None, False

    def __init__(self, address: str | None = None):
        self.address, self.events, self.closed_with = address, [], None

    def send(self, outbound: chat.Outbound) -> None:
        self.events.append(chat.json.loads(outbound.text))

    def close(self, code: int, reason: str) -> None:
        self.closed_with = code

    hang_up = close


def crowd_manager(**limits) -> tuple[chat.CrowdRoomManager, FakeClock, FakeTimers]:
    """The full server's manager, with a clock and timers the test moves."""
    clock, timers = FakeClock(), FakeTimers()
    return chat.CrowdRoomManager(chat.CrowdLimits(**limits), clock=clock, call_later=timers), clock, timers


def test_a_session_resumed_from_another_address_group_must_fit_that_groups_share():
    """Resuming from a new group counts against it: a full group refuses the resume with 4005."""
    manager, _clock, _timers = crowd_manager(max_per_address=1)
    alice = manager.connect("alice", None, Line("203.0.113.1"))
    manager.connect("bob", None, Line("203.0.113.2"))
    dropped = alice.connection
    dropped.vanished = True
    manager.disconnect(alice, dropped, "connection lost")
    with pytest.raises(chat.Refusal) as refused:
        manager.connect("alice", alice.token, Line("203.0.113.2"))
    assert refused.value.code == "address_full"
    assert manager.connect("alice", alice.token, Line("203.0.113.1")) is alice  # her own group: fine


def test_a_flooders_group_may_log_in_again_once_its_penalty_is_over():
    """--flood-penalty: logins from the group are refused until it is over, then the penalty is forgotten."""
    manager, clock, _timers = crowd_manager(flood_penalty=10, rate_burst=1, rate_per_second=1)
    line = Line("203.0.113.66")
    flooder = manager.connect("mallory", None, line)
    for _ in range(4):  # one admitted, one warned, one dropped unanswered, one closed with 4029
        manager.admit_frame(flooder)
    assert line.closed_with == chat.CLOSE_FLOODING and "mallory" not in manager.users
    with pytest.raises(chat.Refusal) as refused:
        manager.connect("mallory2", None, Line("203.0.113.66"))
    assert refused.value.code == "flooding" and refused.value.extra["retry_after"] == 10
    clock.now += 10
    manager.connect("mallory2", None, Line("203.0.113.66"))
    assert manager.penalties == {}
