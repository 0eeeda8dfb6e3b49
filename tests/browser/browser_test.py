#!/usr/bin/env python3
"""The web client in a real headless Chromium, against the real server binary.

Run by scripts/browser-test (which installs Debian's chromium and
chromium-driver and PyPI's selenium, and builds the binary). Three browser
sessions (alice and bob on desktop-sized windows, carol on a phone-sized one
driven by the keyboard) use the client served by `target/debug/shindensen`
on a free port with a throwaway SQLite database and a JWT secret made here.

Bob's browser reaches the server through a small TCP proxy in this file, so
the test can cut his network (every open connection dropped, new ones
refused) while the server and alice carry on, and later restore it: that is
the "network drops, the client resumes with ?since=" case. The server is also
killed (SIGKILL) and restarted on the same port and database while alice has
a message pending.

Every wait is a condition with a deadline (WebDriverWait), never a fixed
sleep. The last line is `N passed, M failed`; the exit status is non-zero on
any failure. Screenshots go to target/browser-artifacts/; one is copied to
docs/web-client.png for the README.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.environ.get("SHINDENSEN_BIN", os.path.join(ROOT, "target", "debug", "shindensen"))
ARTIFACTS = os.path.join(ROOT, "target", "browser-artifacts")
README_SHOT = os.path.join(ROOT, "docs", "web-client.png")
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
PASSWORD = "correct horse battery"
WAIT = 20  # seconds: the deadline of every condition


def until(condition, timeout=WAIT, message=""):
    """Waits for a condition that needs no browser (server start, HTTP)."""
    return WebDriverWait(None, timeout, poll_frequency=0.05).until(lambda _: condition(), message)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ server


class Server:
    """The real binary on a fixed port, restartable on the same database."""

    def __init__(self, workdir):
        self.port = free_port()
        self.db = os.path.join(workdir, "browser.db")
        self.secret = secrets.token_urlsafe(48)  # > 32 bytes
        self.log_path = os.path.join(workdir, "server.log")
        self.proc = None

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        env = dict(os.environ)
        env.update(
            DATABASE_URL=f"sqlite:{self.db}",
            JWT_SECRET=self.secret,
            SHINDENSEN_SERVER__LISTEN=f"127.0.0.1:{self.port}",
            SHINDENSEN_LOG__LEVEL="warn",
            SHINDENSEN_LOG__FORMAT="json",
            SHINDENSEN_TRACING__OTLP_ENDPOINT="",
            OTEL_EXPORTER_OTLP_ENDPOINT="",
        )
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([BINARY], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(self.db))
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=1) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        until(ready, message="server ready")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=WAIT)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.kill()

    def request(self, method, path, body=None, token=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                return r.status, dict(r.headers), (json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw
            return e.code, dict(e.headers), parsed

    def history(self, token, chat_id):
        """Every message of a chat, oldest first, paged over HTTP."""
        out, before = [], None
        while True:
            q = f"?limit=200" + (f"&before={before}" if before else "")
            status, _, page = self.request("GET", f"/chats/{chat_id}/messages{q}", token=token)
            assert status == 200, (status, page)
            out = page + out
            if len(page) < 200:
                return out
            before = page[0]["id"]

    def forge_token(self, user_id, username, expired_secs_ago):
        """An HS256 token signed with the server's secret that expired."""

        def b64(raw):
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        now = int(time.time())
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {"sub": str(user_id), "username": username, "iat": now - 7200, "exp": now - expired_secs_ago}
        payload = b64(json.dumps(claims).encode())
        sig = hmac.new(self.secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64(sig)}"


class Proxy:
    """A TCP relay whose connections can be cut, for one user's network."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.online = True
        self.lock = threading.Lock()
        self.pairs = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.online:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, upstream)
            with self.lock:
                self.pairs.add(pair)
            threading.Thread(target=self._pump, args=(client, upstream, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pair), daemon=True).start()

    def _pump(self, src, dst, pair):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(pair)

    def _close(self, pair):
        with self.lock:
            self.pairs.discard(pair)
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def cut(self):
        self.online = False
        with self.lock:
            pairs = list(self.pairs)
        for pair in pairs:
            self._close(pair)

    def restore(self):
        self.online = True

    def close(self):
        self.cut()
        self.listener.close()


# ------------------------------------------------------------------ browser


class Browser:
    """One user's headless Chromium on the web client."""

    def __init__(self, name, base, width=1200, height=800):
        self.name = name
        self.base = base
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-features=Translate,MediaRouter,OptimizationHints",
            f"--window-size={width},{height}",
            "--lang=en-US",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        self.driver.set_window_size(width, height)
        self.console = []

    def quit(self):
        try:
            self.driver.quit()
        except Exception:  # noqa: BLE001 - best effort at the end
            pass

    # -- helpers

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, condition, message, timeout=WAIT):
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _: condition(), f"{self.name}: {message}"
        )

    def el(self, element_id):
        return self.driver.find_element(By.ID, element_id)

    def shot(self, name):
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, f"{name}.png")
        self.driver.save_screenshot(path)
        return path

    def drain_console(self):
        try:
            self.console.extend(self.driver.get_log("browser"))
        except Exception:  # noqa: BLE001 - not every driver keeps logs
            pass
        return self.console

    def view(self):
        return self.js("return document.body.dataset.view || ''")

    def connection(self):
        return self.js("return document.body.dataset.connection || ''")

    def open(self):
        self.driver.get(self.base + "/")
        self.wait(lambda: self.view() in ("login", "app"), "the client starts")

    def fill(self, element_id, text):
        field = self.el(element_id)
        field.clear()
        field.send_keys(text)

    def login(self, username, register):
        self.wait(lambda: self.view() == "login", "login form shown")
        self.fill("login-username", username)
        self.fill("login-password", PASSWORD)
        self.el("register-button" if register else "login-button").click()
        self.wait(lambda: self.view() == "app" and self.el("me-name").text == username, f"logged in as {username}")
        self.wait(lambda: self.connection() == "online", "connected")

    def token(self):
        return json.loads(self.js("return sessionStorage.getItem('shindensen.session')"))["token"]

    def user_id(self):
        return json.loads(self.js("return sessionStorage.getItem('shindensen.session')"))["user"]["id"]

    def chat_items(self):
        """The chat list as shown, top to bottom."""
        return self.js(
            """return [...document.querySelectorAll('#chat-list .chat-item')].map(b => ({
                id: Number(b.dataset.chatId), unread: Number(b.dataset.unread),
                name: b.querySelector('.name').textContent}))"""
        )

    def chat_item(self, name):
        return next((c for c in self.chat_items() if c["name"] == name), None)

    def open_chat(self, name):
        self.wait(lambda: self.chat_item(name) is not None, f"chat {name!r} listed")
        chat_id = self.chat_item(name)["id"]
        self.driver.find_element(By.CSS_SELECTOR, f'#chat-list [data-chat-id="{chat_id}"]').click()
        self.wait(lambda: self.el("chat-title").text == name, f"chat {name!r} open")
        return chat_id

    def messages(self):
        """The open chat's timeline as shown: confirmed text messages, events
        and pending sends, in display order."""
        return self.js(
            """return [...document.querySelectorAll('#message-list > li')].map(li => ({
                id: li.dataset.id ? Number(li.dataset.id) : null,
                kind: li.dataset.kind || 'text',
                pending: li.classList.contains('pending'),
                failed: li.classList.contains('failed'),
                sender: li.dataset.sender || null,
                body: (li.querySelector('.body') || li).textContent,
                receipt: li.querySelector('.receipt') ? li.querySelector('.receipt').textContent : null}))"""
        )

    def texts(self):
        return [m["body"] for m in self.messages() if m["kind"] == "text" and m["id"] is not None]

    def send(self, text):
        box = self.el("composer-input")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def wait_acked(self):
        self.wait(lambda: not any(m["pending"] for m in self.messages()), "every send acked")


# ------------------------------------------------------------------ the tests


class Suite:
    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="shindensen-browser-")
        self.server = Server(self.workdir)
        self.proxy = None
        self.browsers = []
        self.passed = 0
        self.failed = 0

    def browser(self, name, base, **size):
        b = Browser(name, base, **size)
        self.browsers.append(b)
        return b

    def run(self, name, fn):
        started = time.monotonic()
        try:
            fn()
        except Exception:  # noqa: BLE001 - every failure is reported and counted
            self.failed += 1
            print(f"FAIL {name} ({time.monotonic() - started:.1f}s)", flush=True)
            traceback.print_exc()
            for b in self.browsers:
                try:
                    print(f"  {b.name}: saved {b.shot(f'failure-{name}-{b.name}')}", flush=True)
                except Exception:  # noqa: BLE001
                    pass
        else:
            self.passed += 1
            print(f"ok   {name} ({time.monotonic() - started:.1f}s)", flush=True)

    # -- scenarios, in order; each builds on the ones before

    def test_served_with_strict_headers(self):
        status, headers, body = self.server.request("GET", "/")
        headers = {k.lower(): v for k, v in headers.items()}
        assert status == 200, status
        assert headers["content-type"].startswith("text/html"), headers
        csp = headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
        assert "script-src 'self'" in csp, csp
        assert headers["x-content-type-options"] == "nosniff"
        assert b"<script" in body and b'src="/app.js"' in body
        for path, ctype in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
            status, headers, _ = self.server.request("GET", path)
            headers = {k.lower(): v for k, v in headers.items()}
            assert status == 200 and headers["content-type"].startswith(ctype), (path, headers)

    def test_two_users_register(self):
        self.proxy = Proxy(self.server.port)
        self.alice = self.browser("alice", self.server.base)
        self.bob = self.browser("bob", self.proxy.base)
        for b in (self.alice, self.bob):
            b.open()
            assert b.view() == "login"
        self.alice.shot("01-login")
        # A too-short password is refused in the form, before any request.
        self.alice.fill("login-username", "alice")
        self.alice.fill("login-password", "short")
        self.alice.el("register-button").click()
        self.alice.wait(lambda: "8 to 128" in self.alice.el("login-notice").text, "password rule shown")
        self.alice.login("alice", register=True)
        self.bob.login("bob", register=True)
        # Registering a taken name says so.
        self.carol = self.browser("carol", self.server.base, width=390, height=844)
        self.carol.open()
        self.carol.fill("login-username", "Alice")
        self.carol.fill("login-password", PASSWORD)
        self.carol.el("register-button").click()
        self.carol.wait(lambda: "taken" in self.carol.el("login-notice").text, "username_taken shown")

    def test_direct_chat_both_ways_with_typing_and_receipts(self):
        a, b = self.alice, self.bob
        a.fill("direct-username", "bob")
        a.el("direct-button").click()
        a.wait(lambda: a.el("chat-title").text == "bob", "direct chat with bob open")
        a.send("hello bob")
        a.wait(lambda: a.texts() == ["hello bob"], "own message shown")
        a.wait_acked()
        # Bob learns of the chat from the live message: listed, 1 unread.
        b.wait(lambda: (b.chat_item("alice") or {}).get("unread") == 1, "unread count 1")
        self.direct_id = b.open_chat("alice")
        b.wait(lambda: b.texts() == ["hello bob"], "bob sees the message")
        b.wait(lambda: b.chat_item("alice")["unread"] == 0, "unread cleared on open")
        # Alice sees that bob read it.
        a.wait(
            lambda: any(m["body"] == "hello bob" and m["receipt"] == "Seen by bob" for m in a.messages()),
            "read receipt 'Seen by bob'",
        )
        # Typing: bob types, alice sees it; bob sends, the indicator goes.
        b.el("composer-input").send_keys("hi alice")
        a.wait(lambda: a.el("typing").text == "bob is typing…", "typing indicator")
        b.el("composer-input").send_keys(Keys.ENTER)
        a.wait(lambda: a.texts() == ["hello bob", "hi alice"], "alice sees the reply")
        a.wait(lambda: a.el("typing").text == "", "typing indicator cleared by the message")
        b.wait(
            lambda: any(m["body"] == "hi alice" and m["receipt"] == "Seen by alice" for m in b.messages()),
            "bob sees 'Seen by alice'",
        )
        a.shot("02-direct-chat-alice")

    def test_html_in_a_message_renders_as_text(self):
        a, b = self.alice, self.bob
        payloads = ["<script>alert(1)</script>", '<img src=x onerror="window.__xss=1">']
        for p in payloads:
            a.send(p)
        b.wait(lambda: b.texts()[-2:] == payloads, "bob sees the markup as text")
        for br in (a, b):
            assert br.js("return document.querySelectorAll('#message-list script, #message-list img').length") == 0
            assert br.js("return window.__xss === undefined")
            try:
                br.driver.switch_to.alert
                raise AssertionError(f"{br.name}: an alert opened")
            except NoAlertPresentException:
                pass
        # Chat titles are data too.
        b.shot("03-markup-as-text-bob")

    def test_offline_user_resumes_without_gaps_or_duplicates(self):
        a, b = self.alice, self.bob
        self.proxy.cut()
        b.wait(lambda: b.connection() == "offline", "bob shows the server as unreachable")
        b.wait(lambda: "unreachable" in b.el("status").text, "unreachable banner")
        # Bob writes while offline: pending until the connection is back.
        b.send("written offline")
        b.wait(lambda: any(m["pending"] and m["body"] == "written offline" for m in b.messages()), "pending shown")
        b.shot("04-offline-bob")
        sent = [f"while you were away {i}" for i in range(1, 6)]
        for text in sent:
            a.send(text)
        a.wait_acked()
        assert not any(t in b.texts() for t in sent)
        self.proxy.restore()
        b.wait(lambda: b.connection() == "online", "bob reconnects")
        b.wait(lambda: b.texts()[-6:-1] == sent or b.texts()[-5:] == sent, "bob gets what he missed")
        b.wait_acked()
        a.wait(lambda: "written offline" in a.texts(), "alice gets bob's offline message")
        # Exactly the server's history, once each, in id order.
        history = self.server.history(b.token(), self.direct_id)
        want = [m["id"] for m in history if m["kind"] == "text"]
        for br in (a, b):
            br.wait(lambda br=br: [m["id"] for m in br.messages() if m["kind"] == "text"] == want, "timeline equals history")
        assert [m["content"] for m in history].count("written offline") == 1

    def test_server_restart_resends_pending_once(self):
        a, b = self.alice, self.bob
        self.server.kill()
        for br in (a, b):
            br.wait(lambda br=br: br.connection() != "online", "sees the connection drop")
        a.send("sent during the restart")
        a.wait(lambda: any(m["pending"] for m in a.messages()), "pending while the server is down")
        self.server.start()
        a.wait(lambda: a.connection() == "online", "alice reconnects")
        a.wait_acked()
        b.wait(lambda: b.connection() == "online", "bob reconnects")
        b.wait(lambda: b.texts()[-1:] == ["sent during the restart"], "bob gets it")
        history = self.server.history(a.token(), self.direct_id)
        assert [m["content"] for m in history].count("sent during the restart") == 1
        want = [m["id"] for m in history if m["kind"] == "text"]
        for br in (a, b):
            br.wait(lambda br=br: [m["id"] for m in br.messages() if m["kind"] == "text"] == want, "timeline equals history")

    def test_group_of_three_on_phone_and_keyboard(self):
        a, b, c = self.alice, self.bob, self.carol
        c.wait(lambda: c.view() == "login", "carol at the login")
        c.login("carol", register=True)
        # Alice creates the group; its title is data, shown as text.
        title = "Team <b>one</b>"
        a.driver.find_element(By.CSS_SELECTOR, "#group-create summary").click()
        a.fill("group-title", title)
        a.fill("group-members", "bob, carol")
        a.el("group-button").click()
        a.wait(lambda: a.el("chat-title").text == title, "group open for alice")
        # Carol, on a phone-sized screen, uses only the keyboard.
        c.wait(lambda: c.chat_item(title) is not None, "group listed for carol")
        for _ in range(30):
            active = c.js("return document.activeElement.closest('.chat-item')?.dataset.chatId || null")
            if active is not None:
                break
            c.driver.switch_to.active_element.send_keys(Keys.TAB)
        else:
            raise AssertionError("no chat reachable with Tab")
        c.driver.switch_to.active_element.send_keys(Keys.ENTER)
        c.wait(lambda: c.el("chat-title").text == title, "carol opened the group with Enter")
        assert not c.el("sidebar").is_displayed(), "phone: the list gives way to the chat"
        c.driver.switch_to.active_element.send_keys("hi from carol", Keys.ENTER)
        a.wait(lambda: "hi from carol" in a.texts(), "alice sees carol")
        # Bob has the direct chat open: the group jumps to the top with 1 unread.
        b.wait(lambda: b.chat_items()[0]["name"] == title and b.chat_items()[0]["unread"] == 1, "group first, unread 1")
        a.send("hi from alice")
        b.wait(lambda: b.chat_item(title)["unread"] == 2, "unread 2")
        b.open_chat(title)
        b.send("hi from bob")
        want = ["hi from carol", "hi from alice", "hi from bob"]
        for br in (a, b, c):
            br.wait(lambda br=br: br.texts() == want, "same three messages, same order")
        ids = [[m["id"] for m in br.messages() if m["kind"] == "text"] for br in (a, b, c)]
        assert ids[0] == ids[1] == ids[2] and ids[0] == sorted(ids[0]), ids
        a.wait(lambda: any((m["receipt"] or "").startswith("Seen by") for m in a.messages()), "group receipts")
        # Rename, remove and add back.
        a.el("details-button").click()
        a.fill("rename-title", "Team renamed")
        a.el("rename-button").click()
        for br in (b, c):
            br.wait(lambda br=br: br.el("chat-title").text == "Team renamed", "new title")
        carol_id = c.user_id()
        a.driver.find_element(By.CSS_SELECTOR, f'#member-list [data-user-id="{carol_id}"] button').click()
        c.wait(lambda: c.chat_item("Team renamed") is None, "the group is gone for carol")
        c.wait(lambda: "removed" in c.el("sidebar-error").text, "carol is told")
        a.fill("add-member-username", "carol")
        a.el("add-member-button").click()
        c.wait(lambda: c.chat_item("Team renamed") is not None, "the group is back for carol")
        a.wait(lambda: len(a.driver.find_elements(By.CSS_SELECTOR, "#member-list li")) == 3, "three members again")
        events = [m["body"] for m in a.messages() if m["kind"] != "text"]
        assert any("removed carol" in e for e in events) and any("added carol" in e for e in events), events
        a.el("details-button").click()
        a.wait(lambda: a.el("details").get_attribute("hidden") is not None, "details closed")
        c.shot("05-group-phone-carol")
        path = a.shot("06-group-alice")
        os.makedirs(os.path.dirname(README_SHOT), exist_ok=True)
        shutil.copyfile(path, README_SHOT)

    def test_scroll_back_through_history_after_reload(self):
        a, b = self.alice, self.bob
        # 120 more messages from alice over the WebSocket API (in her page).
        done = a.driver.execute_async_script(
            """const [chatId, n, done] = arguments;
            const token = JSON.parse(sessionStorage.getItem('shindensen.session')).token;
            const ws = new WebSocket(`ws://${location.host}/ws?access_token=${encodeURIComponent(token)}`);
            let acked = 0;
            ws.onopen = () => { for (let i = 1; i <= n; i++) resend(i); };
            const resend = (i) => ws.send(JSON.stringify({chat_id: chatId, content: `bulk ${i}`, client_msg_id: `bulk-${i}`}));
            ws.onmessage = (e) => { const f = JSON.parse(e.data);
                if (f.type === 'ack' && ++acked === n) { ws.close(); done(acked); }
                // Over the send budget: the client's backoff, as any client would.
                else if (f.type === 'error' && f.code === 'rate_limited') setTimeout(() => resend(Number(f.client_msg_id.slice(5))), 100);
                else if (f.type === 'error') { ws.close(); done(f); } };
            ws.onerror = () => done('socket error');""",
            self.direct_id,
            120,
        )
        assert done == 120, done
        # Bob reloads: the session survives (sessionStorage), history is paged.
        b.driver.refresh()
        b.wait(lambda: b.view() == "app" and b.connection() == "online", "still logged in after reload")
        b.open_chat("alice")
        history = self.server.history(b.token(), self.direct_id)
        b.wait(lambda: [m["id"] for m in b.messages()] == [m["id"] for m in history[-50:]], "the latest page")
        for _ in range(10):
            if not b.el("older-button").is_displayed():
                break
            count = len(b.messages())
            b.js("document.getElementById('messages').scrollTop = 0")
            b.wait(lambda count=count: len(b.messages()) > count or not b.el("older-button").is_displayed(), "an older page")
        assert len(history) > 100, len(history)  # three pages at least
        b.wait(lambda: [m["id"] for m in b.messages()] == [m["id"] for m in history], "all of history, once, in order")

    def test_expired_token_returns_to_login(self):
        b = self.bob
        expired = self.server.forge_token(b.user_id(), "bob", expired_secs_ago=600)
        b.js(
            """const s = JSON.parse(sessionStorage.getItem('shindensen.session'));
            s.token = arguments[0]; sessionStorage.setItem('shindensen.session', JSON.stringify(s));""",
            expired,
        )
        b.driver.refresh()
        b.wait(lambda: b.view() == "login", "back at the login")
        b.wait(lambda: "expired" in b.el("login-notice").text, "told the session expired")
        assert b.js("return sessionStorage.getItem('shindensen.session')") is None
        b.shot("07-expired-bob")
        b.fill("login-password", "wrong password!")
        b.el("login-button").click()
        b.wait(lambda: "Wrong username or password" in b.el("login-notice").text, "wrong password refused")
        b.login("bob", register=False)
        b.wait(lambda: b.chat_item("alice") is not None and b.chat_item("Team renamed") is not None, "chats back")

    def test_no_console_errors(self):
        problems = []
        for br in self.browsers:
            for entry in br.drain_console():
                text = entry.get("message", "")
                if "Content Security Policy" in text or "Refused to" in text:
                    problems.append((br.name, text))
                elif entry.get("level") == "SEVERE" and not expected_network_error(text):
                    problems.append((br.name, text))
        assert not problems, problems

    def main(self):
        started = time.monotonic()
        status = 1
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
        try:
            self.server.start()
            for name in (
                "test_served_with_strict_headers",
                "test_two_users_register",
                "test_direct_chat_both_ways_with_typing_and_receipts",
                "test_html_in_a_message_renders_as_text",
                "test_offline_user_resumes_without_gaps_or_duplicates",
                "test_server_restart_resends_pending_once",
                "test_group_of_three_on_phone_and_keyboard",
                "test_scroll_back_through_history_after_reload",
                "test_expired_token_returns_to_login",
                "test_no_console_errors",
            ):
                self.run(name[len("test_"):], getattr(self, name))
            status = 0 if self.failed == 0 else 1
        except Exception:  # noqa: BLE001 - set-up failures count as one failure
            traceback.print_exc()
            self.failed += 1
        finally:
            for b in self.browsers:
                b.quit()
            if self.proxy:
                self.proxy.close()
            self.server.stop()
            if self.failed:
                try:
                    with open(self.server.log_path, "rb") as f:
                        tail = f.read()[-4000:].decode(errors="replace")
                    print("--- server log (tail) ---\n" + tail)
                except OSError:
                    pass
            shutil.rmtree(self.workdir, ignore_errors=True)
        print(f"browser tests took {time.monotonic() - started:.1f}s; screenshots in {ARTIFACTS}")
        print(f"{self.passed} passed, {self.failed} failed")
        return status if self.failed == 0 else 1


def expected_network_error(text):
    """Console errors the offline and restart scenarios cause on purpose
    (failed requests while the network is cut or the server is down), and
    the 401s and the 409 of the expired-token, wrong-password and taken-name
    scenarios."""
    return any(m in text for m in ("net::ERR_", "WebSocket connection to", "status of 401", "status of 409"))


if __name__ == "__main__":
    sys.exit(Suite().main())
