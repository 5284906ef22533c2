"""The README's exercises, one acceptance test each: red on the shipped server, green once solved.

In the normal run each test is a strict expected failure (xfail): it must fail on the
shipped server, and the suite goes red if one ever passes by accident. A student runs
one as a plain test, sees it fail, and works on chat.py until it passes:

    python -m pytest tests/test_exercises.py --runxfail -k topic

The tests start the real server and talk real WebSocket, and check only what the
exercise asks for, never how it is built. Exercise 6 is the other way round: its
test passes today and guards the rule the exercise breaks on purpose.

A test's name holds its exercise's keyword (`-k` matches parts of test names), so
no other test name may contain it: the last test here checks that.
"""

import asyncio
import json
import re

import pytest
from conftest import ROOT

BOTH_LESSONS = True  # Part I exercises must work in `python chat.py --lesson=1` and in `python chat.py`


def exercise(number: int, what: str):
    """Mark a test as the acceptance test of an exercise nobody has solved yet."""
    return pytest.mark.xfail(strict=True, reason=f"Exercise {number}: {what}")


def messages(events: list[dict]) -> list[dict]:
    """The `message` events among these."""
    return [event for event in events if event["type"] == "message"]


# ---- Part I (lesson 1) ----


@exercise(1, "/me is not a command yet")
@pytest.mark.gen_test
async def test_me_sends_the_room_an_action(chat_server):
    """`/me waves` reaches every room member as a `message` with text "waves" and `action: true`."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.say("/me waves")
    for client in (alice, bob):  # alice first: once her line is handled, bob's copy is on its way
        got = [(message["username"], message["text"], message.get("action"))
               for message in messages(await client.sync())]
        assert got == [("alice", "waves", True)], f"{client.username} got no action from alice"


@exercise(2, "rooms have no topic yet")
@pytest.mark.gen_test
async def test_a_topic_set_in_a_room_is_shown_to_whoever_joins_it_later(chat_server):
    """`/topic <text>` sets the current room's topic; a later `joined` for that room carries it as `topic`."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.say("/join general")
    await alice.say("/topic Friday quiz")
    await alice.sync()  # her lines are handled before bob's /join arrives
    await bob.say("/join general")
    joined = await bob.expect("joined", room="general")
    assert joined.get("topic") == "Friday quiz", "bob's `joined` for #general has no topic"


@exercise(3, "/whois is not a command yet")
@pytest.mark.gen_test
async def test_whois_tells_you_which_rooms_a_user_is_in(chat_server):
    """`/whois BOB` replies `whois` with bob's `username` as he spells it and the `rooms` he is in."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await bob.say("/join general")
    await bob.expect("joined", room="general")
    await alice.say("/whois BOB")
    replies = [event for event in await alice.sync() if event["type"] == "whois"]
    answers = [(reply["username"], sorted(reply["rooms"])) for reply in replies]
    assert answers == [("bob", ["general", "lobby"])], "no `whois` naming bob in #general and #lobby"


@exercise(4, "an unknown command gets no suggestion yet")
@pytest.mark.gen_test
async def test_a_mistyped_command_gets_a_suggestion(chat_server):
    """`/jion general` is still refused with `unknown_command`, and its text suggests `/join`."""
    alice = await chat_server.join("alice")
    await alice.say("/jion general")
    error = await alice.expect("error")
    assert error["code"] == "unknown_command"
    assert "/join" in error["text"], f"no suggestion in: {error['text']}"


@exercise(5, "rooms keep no history (the product leaves it out on purpose)")
@pytest.mark.limits(rate_per_second=0)  # bob sends 12 lines at once
@pytest.mark.gen_test
async def test_room_history_gives_a_late_arrival_the_last_ten_lines(chat_server):
    """Joining a room sends its last 10 messages after `joined`, oldest first, each with `history: true`."""
    bob = await chat_server.join("bob")
    await bob.say("/join general")
    for number in range(1, 13):
        await bob.say(f"line {number}")
    await bob.sync()  # all 12 are said before carol arrives
    carol = await chat_server.join("carol")
    await carol.say("/join general")
    events = await carol.sync()
    after_joined = events[[event["type"] for event in events].index("joined") + 1:]
    history = [event["text"] for event in messages(after_joined) if event.get("history") is True]
    assert history == [f"line {number}" for number in range(3, 13)]


# Exercise 6 breaks the server on purpose. This test passes on the shipped server: it
# is the guard the student breaks. It runs Part I alone, where the exercise happens
# (Part II's classes call `connect` without `await`).


@pytest.mark.lesson(1)
@pytest.mark.gen_test
async def test_a_race_between_two_alices_lets_exactly_one_in(chat_server):
    """Two connections ask for the same name at the same moment: one gets `welcome`, the other `error`."""
    for attempt in range(10):  # one try can miss the moment; ten in a row cannot
        name = f"alice{attempt}"
        first, second = await asyncio.gather(chat_server.connect(name), chat_server.connect(name))
        answers = sorted([(await first.next_event())["type"], (await second.next_event())["type"]])
        assert answers == ["error", "welcome"], f"both {name}s got in: the check and the take were split"


# ---- Part II (lesson 2) ----


async def status_over_http(http_client, port: int) -> dict:
    """GET /status on the chat server's port, as JSON."""
    response = await http_client.fetch(f"http://127.0.0.1:{port}/status")
    return json.loads(response.body)


@exercise(7, "/status does not count deliveries yet")
@pytest.mark.lesson(2)  # quiet big rooms are Part II (section 10)
@pytest.mark.limits(announce_limit=3)
@pytest.mark.gen_test
async def test_deliveries_grow_with_each_arrival_until_the_lobby_goes_quiet(chat_server,
                                                                            http_client):
    """Each arrival costs a `welcome`, a `joined` and a notice per member there, until the room goes quiet."""
    counts = [await status_over_http(http_client, chat_server.port)]
    assert "deliveries" in counts[0], "GET /status reports no `deliveries`"
    for username in ("amy", "ben", "cy", "dee", "eve", "fay"):
        await chat_server.join(username)  # its `joined` came: the notices are handed out too
        counts.append(await status_over_http(http_client, chat_server.port))
    costs = [after["deliveries"] - before["deliveries"] for before, after in zip(counts, counts[1:])]
    assert costs == [2, 3, 4, 2, 2, 2]  # the 4th arrival makes the lobby bigger than the announce limit


@exercise(8, "a silent user gets no warning before the idle timeout yet")
@pytest.mark.lesson(2)  # the idle timeout is Part II (section 12)
@pytest.mark.limits(idle_timeout=1)
@pytest.mark.gen_test
async def test_an_idle_user_is_warned_halfway_before_being_closed(chat_server):
    """A silent user gets a `system` event `idle_warning` before the `idle` notice and the 4008 close."""
    alice = await chat_server.join("alice")
    code, _reason = await alice.closed()
    notices = [event["event"] for event in alice.received if event["type"] == "system"]
    assert (notices, code) == (["idle_warning", "idle"], 4008)


# ---- the README's commands select these tests ----


def test_each_exercise_keyword_selects_exactly_one_test():
    """Every `-k WORD` in the README's exercise commands picks one test here, and every test has one."""
    section = (ROOT / "README.md").read_text().split("### Exercises", 1)[1].split("\n## ", 1)[0]
    keywords = re.findall(r"python -m pytest tests/test_exercises\.py[^`\n]*? -k (\w+)", section)
    names = [name for name in globals() if name.startswith("test_")]
    exercise_tests = [name for name in names if name != "test_each_exercise_keyword_selects_exactly_one_test"]
    # -k also matches the folder, module, parameter ids and marker names
    names += ["tests", "test_exercises.py", "part1", "full", "xfail", "gen_test", "limits", "lesson"]
    selected = set()
    for keyword in keywords:
        matches = [name for name in names if keyword.lower() in name.lower()]
        assert len(matches) == 1 and matches[0] in exercise_tests, f"-k {keyword} selects {matches}"
        selected.add(matches[0])
    assert selected == set(exercise_tests), f"no README command runs {set(exercise_tests) - selected}"
