"""A small shindensen client for the cluster tests: HTTP calls and a
WebSocket session that records every frame, resumes with `?since=` on any
node, and checks the contract's order and no-duplicate rules as it goes.
"""
import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid

import websockets

PASSWORD = "cluster-test-password"


def call(base, method, path, body=None, token=None, timeout=10):
    req = urllib.request.Request(base + path, method=method)
    if body is not None:
        req.data = json.dumps(body).encode()
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def login(base, name):
    status, body = call(base, "POST", "/login", {"username": name, "password": PASSWORD})
    assert status == 200, (status, body)
    return body["token"], body["user"]["id"]


def history(base, token, chat):
    """The whole history of `chat`, ascending."""
    out, after = [], 0
    while True:
        status, page = call(base, "GET", f"/chats/{chat}/messages?after={after}&limit=200", token=token)
        assert status == 200, (status, page)
        if not page:
            return out
        out += page
        after = page[-1]["id"]


async def until(what, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Session:
    """One user's logical session: a chain of WebSocket connections, each
    resuming where the previous one stopped. Every message frame is kept
    with the time it arrived; order and duplicates are checked on arrival."""

    def __init__(self, name, token, user_id):
        self.name, self.token, self.user_id = name, token, user_id
        self.messages = []          # message frames in arrival order (over all connections)
        self.arrived = {}           # id -> monotonic time of arrival
        self.acks = {}              # client_msg_id -> ack frame
        self.errors = []            # error frames
        self.others = []            # typing / read / resync frames
        self.violations = []
        self.ws = None
        self.reader = None
        self.node = None

    @property
    def last_id(self):
        return self.messages[-1]["id"] if self.messages else 0

    async def connect(self, base, since=None):
        url = base.replace("http://", "ws://", 1) + f"/ws?access_token={self.token}"
        if since is not None:
            url += f"&since={since}"
        self.ws = await websockets.connect(url, max_size=None, open_timeout=10)
        self.node = base
        self.reader = asyncio.create_task(self._read(self.ws))
        return self

    async def resume(self, base):
        """Reconnects (to any node) from the highest id seen."""
        await self.close()
        await self.connect(base, since=self.last_id)

    async def _read(self, ws):
        try:
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    if self.messages and frame["id"] <= self.messages[-1]["id"]:
                        self.violations.append(
                            f"{self.name}: id {frame['id']} after {self.messages[-1]['id']}")
                    self.messages.append(frame)
                    self.arrived[frame["id"]] = time.monotonic()
                elif kind == "ack":
                    self.acks[frame["client_msg_id"]] = frame
                elif kind == "error":
                    self.errors.append(frame)
                else:
                    self.others.append(frame)
        except websockets.ConnectionClosed:
            pass
        except OSError:
            pass

    async def send(self, chat, content, key=None):
        key = key or str(uuid.uuid4())
        await self.ws.send(json.dumps({"chat_id": chat, "content": content, "client_msg_id": key}))
        return key

    async def send_frame(self, frame):
        await self.ws.send(json.dumps(frame))

    async def acked(self, key, timeout=20.0):
        await until(f"{self.name}'s ack of {key}", lambda: key in self.acks, timeout)
        return self.acks[key]

    def ids(self, chat=None):
        return [m["id"] for m in self.messages if chat is None or m["chat_id"] == chat]

    async def close(self):
        if self.ws is not None:
            try:
                await self.ws.close()
            except Exception:  # noqa: BLE001 - the node may be gone
                pass
            if self.reader:
                await asyncio.wait([self.reader], timeout=5)
            self.ws = None

    def abandon(self):
        """Forgets the connection without a close handshake (its node died)."""
        if self.reader:
            self.reader.cancel()
        if self.ws is not None:
            self.ws.transport.abort()
        self.ws = None
