"""The web page (chat.html) in a real headless browser: what alice and bob see in their tabs.

The chat server runs in a thread of its own (its own asyncio loop) on a free port,
so the test can drive Chromium through selenium while the server serves. Each
browser user is a window of one shared browser; carol, a plain WebSocket user,
is conftest's ChatClient, run on the server's loop. The tests read the page as a
person would: the lines in the message area, the header, the sidebar.

Debian's `chromium` and `chromium-driver` packages provide the browser. Without
them these tests skip, saying how to install them; under CI they never skip.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import shutil
import threading
import time
import urllib.request
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ROOT, ChatClient, ChatServer
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.wait import WebDriverWait

import chat


PAGE = (ROOT / "chat.html").read_text()
WAIT_SECONDS = 15.0  # generous, for a busy machine: every wait ends as soon as its condition holds
SCROLLBACK_LINES = 500  # chat.html keeps this many lines per room
README_SCREENSHOT = ROOT / "tests" / "screenshots" / "chat-page.png"
BROWSER_ARGUMENTS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--window-size=1000,640",
)
GET_INSTALLED = ("These tests drive a real browser: install Chromium and its driver "
                 "(on Debian or Ubuntu: apt-get install chromium chromium-driver).")
SCREENSHOTS = os.environ.get("CHAT_SCREENSHOTS")  # a folder: tests save pictures of what they saw there


# ---- the server, in a thread of its own ----


class LoopThread:
    """An asyncio loop in a background thread: the server lives there while selenium blocks here."""

    def __init__(self):
        """Start the loop's thread."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="chat-server", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = WAIT_SECONDS + 5):
        """Run a coroutine on the loop and return its result (or raise what it raised)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_SECONDS)
        self.loop.close()


class Carol:
    """A plain WebSocket user (conftest's ChatClient), driven from the test's thread."""

    def __init__(self, loop: LoopThread, client: ChatClient):
        """Wrap a connected client."""
        self.loop, self.client = loop, client

    def say(self, line: str) -> None:
        """Send one typed line."""
        self.loop.run(self.client.say(line))

    def expect(self, event_type: str, **fields) -> dict:
        """The next event of this type (with these field values); fail on close or timeout."""
        return self.loop.run(self.client.expect(event_type, **fields))

    def sync(self) -> list[dict]:
        """Everything the server sent so far."""
        return self.loop.run(self.client.sync())

    def quit(self) -> None:
        """Leave with a close frame (call it on the loop's thread)."""
        self.client.quit()


class WebServer:
    """The chat server under test: start, restart on the same port, stop; and its users."""

    def __init__(self, loop: LoopThread, limits: chat.CrowdLimits):
        """Start listening on a free port."""
        self.loop, self.limits, self.port = loop, limits, 0
        self.carols: list[Carol] = []  # plain WebSocket users, who say goodbye at the end
        self.start()

    def start(self) -> None:
        """Listen (again, on the same port after the first time)."""
        async def serve():
            return chat.serve(self.limits, self.port, "127.0.0.1")
        self.http_server, self.manager, self.port = self.loop.run(serve())

    def stop(self) -> None:
        """Shut down as Ctrl-C would: everyone is told goodbye."""
        self.loop.run(chat.shutdown(self.http_server, self.manager))

    def stop_at_the_end(self) -> None:
        """The test is over: the WebSocket users quit (they may have unread events, which would
        keep them from hearing the server's goodbye), then the server stops."""
        for carol in self.carols:
            self.loop.loop.call_soon_threadsafe(carol.quit)
        self.stop()

    def restart(self) -> None:
        """A new server process, as far as clients can tell: it knows no sessions."""
        self.stop()
        self.start()

    def url(self, query: str = "") -> str:
        """The page's address."""
        return f"http://127.0.0.1:{self.port}/{query}"

    def join(self, username: str) -> Carol:
        """Connect a plain WebSocket user and wait until they are in the lobby."""
        self.carols.append(Carol(self.loop, self.loop.run(ChatServer(self.port, self.manager).join(username))))
        return self.carols[-1]

    def close(self, username: str, code: int) -> None:
        """Close a user's connection on purpose with this close code, as the server does (the session ends)."""
        async def close():
            user = self.manager.users[chat.fold(username)]
            user.connection.close_by_server(code, "closed by the test")
            while user.connection is not None and chat.fold(username) in self.manager.users:
                await asyncio.sleep(0.01)
        self.loop.run(close())

    def refuse_logins(self, code: str, text: str, close_code: int) -> None:
        """From now on every new login is refused with this error and close code (until allow_logins)."""
        def connect(*arguments):
            raise chat.Refusal(code, text, close_code)
        self.manager.connect = connect

    def allow_logins(self) -> None:
        """Logins work again."""
        del self.manager.connect

    def is_online(self, username: str) -> bool:
        """Whether the server has a user of that name (online or held)."""
        return chat.fold(username) in self.manager.users

    def drop(self, username: str) -> None:
        """Cut a user's connection with no close frame, as a lost network would."""
        async def cut():
            user = self.manager.users[chat.fold(username)]
            user.connection.ws_connection.stream.close()
            while user.connection is not None:  # on_close has run: the session is held
                await asyncio.sleep(0.01)
        self.loop.run(cut())


@pytest.fixture(scope="module")
def server_loop():
    """One loop thread for the module's servers."""
    loop = LoopThread()
    yield loop
    loop.stop()


@pytest.fixture
def server(server_loop, limits) -> WebServer:
    """A chat server for this test (limits from a `limits` marker)."""
    web_server = WebServer(server_loop, limits)
    yield web_server
    web_server.stop_at_the_end()


# ---- the browser ----


def find_browser() -> tuple[str | None, str | None]:
    """Chromium (Debian's name first, then other common ones) and its driver, or None for each."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_folder = os.environ.get("CHROMEWEBDRIVER")  # where GitHub's runner images keep it
    driver = shutil.which("chromedriver") or (driver_folder and shutil.which("chromedriver", path=driver_folder))
    return browser, driver or None


def is_ci() -> bool:
    """Whether we run under continuous integration (CI=true), where nothing may skip."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def start_browser(profile: Path, browser_path: str, driver_path: str) -> webdriver.Chrome:
    """Headless Chromium with a fresh profile, logging the console for the tests to read."""
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for argument in BROWSER_ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One browser for the whole module; each test opens windows of its own."""
    browser_path, driver_path = find_browser()
    if not (browser_path and driver_path):
        if is_ci():
            pytest.fail(f"CI must run the browser tests. {GET_INSTALLED}")
        pytest.skip(GET_INSTALLED)
    chromium = start_browser(tmp_path_factory.mktemp("chromium-profile"), browser_path, driver_path)
    yield chromium
    chromium.quit()


class Page:
    """One browser window with the chat page, as a test sees it."""

    def __init__(self, driver: webdriver.Chrome, handle: str):
        """A window already opened."""
        self.driver, self.handle = driver, handle

    def js(self, script: str, *arguments):
        """Run a script in this window and return its result."""
        self.driver.switch_to.window(self.handle)
        return self.driver.execute_script(script, *arguments)

    def type(self, line: str, into: str = "line") -> None:
        """Type a line into the message input (or another field) and press Enter."""
        self.driver.switch_to.window(self.handle)
        self.driver.find_element(By.ID, into).send_keys(line, Keys.ENTER)

    def wait_for(self, condition, what: str) -> None:
        """Wait until condition() is true; fail saying what never happened, and what is on the page."""
        try:
            WebDriverWait(self.driver, WAIT_SECONDS, poll_frequency=0.05).until(lambda _: condition())
        except TimeoutException:
            pytest.fail(f"waited {WAIT_SECONDS:g} s for {what}; the page shows {self.header()} {self.lines()}")

    def lines(self) -> list[str]:
        """The message area's lines, as text."""
        return self.js("return [...document.querySelectorAll('#messages > *')].map(line => line.textContent)")

    def wait_for_line(self, fragment: str) -> None:
        """Wait until a line containing this text is on the page."""
        self.wait_for(lambda: any(fragment in line for line in self.lines()), f"a line with {fragment!r}")

    def header(self) -> list[str]:
        """The header: current room, username, connection state."""
        return self.js("return ['title', 'me', 'state'].map(id => document.getElementById(id).textContent)")

    def wait_until_connected(self, username: str, room: str = "lobby") -> None:
        """Wait until the header says connected, as this user, in this room."""
        wanted = [f"#{room}", username, "connected"]
        self.wait_for(lambda: self.header() == wanted, f"the header {wanted}")

    def rooms(self) -> list[tuple[str, int, bool]]:
        """The sidebar's rooms: (name, unread count, is current)."""
        return [tuple(room) for room in self.js("""
            return [...document.querySelectorAll('#rooms button')].map(button => {
              const badge = button.querySelector('.unread');
              return [button.dataset.room, badge.hidden ? 0 : Number(badge.firstChild.textContent),
                      button.getAttribute('aria-current') === 'true'];
            });""")]

    def users(self) -> list[str]:
        """The sidebar's users of the current room."""
        return self.js("return [...document.querySelectorAll('#users li')].map(li => li.textContent)")

    def notice(self) -> str:
        """The error shown by the input line."""
        return self.js("return document.getElementById('notice').textContent")

    def focused(self) -> str:
        """The id of the element that has the keyboard focus."""
        return self.js("return document.activeElement.id")

    def type_fast(self, lines: list[str]) -> None:
        """Type these lines, each followed by Enter, in one go (as fast as the browser takes keys)."""
        self.driver.switch_to.window(self.handle)
        self.driver.find_element(By.ID, "line").send_keys(*[key for line in lines for key in (line, Keys.ENTER)])

    def watch(self, element_id: str) -> None:
        """From now on, remember every text this element shows (visible, and not empty)."""
        self.js("""const node = document.getElementById(arguments[0]);
                   window.seen = window.seen || {};
                   const seen = window.seen[arguments[0]] = [];
                   new MutationObserver(() => {
                     if (node.textContent && node.offsetParent !== null) seen.push(node.textContent);
                   }).observe(node, {childList: true, characterData: true, subtree: true});""", element_id)

    def seen(self, element_id: str) -> list[str]:
        """The texts the watched element showed so far."""
        return self.js("return window.seen[arguments[0]]", element_id)

    def reconnect_button(self) -> bool:
        """Whether the Reconnect button shows."""
        return self.js("return !document.getElementById('reconnect').hidden")

    def screenshot(self, name: str) -> None:
        """Save a picture of the window as NAME.png in $CHAT_SCREENSHOTS, if that is set."""
        if SCREENSHOTS:
            self.driver.switch_to.window(self.handle)
            self.driver.save_screenshot(str(Path(SCREENSHOTS) / f"{name}.png"))


@pytest.fixture
def open_page(browser, server):
    """Open the chat page in new windows; they are closed at the end of the test."""
    handles = []

    def open_page(query: str = "") -> Page:
        browser.switch_to.new_window("window")  # a window, not a tab: a hidden tab draws nothing
        handles.append(browser.current_window_handle)
        browser.get(server.url(query))
        return Page(browser, browser.current_window_handle)

    yield open_page
    for handle in handles:
        if handle in browser.window_handles:
            browser.switch_to.window(handle)
            browser.close()
    browser.switch_to.window(browser.window_handles[0])


@pytest.fixture
def alice(open_page) -> Page:
    """alice's window, connected straight from the address (/?username=alice)."""
    page = open_page("?username=alice")
    page.wait_until_connected("alice")
    return page


def console_messages(browser: webdriver.Chrome) -> list[str]:
    """What the browser logged to its console since the last call."""
    return [entry["message"] for entry in browser.get_log("browser")]


# ---- serving the page ----


def inline_bodies(tag: str) -> list[str]:
    """The bodies of chat.html's inline elements of one tag."""
    return re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, re.S)


def test_the_page_is_served_with_a_policy_that_allows_only_its_own_script_and_style(server):
    """GET / serves chat.html with a Content-Security-Policy naming the hashes of its one script and style."""
    with urllib.request.urlopen(server.url()) as response:
        policy = response.headers["Content-Security-Policy"]
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.read().decode() == PAGE
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        [body] = inline_bodies(tag)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}';" in policy
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy


def test_a_head_request_gets_the_pages_headers_without_the_page(server):
    """HEAD / (link checkers, `curl -I`) answers 200 with the same policy as GET / and no body."""
    request = urllib.request.Request(server.url(), method="HEAD")
    with urllib.request.urlopen(request) as response:
        assert response.status == 200 and response.read() == b""
        assert "script-src 'sha256-" in response.headers["Content-Security-Policy"]


class Markup(HTMLParser):
    """The tags of a page with their attributes, in order."""

    def __init__(self, page: str):
        """Parse the page."""
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        """Keep each tag."""
        self.tags.append((tag, dict(attrs)))


def test_the_page_is_one_file_with_nothing_its_policy_would_block():
    """One script and one style, inline; no style="" or on...="" attributes; nothing fetched from elsewhere."""
    tags = Markup(PAGE).tags
    assert [tag for tag, _ in tags].count("script") == 1 and [tag for tag, _ in tags].count("style") == 1
    assert [(tag, name) for tag, attrs in tags for name in attrs if name == "style" or name.startswith("on")] == []
    assert [(tag, attrs) for tag, attrs in tags if attrs.get("src") or tag == "link"] == [
        ("link", {"rel": "icon", "href": "data:,"})]
    assert "setAttribute(\"style\"" not in PAGE and "setAttribute('style'" not in PAGE


def test_the_page_runs_under_its_policy_without_a_violation(server, alice):
    """Joining, chatting and switching rooms by a click all work with nothing blocked by the policy."""
    console_messages(alice.driver)
    alice.type("/join general")
    alice.type("hello under the policy")
    alice.wait_for_line("alice hello under the policy")
    alice.js("document.querySelector('#rooms button[data-room=lobby]').click()")
    alice.wait_until_connected("alice", "lobby")
    assert not [message for message in console_messages(alice.driver) if "Content Security Policy" in message]
    # The control: an inline style attribute is blocked, and the log shows it.
    alice.js("document.body.insertAdjacentHTML('beforeend', '<b style=\"color: red\">x</b>')")
    assert any("Content Security Policy" in message for message in console_messages(alice.driver))


# ---- logging in ----


def test_a_username_in_the_address_connects_at_once_and_enter_sends_the_typed_line(server, alice):
    """/?username=alice connects as alice; the message input has the focus; Enter sends the line."""
    carol = server.join("carol")
    assert alice.focused() == "line"
    alice.driver.switch_to.active_element.send_keys("hello carol", Keys.ENTER)
    assert carol.expect("message")["text"] == "hello carol"
    alice.wait_for_line("alice hello carol")
    assert alice.js("return document.getElementById('line').value") == ""


def test_without_a_username_the_page_asks_for_one_and_explains_a_refused_one(server, open_page):
    """The login form says why a taken name was refused; another name gets in, and the address says so."""
    server.join("bob")
    page = open_page()
    page.wait_for(lambda: page.focused() == "login-name", "the name field to have the focus")
    page.type("bob", into="login-name")
    page.wait_for(lambda: "taken" in page.js("return document.getElementById('login-error').textContent"),
                  "the refusal explained")
    page.js("document.getElementById('login-name').value = ''")
    page.type("dave", into="login-name")
    page.wait_until_connected("dave")
    assert page.focused() == "line"
    assert page.js("return location.search") == "?username=dave"


# ---- rooms and isolation ----


def test_two_browser_users_and_a_websocket_user_see_only_their_own_rooms_messages(server, alice, open_page):
    """alice (browser) and carol (WebSocket) in #general, bob (browser) in #lobby: nobody sees the other room."""
    bob = open_page("?username=bob")
    bob.wait_until_connected("bob")
    carol = server.join("carol")
    for line in ("/join general", "/join lobby", "/leave"):  # carol ends up in #general only
        carol.say(line)
    alice.type("/join general")
    alice.wait_until_connected("alice", "general")
    alice.type("/join lobby")
    alice.wait_until_connected("alice", "lobby")
    alice.type("/leave")  # alice too is in #general only
    alice.wait_until_connected("alice", "general")
    carol.say("carol in general")
    alice.type("alice in general")
    alice.wait_for_line("alice alice in general")
    bob.type("bob in the lobby")
    bob.wait_for_line("bob bob in the lobby")  # the server relayed alice's line before this echo
    alice.type("alice again")
    alice.wait_for_line("alice alice again")  # ... and bob's before this one

    assert {"carol carol in general", "alice alice in general"} <= {line[9:] for line in alice.lines()}
    assert not any("bob in the lobby" in line for line in alice.lines())
    assert [name for name, _, _ in alice.rooms()] == ["general"]
    assert not any("general" in line for line in bob.lines() if "joined" not in line and "left" not in line)
    assert [name for name, _, _ in bob.rooms()] == ["lobby"]
    messages = [event for event in carol.sync() if event["type"] == "message"]
    assert [(m["room"], m["username"], m["text"]) for m in messages] == [
        ("general", "carol", "carol in general"), ("general", "alice", "alice in general"),
        ("general", "alice", "alice again")]


def test_join_and_leave_change_the_header_and_the_sidebar(server, alice):
    """/join general makes #general current and lists it; /leave goes back to #lobby and unlists it."""
    alice.type("/join general")
    alice.wait_until_connected("alice", "general")
    alice.wait_for(lambda: alice.rooms() == [("general", 0, True), ("lobby", 0, False)], "both rooms listed")
    assert alice.users() == ["alice (you)"]
    alice.type("/leave")
    alice.wait_for_line("You left #general.")
    alice.wait_until_connected("alice", "lobby")
    alice.wait_for(lambda: alice.rooms() == [("lobby", 0, True)], "only the lobby listed")


def test_rooms_and_users_replies_are_shown_in_the_message_area(server, alice):
    """/rooms lists every room with its count; /users the users of the current room."""
    carol = server.join("carol")
    carol.say("/join general")
    carol.expect("joined", room="general")
    alice.type("/rooms")
    alice.wait_for_line("Rooms: #general (1), #lobby (2)")
    alice.type("/users")
    alice.wait_for_line("Users in #lobby (2): alice, carol")


def test_the_page_reads_the_limits_by_their_current_names(server, alice):
    """welcome.limits' max_message_length, idle_timeout, resume_grace, rate_per_second and rate_burst, no old alias."""
    limits = server.limits
    assert alice.js("return model.limits") == {
        "maxChars": limits.max_message_length, "idleSeconds": limits.idle_timeout,
        "graceSeconds": limits.resume_grace, "ratePerSecond": limits.rate_per_second, "rateBurst": limits.rate_burst}
    for old_name in ("max_message_chars", "idle_timeout_seconds", "resume_grace_seconds"):
        assert old_name not in PAGE

HELP_TABLE = """return [...document.querySelectorAll('#messages .help tr')].map(row => [...row.cells].map(cell => {
                   const box = cell.getBoundingClientRect();
                   return {text: cell.textContent, left: box.left, right: box.right,
                           font: getComputedStyle(cell).fontFamily};
                 }));"""


def test_help_lays_out_usage_and_description_as_a_table(server, alice):
    """/help is a two-column table: each command's usage, in a fixed-width font, beside its description; /quit last."""
    alice.type("/help")
    alice.wait_for(lambda: alice.js(HELP_TABLE), "the help table")
    rows = alice.js(HELP_TABLE)
    expected = [[command["usage"], command["description"]] for command in chat.help_event()["commands"]]
    assert [[cell["text"] for cell in row] for row in rows] == expected + [["/quit", "leave the chat"]]
    assert all("monospace" in usage["font"] and "monospace" not in description["font"] for usage, description in rows)
    # The descriptions line up in one column, right of the widest usage.
    assert len({round(description["left"]) for _, description in rows}) == 1
    assert rows[0][1]["left"] >= max(usage["right"] for usage, _ in rows)  # the usage cell ends in its padding
    alice.screenshot("help-table")


def test_quit_leaves_at_once_and_shows_the_login_form(server, alice):
    """/quit closes with a close frame: the others are told at once, and the page asks for a name."""
    carol = server.join("carol")
    alice.type("/quit")
    assert carol.expect("system", event="leave", username="alice")["text"] == "alice left (quit)"
    alice.wait_for(lambda: alice.focused() == "login-name", "the login form")
    server.join("alice")  # the name is free


def test_a_refused_line_shows_the_servers_error_by_the_input_line(server, alice):
    """An unknown command's error appears beside the input, in a region read out at once."""
    alice.type("/dance")
    alice.wait_for(lambda: alice.notice().startswith("Unknown command /dance."), "the error by the input line")
    assert alice.js("return document.getElementById('notice').closest('form').id") == "send"
    assert alice.js("return document.getElementById('notice').getAttribute('role')") == "alert"
    alice.type("fine now")
    alice.wait_for(lambda: alice.notice() == "", "the error to clear once a line is sent")


def test_a_message_with_html_shows_those_characters_and_runs_nothing(server, alice):
    """Everything from the server is text: an <img onerror> message shows as typed, no element appears."""
    carol = server.join("carol")
    attack = "<img src=x onerror=\"document.title='pwned'\"><b>bold?</b>"
    carol.say(attack)
    alice.wait_for_line(f"carol {attack}")
    assert alice.js("return document.querySelectorAll('#messages img, #messages b').length") == 0
    assert alice.js("return document.title") == "#lobby · alice"


def test_messages_in_another_room_count_as_unread_and_a_click_switches_there(server, alice):
    """A message in a room that is not current adds to its unread count; clicking the room joins it."""
    carol = server.join("carol")
    carol.say("/join general")
    alice.type("/join general")
    alice.wait_until_connected("alice", "general")
    alice.type("/join lobby")
    alice.wait_until_connected("alice", "lobby")
    carol.say("one")
    carol.say("two")
    alice.wait_for(lambda: ("general", 2, False) in alice.rooms(), "two unread in #general")
    alice.js("document.querySelector('#rooms button[data-room=general]').click()")
    alice.wait_until_connected("alice", "general")
    alice.wait_for(lambda: ("general", 0, True) in alice.rooms(), "#general read")
    assert [line[9:] for line in alice.lines()[-2:]] == ["carol one", "carol two"]
    assert alice.focused() == "line"


def test_each_username_has_the_colour_the_terminal_client_gives_it(server, alice):
    """A name's colour is crc32 of the folded name, as in client.py: the same on every page."""
    import client
    names = ["alice", "Bob", "carol", "dave", "eve", "x_1", "Zoë-not-valid-but-fine"]
    on_page = alice.js("return arguments[0].map(colourClass)", names)
    assert on_page == [f"c{client.username_colour(name, tuple(range(10)))}" for name in names]
    alice.type("colours")
    alice.wait_for_line("alice colours")
    assert alice.js("return document.querySelector('#messages .name').className") == \
        f"name c{zlib.crc32(b'alice') % 10}"


@pytest.mark.limits(max_message_length=20)
def test_a_counter_appears_near_the_length_limit_and_a_too_long_line_stays_in_the_input(server, alice):
    """From 80% of the limit a n/limit counter shows; a line over it is not sent and stays to be shortened."""
    counter = "return document.getElementById('counter').textContent"
    alice.driver.switch_to.active_element.send_keys("x" * 15)
    assert alice.js(counter) == ""
    alice.driver.switch_to.active_element.send_keys("x")
    alice.wait_for(lambda: alice.js(counter) == "16/20", "the counter at 16/20")
    alice.driver.switch_to.active_element.send_keys("xxxxx", Keys.ENTER)
    alice.wait_for(lambda: "limit is 20" in alice.notice(), "the too-long line refused")
    assert alice.js("return document.getElementById('line').value") == "x" * 21
    assert alice.js("return document.getElementById('counter').className") == "over"
    alice.driver.switch_to.active_element.send_keys(Keys.BACKSPACE, Keys.ENTER)
    alice.wait_for_line("alice " + "x" * 20)


# ---- typing fast: lines wait their turn ----


def test_lines_typed_faster_than_the_rate_wait_their_turn_and_all_arrive_in_order(server, alice):
    """25 lines typed in one go at the default limits (5/s, burst 10): each arrives, in order, as its own
    message; meanwhile "n waiting" shows, and the server refuses none."""
    assert (server.limits.rate_per_second, server.limits.rate_burst) == (5.0, 10)
    carol = server.join("carol")
    alice.watch("waiting")
    lines = [f"quick {number}" for number in range(1, 26)]
    started = time.monotonic()
    alice.type_fast(lines)
    typed_in = time.monotonic() - started
    alice.screenshot("typing-fast-waiting")
    assert [carol.expect("message", username="alice")["text"] for _ in lines] == lines
    alice.wait_for(lambda: alice.lines()[-1].endswith("alice quick 25"), "the last line echoed")
    mine = [line[9:] for line in alice.lines() if line[9:].startswith("alice quick")]
    assert mine == [f"alice {line}" for line in lines]
    waiting = alice.seen("waiting")
    print(f"typed 25 lines in {typed_in:.2f} s; the hint showed {waiting[:3]} ... {waiting[-2:]}")
    assert waiting and all(re.fullmatch(r"\d+ waiting", hint) for hint in waiting)
    assert max(int(hint.split()[0]) for hint in waiting) >= 2
    assert alice.js("return document.getElementById('waiting').textContent") == ""
    assert not [event for event in carol.sync() if event["type"] == "error"]
    assert not [line for line in alice.lines() if "Slow down" in line] and alice.notice() == ""


def type_all_then_send(page: Page, lines: list[str]) -> None:
    """Type the lines while the page holds them back, then let them go: they leave as fast as the page allows."""
    page.js("pacer.holdUntil = Infinity")
    page.type_fast(lines)
    page.wait_for(lambda: page.js("return pacer.lines.length") == len(lines), "every line waiting")
    page.js("pacer.holdUntil = 0; pacer.pump()")


def test_a_line_the_server_still_refuses_for_its_rate_stays_and_goes_again_in_order(server, alice):
    """With the page's pacing switched off, the server refuses lines: each refused line is named with
    "goes again in 1 s" (never "0.0 s") and sent again; all 20 arrive, in order, none merged or lost."""
    carol = server.join("carol")
    alice.js("pacer.perSecond = 0")  # as if the page trusted a far bigger burst than the server's
    alice.watch("notice")
    lines = [f"eager {number}" for number in range(1, 21)]
    type_all_then_send(alice, lines)  # back to back, however slowly the browser takes keys
    alice.wait_for(lambda: alice.seen("notice"), "a refusal")
    alice.screenshot("refused-for-rate")
    assert [carol.expect("message", username="alice")["text"] for _ in lines] == lines
    notices = alice.seen("notice")
    print(f"notices: {notices[:3]}")
    assert notices and all(re.fullmatch(r"Slow down: .*again in 1 s\. “eager \d+” waits and goes then\.", notice)
                           and not re.search(r"\d\.\d s", notice) for notice in notices)
    assert alice.js("return document.getElementById('line').value") == ""  # nothing put back to merge with
    alice.wait_for(lambda: alice.lines()[-1].endswith("alice eager 20"), "the last line echoed")
    assert [line[9:] for line in alice.lines() if "eager" in line] == [f"alice {line}" for line in lines]



@pytest.mark.limits(room_budget=20)
def test_a_line_refused_because_the_room_is_busy_waits_and_goes_again(server, alice):
    """A room over its delivery budget refuses a line with "#lobby is busy": it goes again, in order, nothing lost."""
    carol = server.join("carol")  # a line to the lobby now costs 2 of its 20 deliveries a second (2 at once)
    alice.watch("notice")
    lines = [f"busy {number}" for number in range(1, 9)]
    type_all_then_send(alice, lines)
    assert [carol.expect("message", username="alice")["text"] for _ in lines] == lines
    notices = alice.seen("notice")
    waits = r"again in 1 s\. “busy \d+” waits and goes then\.$"
    assert notices and all("#lobby is busy" in notice and re.search(waits, notice) for notice in notices), notices


@pytest.mark.limits(max_message_length=20)
def test_a_line_the_server_refuses_for_another_reason_stays_visible_and_is_never_merged(server, alice):
    """A chat line the server refuses (here too long, the page's own check switched off) is shown with the
    reason; the next line goes as typed, alone."""
    carol = server.join("carol")
    alice.js("model.limits.maxChars = 0")  # as if the page had not been told the limit
    alice.type_fast(["y" * 25, "next line"])
    assert carol.expect("message", username="alice")["text"] == "next line"
    alice.wait_for_line("Your line: “" + "y" * 25 + "”")
    [refused] = [line for line in alice.lines() if "Your line: " in line]
    assert "limit is 20" in refused
    assert alice.js("return document.getElementById('line').value") == ""
    alice.screenshot("refused-too-long")

@pytest.mark.limits(max_message_length=20)
def test_a_notice_about_the_line_clears_when_the_line_or_the_room_changes(server, alice):
    """ "Your line has 21 characters" goes away once the line is edited, or once another room is current."""
    alice.type("/join general")
    alice.wait_until_connected("alice", "general")
    alice.type("x" * 21)
    alice.wait_for(lambda: alice.notice().startswith("Your line has 21 characters"), "the too-long notice")
    alice.driver.switch_to.active_element.send_keys(Keys.BACKSPACE)
    alice.wait_for(lambda: alice.notice() == "", "the notice cleared by an edit")
    alice.driver.switch_to.active_element.send_keys("x", Keys.ENTER)
    alice.wait_for(lambda: alice.notice().startswith("Your line has 21 characters"), "the notice again")
    alice.js("document.querySelector('#rooms button[data-room=lobby]').click()")
    alice.wait_until_connected("alice", "lobby")
    alice.wait_for(lambda: alice.notice() == "", "the notice cleared by the room change")
    assert alice.js("return document.getElementById('line').value") == "x" * 21  # the line itself stays


def test_lines_typed_while_the_server_is_down_wait_and_go_once_it_is_back(server, alice):
    """Lines typed during an outage are kept ("2 waiting (sent once connected)") and sent, in order, after the login."""
    server.stop()
    alice.wait_for(lambda: alice.header()[2].startswith("reconnecting"), "the page reconnecting")
    alice.type("said while down")
    alice.type("and another")
    alice.wait_for(lambda: alice.js("return document.getElementById('waiting').textContent")
                   == "2 waiting (sent once connected)", "the lines kept")
    alice.screenshot("waiting-while-down")
    server.start()
    alice.wait_for_line("alice and another")
    assert [line[9:] for line in alice.lines() if line[9:] in ("alice said while down", "alice and another")] == [
        "alice said while down", "alice and another"]


# ---- reconnects and leaving ----


def test_a_dropped_connection_resumes_the_session_and_shows_a_missed_message_once(server, alice):
    """The page reconnects by itself with its token: same session, and what was said meanwhile shown once."""
    carol = server.join("carol")
    server.drop("alice")
    carol.say("while you were away")
    alice.wait_for_line("Disconnected: the connection broke. Reconnecting (the server keeps your session for "
                        "30 seconds)...")
    alice.wait_for_line("Reconnected: your session is back")
    alice.wait_for_line("carol while you were away")
    assert sum("while you were away" in line for line in alice.lines()) == 1
    assert not [event for event in carol.sync() if event["type"] == "system"]  # no leave/join noise


def test_after_a_server_restart_the_page_logs_in_afresh_and_rejoins_its_rooms(server, alice):
    """The restarted server knows no token: the page logs in again and rejoins its rooms, ending where it was."""
    alice.type("/join general")
    alice.type("/join quiz")
    alice.type("/join general")
    alice.wait_for(lambda: [name for name, _, current in alice.rooms() if current] == ["general"]
                   and len(alice.rooms()) == 3, "three rooms, #general current")
    server.restart()
    alice.wait_for_line("Disconnected: the server is shutting down or restarting. "
                        "Reconnecting as alice, then rejoining #quiz, #general...")
    alice.wait_until_connected("alice", "general")
    bob = server.join("bob")
    bob.say("/join quiz")
    assert "alice" in bob.expect("joined", room="quiz")["users"]
    bob.say("/join general")
    assert "alice" in bob.expect("joined", room="general")["users"]


@pytest.mark.parametrize("how", ["navigating away", "closing the tab"])
def test_leaving_the_page_ends_the_session_at_once(server, alice, how):
    """Leaving says goodbye with a close frame: the room is told "quit" and the name is free at once."""
    carol = server.join("carol")
    if how == "navigating away":
        alice.js("location.href = 'about:blank'")
    else:
        alice.driver.switch_to.window(alice.handle)
        alice.driver.close()
    assert carol.expect("system", event="leave", username="alice")["text"] == "alice left (quit)"
    server.join("alice")


def test_while_the_server_is_down_the_page_keeps_trying_and_gets_back_in_when_it_returns(server, alice):
    """A server gone for a while: the page retries (attempt 3 and on) and logs in once it is back."""
    server.stop()
    alice.wait_for_line("Disconnected: the server is shutting down or restarting. Reconnecting...")
    alice.wait_for(lambda: "(attempt 3)" in alice.header()[2], "a third attempt")
    server.start()
    alice.wait_until_connected("alice")


def test_reconnect_delays_grow_with_jitter_as_in_the_terminal_client(server, alice):
    """Attempt n waits 50-100% of min(10 s, 0.5 s x 2^(n-1)), the same as client.py's backoff."""
    import client
    for random in (0.0, 0.5, 1.0):
        on_page = alice.js(f"return [1, 2, 3, 4, 5, 6, 9].map(n => backoffSeconds(n, () => {random}))")
        assert on_page == [client.backoff_seconds(n, lambda: random) for n in (1, 2, 3, 4, 5, 6, 9)]
    assert on_page[-1] == 10.0


@pytest.mark.limits(idle_timeout=1)
def test_after_an_idle_timeout_the_page_says_so_in_minutes_and_one_click_comes_back(server, alice):
    """4008: "after N without typing" (welcome.limits.idle_timeout); one click logs in afresh, no false "restart"."""
    alice.type("/join general")
    alice.wait_for_line("You were disconnected after 1 second without typing. Press Enter or click Reconnect")
    assert alice.header()[2] == "offline" and alice.reconnect_button()
    alice.screenshot("idle-offline")
    alice.js("document.getElementById('reconnect').click()")
    every_line = """return [...model.rooms.values(), ...model.leftRooms.values()]
                      .flatMap(room => room.lines).map(line => line.text)"""  # of every room, shown or not
    alice.wait_for(lambda: sum("Connected as alice" in line for line in alice.js(every_line)) == 2, "a second login")
    assert not [line for line in alice.js(every_line) if "restart" in line or "no longer knows" in line]
    assert not [line for line in alice.js(every_line) if "Disconnected after" in line]  # the server's: ours says it


def test_durations_are_rounded_up_to_a_sensible_unit(server, alice):
    """retry_after as "1 s", "3 s", "2 min" (never "0.0 s"); limits as client.py says them: "10 minutes", "3 hours"."""
    waits = {0.0: "1 s", 0.004: "1 s", 0.2: "1 s", 1.0: "1 s", 2.2: "3 s", 59.5: "1 min", 95: "2 min"}
    assert alice.js("return arguments[0].map(waitText)", list(waits)) == list(waits.values())
    import client
    spans = {0.5: "0.5 seconds", 1: "1 second", 30: "30 seconds", 60: "1 minute", 600: "10 minutes",
             5400: "1.5 hours", 7200: "2 hours", 10800: "3 hours"}
    assert alice.js("return arguments[0].map(durationText)", list(spans)) == list(spans.values())
    assert [client.duration(span) for span in spans] == list(spans.values())  # the terminal client says the same


def test_coming_back_to_the_page_connects_again_in_the_same_rooms(server, alice):
    """After leaving, Back returns to the page, which connects again and rejoins its rooms."""
    carol = server.join("carol")
    alice.type("/join general")
    alice.wait_until_connected("alice", "general")
    alice.js("location.href = 'about:blank'")
    carol.expect("system", event="leave", username="alice")
    alice.driver.back()
    alice.wait_until_connected("alice", "general")
    carol.say("/join general")
    assert "alice" in carol.expect("joined", room="general")["users"]


# ---- closes: one rule, shared with client.py ----


def close_code_set(name: str) -> set[int]:
    """One of chat.html's close-code sets, read from its source: const NAME = new Set([...])."""
    [numbers] = re.findall(rf"const {name} = new Set\(\[([\d, ]*)\]\)", PAGE)
    return {int(number) for number in numbers.split(",")}


def test_the_page_stays_offline_after_the_same_closes_as_the_terminal_client():
    """The page's stay-offline and back-to-the-login closes are client.py's FINAL_CLOSE_CODES: they cannot drift."""
    import client
    offline, refused = close_code_set("OFFLINE_CLOSE_CODES"), close_code_set("REFUSED_CLOSE_CODES")
    assert offline == {1002, 4005, 4008, 4010, 4029} and refused == {4001, 4002, 4003}
    assert offline | refused == client.FINAL_CLOSE_CODES
    # 4004 (unknown token) is neither: both clients log in afresh at once.
    assert client.CLOSE_BAD_TOKEN not in client.FINAL_CLOSE_CODES and "const CLOSE_BAD_TOKEN = 4004;" in PAGE


@pytest.mark.parametrize("code, sentence", [
    (1002, "Disconnected: the server did not understand something this page sent, and ended the session."),
    (4029, "Disconnected: you kept sending after the server asked you to slow down."),
])
def test_after_a_deliberate_close_the_page_stays_offline_until_enter(server, alice, code, sentence):
    """1002 and 4029: the page names the reason and does not retry by itself; Enter logs in again."""
    server.close("alice", code)
    alice.wait_for_line(f"{sentence} Press Enter or click Reconnect to come back.")
    assert alice.header()[2] == "offline" and alice.reconnect_button()
    assert not alice.js("return document.getElementById('send-button').offsetParent")  # Reconnect took its place
    time.sleep(1.5)  # longer than the first reconnect delay (at most 0.5 s): the page must not have tried
    assert not server.is_online("alice") and alice.header()[2] == "offline"
    alice.screenshot(f"offline-after-{code}")
    alice.type("")
    alice.wait_until_connected("alice")
    assert not alice.reconnect_button()


def test_too_many_connections_from_an_address_keeps_the_page_offline_with_the_servers_sentence(server, alice):
    """A login refused with 4005 (address_full) is not retried: the server's sentence, then one click comes back."""
    server.close("alice", 1002)
    alice.wait_for(lambda: alice.header()[2] == "offline", "offline")
    full = "Too many connections from your address (10): close one, or wait a little."
    server.refuse_logins("address_full", full, chat.CLOSE_ADDRESS_FULL)
    alice.type("")
    alice.wait_for_line(f"{full} Press Enter or click Reconnect to come back.")
    time.sleep(1.5)  # longer than the first reconnect delay: the page must not have tried again
    assert alice.header()[2] == "offline" and alice.reconnect_button()
    assert sum(full in line for line in alice.lines()) == 1
    alice.screenshot("offline-after-4005")
    server.allow_logins()
    alice.js("document.getElementById('reconnect').click()")
    alice.wait_until_connected("alice")


def test_a_session_taken_over_by_a_newer_connection_says_so_and_stays_offline(server, alice):
    """4010: another connection resumed alice's session (another tab?): the page says so and does not fight back."""
    token = alice.js("return connection.token")
    newer = server.loop.run(ChatServer(server.port, server.manager).join("alice", token=token))
    assert newer.welcome["resumed"] is True
    alice.wait_for_line("Disconnected: your session was taken over by a newer connection with your name "
                        "(another tab or window?). Press Enter or click Reconnect to come back.")
    assert alice.header()[2] == "offline"
    alice.screenshot("offline-after-4010")
    alice.js("document.getElementById('reconnect').click()")  # the name is online elsewhere: the form says so
    alice.wait_for(lambda: "taken" in alice.js("return document.getElementById('login-error').textContent"),
                   "the login form, saying the name is taken")
    server.loop.loop.call_soon_threadsafe(newer.quit)


@pytest.mark.parametrize("code", [1000, 1001, 1009, 4009])
def test_after_other_closes_the_page_reconnects_by_itself_into_its_rooms(server, alice, code):
    """1000, 1001, 1009, 4009: the page names the reason, reconnects by itself and ends up in its rooms."""
    alice.type("/join general")
    alice.wait_until_connected("alice", "general")
    reason = {1000: "the server closed the connection", 1001: "the server is shutting down or restarting",
              1009: "a line was too big for the server", 4009: "the connection fell too far behind"}[code]
    server.close("alice", code)
    alice.wait_for_line(f"Disconnected: {reason}.")
    alice.wait_until_connected("alice", "general")
    assert not alice.reconnect_button()
    carol = server.join("carol")
    carol.say("/join general")
    assert "alice" in carol.expect("joined", room="general")["users"]


@pytest.mark.limits(resume_grace=2)
def test_a_name_held_for_a_dropped_session_is_waited_for_then_taken(server, open_page):
    """4002 with held: true: the page says the name is held (probably by you), waits retry_after and gets in."""
    server.join("alice")
    server.drop("alice")  # alice's old connection vanished: her session is held for 2 s
    page = open_page("?username=alice")
    page.wait_for(lambda: "held for a session that dropped" in
                  page.js("return document.getElementById('login-error').textContent"), "the held name explained")
    error = page.js("return document.getElementById('login-error').textContent")
    assert re.search(r"trying again in [123] s\. Or pick another name\.$", error), error
    assert page.header()[2].startswith("waiting for the name")
    page.screenshot("held-name-waiting")
    page.wait_until_connected("alice")


# ---- a phone, a keyboard, a screen reader ----


def test_on_a_phone_nothing_scrolls_sideways_and_the_input_stays_on_screen(server, alice):
    """At 375x667 with long lines and an unbroken word, the page is as wide as the screen and the input shows."""
    alice.js("return 1")  # make alice's window current for the devtools command
    alice.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                 {"width": 375, "height": 667, "deviceScaleFactor": 2, "mobile": True})
    carol = server.join("carol")
    for _ in range(3):
        carol.say("a long line that goes on and on " * 8)
    carol.say("unbroken" * 40)
    alice.wait_for_line("unbroken" * 40)
    alice.type("/help")  # its table fits too
    alice.wait_for(lambda: alice.js(HELP_TABLE), "the help table")
    alice.screenshot("phone")
    size = alice.js("""
        const page = document.documentElement, box = document.getElementById('messages');
        const input = document.getElementById('line').getBoundingClientRect();
        return {width: innerWidth, height: innerHeight, pageWidth: page.scrollWidth,
                boxWidth: box.clientWidth, boxScrollWidth: box.scrollWidth,
                inputTop: input.top, inputBottom: input.bottom, inputRight: input.right};""")
    assert size["width"] == 375 and size["pageWidth"] <= 375
    assert size["boxScrollWidth"] <= size["boxWidth"]
    assert 0 <= size["inputTop"] and size["inputBottom"] <= size["height"] and size["inputRight"] <= 375


def test_the_page_has_labels_and_announces_new_messages_politely(server, alice):
    """Every field has a label, the message area is a polite live log, and the state is a status."""
    labels = alice.js("return ['line', 'login-name'].map(id => document.getElementById(id).labels.length)")
    assert labels == [1, 1]
    assert alice.js("""const box = document.getElementById('messages');
                       return [box.getAttribute('role'), box.getAttribute('aria-live')]""") == ["log", "polite"]
    assert alice.js("return document.getElementById('state').getAttribute('role')") == "status"
    assert alice.js("return document.querySelector('aside').getAttribute('aria-label')") == "Rooms and users"


# ---- keeping up with a busy room ----


@pytest.mark.limits(rate_per_second=0)
def test_dom_updates_are_batched_per_animation_frame(server, alice):
    """Fifty messages between two frames ask for one frame and change the page in it, not before."""
    hold_frames = """if (framePending) return false;  // a frame already asked for comes first
                      window.heldFrames = [];  // from now on, the test decides when frames happen
                      window.requestAnimationFrame = (callback) => heldFrames.push(callback);
                      return true;"""
    alice.wait_for(lambda: alice.js(hold_frames), "a quiet moment between frames")
    drawn = alice.js("return document.querySelectorAll('#messages p').length")
    carol = server.join("carol")
    for number in range(50):
        carol.say(f"busy {number}")
    alice.wait_for(lambda: alice.js("return model.rooms.get('lobby').lines.at(-1).text") == "busy 49",
                   "all fifty in the model")
    assert alice.js("return heldFrames.length") == 1
    assert alice.js("return document.querySelectorAll('#messages p').length") == drawn
    # Let the frames run (a draw within 50 ms of the last one waits for a later frame).
    alice.js("while (heldFrames.length) heldFrames.splice(0).forEach((callback) => callback(performance.now()))")
    assert alice.lines()[-1].endswith("carol busy 49")
    assert len(alice.lines()) == drawn + 51  # carol joined, and her fifty lines


@pytest.mark.limits(rate_per_second=0)
def test_scrollback_is_capped_per_room(server, alice):
    """A flood leaves at most the last 500 lines of a room in the page (and in its memory)."""
    carol = server.join("carol")
    for number in range(SCROLLBACK_LINES + 100):
        carol.say(f"flood {number}")
    last = f"carol flood {SCROLLBACK_LINES + 99}"
    alice.wait_for(lambda: alice.lines()[-1].endswith(last), "the last line of the flood")
    assert len(alice.lines()) == SCROLLBACK_LINES
    assert alice.js("return model.rooms.get('lobby').lines.length") == SCROLLBACK_LINES


# ---- for people to look at ----


def test_a_screenshot_of_the_page_is_written_for_a_person_to_look_at(server, open_page, tmp_path):
    """carol's page in #general after a short chat: saved under pytest's tmp path (and the README's, on request)."""
    bob = server.join("bob")
    bob.say("/join general")
    carol = open_page("?username=carol")
    carol.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                 {"width": 880, "height": 420, "deviceScaleFactor": 1, "mobile": False})
    carol.wait_until_connected("carol")
    carol.type("/join general")
    carol.wait_until_connected("carol", "general")
    bob.say("morning carol! did you see the new web page?")
    carol.type("yes: rooms on the right, with unread counts")
    bob.say("and <b>tags</b> stay text, as they should")
    bob.say("/join lobby")
    bob.say("anyone in the lobby?")
    bob.say("/join general")
    carol.wait_for(lambda: ("lobby", 1, False) in carol.rooms(), "an unread line in #lobby")
    carol.type("see you in #lobby in a minute, bob")
    carol.wait_for_line("see you in #lobby")
    path = tmp_path / "chat-page.png"
    carol.driver.save_screenshot(str(path))
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
    print(f"screenshot: {path}")
    if os.environ.get("CHAT_README_SCREENSHOT"):  # CHAT_README_SCREENSHOT=1 refreshes the README's picture
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        README_SCREENSHOT.write_bytes(path.read_bytes())
