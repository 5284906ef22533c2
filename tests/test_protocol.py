"""The wire protocol, in the README's order: connections, rooms, messaging. Real server, real WebSocket."""

import random
import re

import pytest

import chat

BOTH_LESSONS = True  # every test here runs on Part I alone too: the simple server stays correct

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def refusal(client) -> tuple[dict, int]:
    """The error event a refused connection gets, and the close code that follows it."""
    error = await client.expect("error")
    code, _reason = await client.closed()
    return error, code


# ---- Connections ----


@pytest.mark.gen_test
async def test_a_new_user_gets_welcome_then_joined_for_the_lobby(chat_server):
    """On connect: `welcome` (username, room, rooms, token, limits), then `joined` for lobby."""
    alice = await chat_server.connect("alice")
    welcome = await alice.next_event()
    assert welcome["type"] == "welcome"
    assert (welcome["username"], welcome["room"], welcome["rooms"]) == ("alice", "lobby", ["lobby"])
    assert len(welcome["token"]) >= 16
    assert welcome["limits"]["max_message_length"] == 500
    joined = await alice.next_event()
    assert joined == {"type": "joined", "room": "lobby", "users": ["alice"], "user_count": 1}


@pytest.mark.gen_test
async def test_every_user_gets_a_different_token(chat_server):
    """Resume tokens are unguessable: no two users share one."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    assert alice.welcome["token"] != bob.welcome["token"]


@pytest.mark.gen_test
async def test_lobby_members_are_told_when_someone_arrives(chat_server):
    """Lobby members get a `system` event naming the newcomer."""
    alice = await chat_server.join("alice")
    await chat_server.join("bob")
    notice = await alice.expect("system")
    assert (notice["event"], notice["username"], notice["room"]) == ("join", "bob", "lobby")
    assert "bob" in notice["text"] and TIMESTAMP.fullmatch(notice["timestamp"])


@pytest.mark.gen_test
async def test_a_connection_without_a_username_is_refused_with_4001(chat_server):
    """A missing username gets error `bad_username`, then close 4001."""
    error, code = await refusal(await chat_server.connect(None))
    assert (error["code"], code) == ("bad_username", chat.CLOSE_BAD_USERNAME)
    assert "username" in error["text"]


@pytest.mark.parametrize("username", ["", "a" * 21, "bad name", "élan", "semi;colon", "x%00"])
@pytest.mark.gen_test
async def test_an_invalid_username_is_refused_with_4001(chat_server, username):
    """Usernames are 1-20 ASCII letters, digits, _ or -; anything else is refused."""
    error, code = await refusal(await chat_server.connect(username))
    assert (error["code"], code) == ("bad_username", chat.CLOSE_BAD_USERNAME)


@pytest.mark.parametrize("username", ["a", "A" * 20, "under_score", "da-sh", "R2D2"])
@pytest.mark.gen_test
async def test_a_valid_username_is_accepted(chat_server, username):
    """Every username made of 1-20 letters, digits, _ or - gets in."""
    client = await chat_server.join(username)
    assert client.welcome["username"] == username


@pytest.mark.gen_test
async def test_a_taken_username_is_refused_ignoring_case_with_4002(chat_server):
    """`Bob` and `bob` cannot both be online: error `username_taken`, close 4002."""
    await chat_server.join("bob")
    error, code = await refusal(await chat_server.connect("BOB"))
    assert (error["code"], code) == ("username_taken", chat.CLOSE_USERNAME_TAKEN)
    assert "BOB" in error["text"]


@pytest.mark.gen_test
async def test_a_username_is_free_again_once_its_user_quits(chat_server):
    """After a clean disconnect, the same name can connect again."""
    bob = await chat_server.join("bob")
    bob.quit()
    await bob.closed()
    again = await chat_server.join("Bob")
    assert again.welcome["username"] == "Bob"


@pytest.mark.gen_test
async def test_room_members_are_told_when_a_user_quits(chat_server):
    """On disconnect the user leaves every room and each room is told."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await bob.say("/join general")
    await alice.say("/join general")
    await alice.expect("joined")
    bob.quit()
    notices = [await alice.expect("system") for _ in range(2)]
    assert {(n["room"], n["event"], n["username"]) for n in notices} == {
        ("lobby", "leave", "bob"), ("general", "leave", "bob")}


@pytest.mark.limits(resume_grace=0)
@pytest.mark.gen_test
async def test_an_abrupt_disconnect_leaves_the_server_serving_others(chat_server):
    """A client that vanishes without a close frame is removed; the others chat on."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    bob.drop()
    notice = await alice.expect("system", event="leave")
    assert (notice["username"], notice["room"]) == ("bob", "lobby")
    await alice.say("still here")
    assert (await alice.expect("message"))["text"] == "still here"
    assert chat_server.manager.status()["users"] == ["alice"]


# ---- Rooms ----


@pytest.mark.gen_test
async def test_join_creates_a_room_and_makes_it_current(chat_server):
    """/join <room> creates a missing room and replies `joined` with its users."""
    alice = await chat_server.join("alice")
    await alice.say("/join general")
    assert await alice.expect("joined") == {"type": "joined", "room": "general", "users": ["alice"], "user_count": 1}
    await alice.say("/users")
    assert (await alice.expect("users"))["room"] == "general"


@pytest.mark.parametrize("typed", ["#General", "GENERAL", "  general  ", "#general"])
@pytest.mark.gen_test
async def test_join_accepts_a_leading_hash_and_ignores_case(chat_server, typed):
    """Room names are case-insensitive, stored lower-case; a leading # is dropped."""
    alice = await chat_server.join("alice")
    await alice.say(f"/join {typed}")
    assert (await alice.expect("joined"))["room"] == "general"


@pytest.mark.gen_test
async def test_join_without_a_room_names_the_usage(chat_server):
    """A missing argument gets an `error` naming the right usage."""
    alice = await chat_server.join("alice")
    await alice.say("/join")
    error = await alice.expect("error")
    assert error["code"] == "usage" and "/join <room>" in error["text"]


@pytest.mark.parametrize("room", ["a" * 33, "no/slash", "sp ace", "#", "caf\u00e9"])
@pytest.mark.gen_test
async def test_join_with_an_invalid_room_name_is_refused(chat_server, room):
    """Room names are 1-32 ASCII letters, digits, _ or -."""
    alice = await chat_server.join("alice")
    await alice.say(f"/join {room}")
    assert (await alice.expect("error"))["code"] == "bad_room"


@pytest.mark.gen_test
async def test_joining_a_room_you_are_in_switches_to_it(chat_server):
    """/join of a room you are already in makes it current again, without noise."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.say("/join general")
    await alice.expect("joined")
    await alice.say("/join lobby")
    joined = await alice.expect("joined")
    assert (joined["room"], joined["users"]) == ("lobby", ["alice", "bob"])
    assert [e["type"] for e in await bob.sync()] == []


@pytest.mark.gen_test
async def test_leave_moves_you_back_to_your_previous_room(chat_server):
    """/leave replies `left` with room_now, then `joined` for room_now."""
    alice = await chat_server.join("alice")
    await alice.say("/join general")
    await alice.expect("joined")
    await alice.say("/leave")
    assert await alice.expect("left") == {"type": "left", "room": "general", "room_now": "lobby"}
    assert (await alice.expect("joined"))["room"] == "lobby"


@pytest.mark.gen_test
async def test_leave_is_refused_in_your_last_room(chat_server):
    """A user must stay in at least one room: error `last_room`."""
    alice = await chat_server.join("alice")
    await alice.say("/leave")
    error = await alice.expect("error")
    assert error["code"] == "last_room" and "#lobby" in error["text"]


@pytest.mark.gen_test
async def test_you_may_leave_the_lobby_when_you_are_in_another_room(chat_server):
    """The lobby is a room like any other for /leave, as long as another remains."""
    alice = await chat_server.join("alice")
    await alice.say("/join general")
    await alice.say("/join lobby")
    await alice.say("/leave")
    assert (await alice.expect("left"))["room_now"] == "general"


@pytest.mark.gen_test
async def test_a_room_other_than_lobby_vanishes_when_its_last_member_leaves(chat_server):
    """An empty non-lobby room disappears; /rooms no longer lists it."""
    alice = await chat_server.join("alice")
    await alice.say("/join general")
    await alice.say("/leave")
    await alice.say("/rooms")
    assert (await alice.expect("rooms"))["rooms"] == [{"name": "lobby", "users": 1}]


@pytest.mark.gen_test
async def test_the_lobby_always_exists_even_when_empty(chat_server):
    """`lobby` survives its last member leaving."""
    alice = await chat_server.join("alice")
    await alice.say("/join general")
    await alice.say("/join lobby")
    await alice.say("/leave")
    await alice.say("/rooms")
    rooms = (await alice.expect("rooms"))["rooms"]
    assert {"name": "lobby", "users": 0} in rooms


@pytest.mark.gen_test
async def test_rooms_lists_every_room_with_its_member_count(chat_server):
    """/rooms replies `rooms`: a list of {name, users}."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.say("/join general")
    await bob.say("/join general")
    await bob.say("/join games")
    await bob.expect("joined")
    await bob.say("/rooms")
    assert (await bob.expect("rooms"))["rooms"] == [
        {"name": "games", "users": 1}, {"name": "general", "users": 2}, {"name": "lobby", "users": 2}]


@pytest.mark.gen_test
async def test_users_lists_the_users_in_your_current_room(chat_server):
    """/users replies `users` with the current room's members only."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await chat_server.join("carol")
    await alice.say("/join general")
    await bob.say("/join general")
    await bob.expect("joined")
    await bob.say("/users")
    users = await bob.expect("users")
    assert (users["room"], users["users"], users["user_count"]) == ("general", ["alice", "bob"], 2)


@pytest.mark.gen_test
async def test_help_lists_every_command_with_usage_and_description(chat_server):
    """/help replies `help` with {usage, description} for each command."""
    alice = await chat_server.join("alice")
    await alice.say("/help")
    commands = (await alice.expect("help"))["commands"]
    usages = [command["usage"] for command in commands]
    assert usages == ["/join <room>", "/leave", "/rooms", "/users", "/help"]
    assert all(command["description"] for command in commands)


@pytest.mark.parametrize("line", ["/nope", "/JOINX general", "/ "])
@pytest.mark.gen_test
async def test_an_unknown_command_is_refused_pointing_to_help(chat_server, line):
    """Unknown commands get error `unknown_command` mentioning /help."""
    alice = await chat_server.join("alice")
    await alice.say(line)
    error = await alice.expect("error")
    assert error["code"] == "unknown_command" and "/help" in error["text"]


@pytest.mark.gen_test
async def test_commands_ignore_case(chat_server):
    """`/ROOMS` works like `/rooms`."""
    alice = await chat_server.join("alice")
    await alice.say("/ROOMS")
    assert (await alice.expect("rooms"))["rooms"] == [{"name": "lobby", "users": 1}]


@pytest.mark.lesson(2)  # quiet big rooms are Part II (section 10)
@pytest.mark.limits(announce_limit=2)
@pytest.mark.gen_test
async def test_rooms_bigger_than_the_announce_limit_get_no_join_or_leave_notices(chat_server):
    """Arrivals in a big room are not announced: C users connecting must not cost C*C/2 deliveries."""
    alice = await chat_server.join("alice")
    await chat_server.join("bob")
    assert (await alice.expect("system"))["username"] == "bob"  # 2 members: still announced
    carol = await chat_server.join("carol")
    carol.quit()
    await carol.closed()
    assert [e for e in await alice.sync() if e["type"] == "system"] == []


@pytest.mark.gen_test
async def test_user_lists_are_capped_but_count_everyone(chat_server, monkeypatch):
    """`joined` and `users` list at most USER_LIST_LIMIT names; `user_count` counts all members."""
    monkeypatch.setattr(chat, "USER_LIST_LIMIT", 3)
    for name in ("amy", "ben", "cy", "dee"):
        await chat_server.join(name)
    eve = await chat_server.connect("eve")
    await eve.expect("welcome")
    joined = await eve.expect("joined")
    assert (joined["users"], joined["user_count"]) == (["amy", "ben", "cy"], 5)
    await eve.say("/users")
    users = await eve.expect("users")
    assert (len(users["users"]), users["user_count"]) == (3, 5)


# ---- Messaging ----


@pytest.mark.gen_test
async def test_a_message_reaches_every_member_of_the_room_sender_included(chat_server):
    """A chat line becomes a `message` event with timestamp, username, room and text, for every member."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.say("hello, bob")
    for client in (alice, bob):
        message = await client.expect("message")
        assert TIMESTAMP.fullmatch(message.pop("timestamp"))
        message.pop("seq", None)  # the full server numbers messages, for resume
        assert message == {"type": "message", "username": "alice", "room": "lobby", "text": "hello, bob"}


@pytest.mark.gen_test
async def test_messages_stay_in_their_room(chat_server):
    """Three clients: alice and bob share #general, carol stays in lobby and sees none of it."""
    alice, bob, carol = [await chat_server.join(name) for name in ("alice", "bob", "carol")]
    for client in (alice, bob):
        await client.say("/join general")
        await client.expect("joined")
    await alice.say("hi bob")
    await bob.say("hi alice")
    await carol.say("anyone in the lobby?")
    for client in (alice, bob):  # still lobby members too, so they hear carol
        messages = [(e["room"], e["text"]) for e in await client.sync() if e["type"] == "message"]
        assert messages == [("general", "hi bob"), ("general", "hi alice"), ("lobby", "anyone in the lobby?")]
    carol_messages = [(e["room"], e["text"]) for e in await carol.sync() if e["type"] == "message"]
    assert carol_messages == [("lobby", "anyone in the lobby?")]


@pytest.mark.gen_test
async def test_a_message_goes_to_the_current_room_only(chat_server):
    """Members of two rooms send to the one that is current."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.say("/join general")
    await alice.say("for general")
    assert (await alice.expect("message"))["room"] == "general"
    assert [e for e in await bob.sync() if e["type"] == "message"] == []


@pytest.mark.parametrize("line", ["", " ", "   \t  ", "\x1b\x07"])
@pytest.mark.gen_test
async def test_an_empty_or_blank_message_is_refused(chat_server, line):
    """Empty, whitespace-only (or control-only) lines get error `empty_message`."""
    alice = await chat_server.join("alice")
    await alice.say(line)
    assert (await alice.expect("error"))["code"] == "empty_message"


@pytest.mark.limits(max_message_length=10)
@pytest.mark.gen_test
async def test_an_over_limit_message_is_refused_to_the_sender_only(chat_server):
    """Over the length limit: error `message_too_long` to the sender; nobody gets the text."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.say("x" * 11)
    error = await alice.expect("error")
    assert error["code"] == "message_too_long" and "10" in error["text"]
    await alice.say("x" * 10)
    assert (await bob.expect("message"))["text"] == "x" * 10


@pytest.mark.limits(max_message_length=0)
@pytest.mark.gen_test
async def test_with_the_length_limit_off_a_long_line_is_relayed(chat_server):
    """--max-message-length=0 switches the limit off: a 6,000-character line (past 4 KiB) arrives."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.say("x" * 6000)
    assert (await bob.expect("message"))["text"] == "x" * 6000


@pytest.mark.parametrize("typed, relayed", [
    ("\x1b[2J\x1b[31mred", "[2J[31mred"),  # ESC: clear screen, colours
    ("bell\x07", "bell"),
    ("c1\x9b31m", "c131m"),  # a one-byte CSI
    ("\u202eevil", "evil"),  # right-to-left override
    ("a\u2066b\u2069c", "abc"),  # bidi isolates
    ("two\nlines", "two lines"),
    ("tab\there", "tab here"),
    ("del\x7f", "del"),
])
@pytest.mark.gen_test
async def test_control_characters_never_reach_other_users(chat_server, typed, relayed):
    """C0/C1 controls and bidi overrides are stripped; line breaks and tabs become spaces."""
    alice, bob = await chat_server.join("alice"), await chat_server.join("bob")
    await alice.say(typed)
    assert (await bob.expect("message"))["text"] == relayed


@pytest.mark.gen_test
async def test_a_double_slash_sends_a_line_that_starts_with_a_slash(chat_server):
    """`//shrug` is chat text `/shrug`, not a command."""
    alice = await chat_server.join("alice")
    await alice.say("//shrug")
    assert (await alice.expect("message"))["text"] == "/shrug"


@pytest.mark.limits(rate_per_second=0, room_capacity=0)
@pytest.mark.gen_test(timeout=60)  # Part I leaves Nagle's algorithm on: ~40 ms per round trip
async def test_random_traffic_reaches_every_member_and_no_one_else(chat_server):
    """24 clients join, leave and talk at random in 4 rooms: each member gets every message of its rooms, in order, and no other."""
    rng = random.Random(20261125)
    names = [f"user{i}" for i in range(24)]
    clients = {name: await chat_server.join(name) for name in names}
    rooms = {name: ["lobby"] for name in names}  # our model: each user's rooms, current one last
    expected = {name: [] for name in names}  # the texts each user must receive, in order
    for step in range(400):
        name = rng.choice(names)
        client, action = clients[name], rng.random()
        if action < 0.25:
            room = rng.choice(["lobby", "red", "green", "blue"])
            await client.say(f"/join {room}")
            assert (await client.expect("joined"))["room"] == room
            rooms[name] = [r for r in rooms[name] if r != room] + [room]
        elif action < 0.35 and len(rooms[name]) > 1:
            await client.say("/leave")
            left = await client.expect("left")
            assert (left["room"], left["room_now"]) == (rooms[name].pop(), rooms[name][-1])
            await client.expect("joined")
        else:
            text = f"{name} says {step}"
            await client.say(text)
            while (await client.expect("message"))["text"] != text:
                pass  # the echo tells us the server has delivered it
            for other in names:
                if rooms[name][-1] in rooms[other]:
                    expected[other].append(text)
    for name, client in clients.items():
        await client.sync()
        received = [event["text"] for event in client.received if event["type"] == "message"]
        assert received == expected[name], f"{name} did not get exactly its rooms' messages"
