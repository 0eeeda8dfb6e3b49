#!/usr/bin/env python3
"""Cross-node checks against a running compose cluster (scripts/cluster-compose-check
starts it): HAProxy in front, nodes published on 127.0.0.1, and docker to
kill, start and stop nodes.

1. Cross-node delivery: alice on one node directly, bob through HAProxy on
   another; both send at once; each connection receives every message in
   ascending id order, equal to the history read on the third node.
2. A node killed (docker kill) under traffic: bob's connection breaks, he
   reconnects through HAProxy with ?since= to another node and misses
   nothing; HAProxy marks the node down; after docker start it is back in
   rotation.
3. A node drained (docker stop, SIGTERM): HAProxy takes it out of rotation
   before it closes bob's connection with 1001; bob reconnects through
   HAProxy to another node with ?since= and misses nothing; the node exits 0.

At the end every connection's messages, joined across its reconnects, are
the chat's history: ascending ids, no gap, no duplicate.

Usage: cluster_check.py --lb URL --stats URL --node NAME=CONTAINER ...
Exits 0 on success; prints what it checked.
"""
import argparse
import asyncio
import csv
import io
import itertools
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import websockets

PASSWORD = "cluster-check-password"
RATE = 20  # messages per second while nodes are killed and drained


class CheckFailed(Exception):
    pass


def check(ok, what):
    if not ok:
        raise CheckFailed(what)


def call(base, method, path, body=None, token=None):
    req = urllib.request.Request(base + path, method=method)
    if body is not None:
        req.data = json.dumps(body).encode()
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def docker(*args):
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout.strip()


class Cluster:
    def __init__(self, lb, stats, nodes):
        self.lb, self.stats, self.containers = lb, stats, nodes

    def url(self, name):
        """The node's published port, read again each time (it changes on start)."""
        hostport = docker("port", self.containers[name], "3000/tcp").splitlines()[0]
        return "http://" + hostport.replace("0.0.0.0", "127.0.0.1")

    def lb_status(self):
        """HAProxy's view: {server: "UP" | "DOWN" | ...} of backend shindensen."""
        with urllib.request.urlopen(self.stats + "/stats;csv", timeout=5) as res:
            rows = csv.DictReader(io.StringIO(res.read().decode().lstrip("# ")))
            return {r["svname"]: r["status"] for r in rows
                    if r["pxname"] == "shindensen" and r["svname"] not in ("FRONTEND", "BACKEND")}


async def until(pred, secs, what):
    """Polls pred every 50 ms until it holds; fails after secs."""
    deadline = time.monotonic() + secs
    while not pred():
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {secs}s waiting for: {what}")
        await asyncio.sleep(0.05)


class Conn:
    """One WebSocket: frames are collected by a reader task."""

    def __init__(self, who):
        self.who, self.msgs, self.acks, self.errors = who, [], {}, []
        self.close_code, self.ws, self.node, self.reader = None, None, None, None

    async def open(self, base, token, since=None):
        url = base.replace("http://", "ws://", 1) + "/ws" + (f"?since={since}" if since is not None else "")
        self.ws = await websockets.connect(url, additional_headers={"Authorization": "Bearer " + token},
                                           open_timeout=10, max_queue=None)
        self.node = self.ws.response.headers.get("x-shindensen-node")
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self):
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                if frame["type"] == "message":
                    self.msgs.append(frame)
                elif frame["type"] == "ack":
                    self.acks[frame["client_msg_id"]] = frame
                elif frame["type"] == "error":
                    self.errors.append(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code if self.ws.close_code is not None else 1006

    @property
    def closed(self):
        return self.close_code is not None

    async def send(self, chat, content, key):
        await self.ws.send(json.dumps({"chat_id": chat, "content": content, "client_msg_id": key}))

    async def close(self):
        await self.ws.close()
        await self.reader


class User:
    """A user's connections in order; `stream` joins their messages."""

    def __init__(self, name, token):
        self.name, self.token, self.conns = name, token, []

    @property
    def conn(self):
        return self.conns[-1]

    def stream(self):
        return [m["id"] for c in self.conns for m in c.msgs]

    def last_id(self):
        ids = self.stream()
        return ids[-1] if ids else 0

    async def connect(self, base, since=None):
        self.conns.append(await Conn(self.name).open(base, self.token, since))
        return self.conn

    async def reconnect_via(self, lb, secs=30, avoid=None):
        """Reconnects through HAProxy with ?since= until it works (a client's loop)."""
        deadline, attempts = time.monotonic() + secs, 0
        while True:
            attempts += 1
            try:
                conn = await Conn(self.name).open(lb, self.token, since=self.last_id())
            except (OSError, websockets.InvalidStatus, websockets.InvalidHandshake, asyncio.TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise CheckFailed(f"{self.name} could not reconnect through HAProxy within {secs}s: {e!r}")
                await asyncio.sleep(0.2)
                continue
            check(conn.node != avoid, f"{self.name} reconnected to {avoid}, the node that is gone")
            self.conns.append(conn)
            return attempts


class Sender:
    """Sends RATE messages a second on a user's current connection until stopped."""

    def __init__(self, user, chat, tag):
        self.user, self.chat, self.tag, self.keys, self.stop = user, chat, tag, [], asyncio.Event()

    async def run(self):
        for i in itertools.count():
            if self.stop.is_set():
                return
            key = f"{self.tag}-{i}-{uuid.uuid4().hex[:6]}"
            await self.user.conn.send(self.chat, f"{self.tag} {i}", key)
            self.keys.append(key)
            try:
                await asyncio.wait_for(self.stop.wait(), 1 / RATE)
            except asyncio.TimeoutError:
                pass

    def acked(self):
        acks = {}
        for c in self.user.conns:
            acks.update(c.acks)
        return [acks[k]["id"] for k in self.keys if k in acks]


def history(base, chat, token):
    ids, after = [], 0
    while True:
        status, page = call(base, "GET", f"/chats/{chat}/messages?after={after}&limit=200", token=token)
        check(status == 200, f"history: {status} {page}")
        if not page:
            return ids
        ids += [m["id"] for m in page]
        after = page[-1]["id"]


def in_order(ids, expected, who):
    dups = len(ids) - len(set(ids))
    check(dups == 0, f"{who}: {dups} duplicate message(s)")
    check(ids == sorted(ids), f"{who}: ids out of order: {ids}")
    missing = sorted(set(expected) - set(ids))
    check(not missing, f"{who}: missed {len(missing)} message(s): {missing[:20]}")
    check(ids == expected, f"{who}: got {ids}, expected {expected}")


async def main(args):
    cluster = Cluster(args.lb.rstrip("/"), args.stats.rstrip("/"), dict(n.split("=", 1) for n in args.node))
    names = sorted(cluster.containers)
    lb = cluster.lb
    status = cluster.lb_status()
    check(all(s == "UP" for s in status.values()) and sorted(status) == names, f"HAProxy backends: {status}")
    print(f"HAProxy: {', '.join(f'{n} {s}' for n, s in sorted(status.items()))}")

    # Accounts and the chat, through HAProxy.
    suffix = uuid.uuid4().hex[:8]
    users = {}
    for who in ("alice", "bob"):
        name = f"{who}-{suffix}"
        status, body = call(lb, "POST", "/register", {"username": name, "password": PASSWORD})
        check(status == 201, f"register {name}: {status} {body}")
        users[who] = User(name, body["token"])
    alice, bob = users["alice"], users["bob"]
    status, body = call(lb, "POST", "/chats/initiate", {"target_username": bob.name}, alice.token)
    check(status == 200 and body["status"] == "created", f"initiate: {status} {body}")
    chat = body["chat_id"]
    # A token issued through HAProxy works on every node (one JWT secret).
    for name in names:
        status, body = call(cluster.url(name), "GET", "/chats", token=bob.token)
        check(status == 200 and [c["chat_id"] for c in body] == [chat], f"GET /chats on {name}: {status} {body}")
    print(f"registered {alice.name} and {bob.name} through HAProxy, chat {chat}; "
          f"bob's token accepted by {', '.join(names)}")

    # 1. Cross-node delivery, both sending at once.
    await bob.connect(lb)
    check(bob.conn.node in names, f"HAProxy did not name the node of bob's connection: {bob.conn.node!r}")
    node_b = bob.conn.node
    node_a = next(n for n in names if n != node_b)
    third = next(n for n in names if n not in (node_a, node_b))
    await alice.connect(cluster.url(node_a))
    alice.conn.node = node_a
    keys = {"alice": [], "bob": []}
    for i in range(30):
        for who in ("alice", "bob"):
            key = f"{who}-{i}-{uuid.uuid4().hex[:6]}"
            keys[who].append(key)
            await users[who].conn.send(chat, f"{who} says {i}", key)
    await until(lambda: all(k in users[w].conn.acks for w in keys for k in keys[w]), 30, "60 acks")
    check(not alice.conn.errors and not bob.conn.errors, f"error frames: {alice.conn.errors + bob.conn.errors}")
    expected = sorted(users[w].conn.acks[k]["id"] for w in keys for k in keys[w])
    await until(lambda: len(alice.stream()) >= 60 and len(bob.stream()) >= 60, 10, "60 messages on each connection")
    in_order(alice.stream(), expected, f"alice ({node_a}, direct)")
    in_order(bob.stream(), expected, f"bob ({node_b}, via HAProxy)")
    for m in bob.conn.msgs:
        who = m["sender"].split("-")[0]
        check(m["content"].startswith(f"{who} says "), f"content {m}")
    in_order(history(cluster.url(third), chat, bob.token), expected, f"history on {third}")
    print(f"cross-node: 60 messages sent at once by alice on {node_a} (direct) and bob on {node_b} "
          f"(via HAProxy): both connections received all 60 in ascending id order, equal to the "
          f"history read on {third}")

    # 2. Kill bob's node while alice keeps sending.
    sender = Sender(alice, chat, "during-kill")
    task = asyncio.create_task(sender.run())
    await until(lambda: len(sender.acked()) >= RATE, 10, "alice's first acks before the kill")
    before = len(bob.stream())
    docker("kill", cluster.containers[node_b])
    killed_at = time.monotonic()
    await until(lambda: bob.conns[0].closed, 30, f"bob's connection to {node_b} to break after docker kill")
    broke_after = time.monotonic() - killed_at
    attempts = await bob.reconnect_via(lb, avoid=node_b)
    node_b2 = bob.conn.node
    reconnected_after = time.monotonic() - killed_at
    n_acked = len(sender.acked())
    await until(lambda: len(sender.acked()) >= n_acked + RATE, 15, "alice's acks after bob's reconnect")
    sender.stop.set()
    await task
    await until(lambda: len(sender.acked()) == len(sender.keys), 15, "acks of every message alice sent")
    expected = history(lb, chat, bob.token)
    await until(lambda: len(bob.stream()) >= len(expected), 15, "bob to catch up after the resume")
    in_order(bob.stream(), expected, "bob, across the kill")
    await until(lambda: len(alice.stream()) >= len(expected), 15, "alice to catch up")
    in_order(alice.stream(), expected, f"alice ({node_a})")
    await until(lambda: cluster.lb_status()[node_b] != "UP", 15, f"HAProxy to mark {node_b} down")
    print(f"kill: docker kill {node_b} during {len(sender.keys)} sends by alice; bob's connection broke "
          f"after {broke_after:.1f}s (close {bob.conns[0].close_code}) with {before} messages seen, "
          f"reconnected through HAProxy with ?since= to {node_b2} after {reconnected_after:.1f}s "
          f"({attempts} attempt(s)); missed nothing: {len(expected)} messages in order, equal to history; "
          f"HAProxy: {node_b} {cluster.lb_status()[node_b]}")

    docker("start", cluster.containers[node_b])
    await until(lambda: cluster.lb_status()[node_b] == "UP", 90, f"{node_b} back in HAProxy's rotation")
    print(f"restart: {node_b} started again and is back in rotation")

    # 3. Drain bob's node (SIGTERM). Alice moves off it first if she is there.
    target = node_b2
    if alice.conn.node == target:
        other = next(n for n in names if n != target)
        await alice.conn.close()
        await alice.connect(cluster.url(other), since=alice.last_id())
        alice.conn.node = other
        print(f"alice moved to {other} (resumed directly with ?since={alice.last_id()})")
    sender = Sender(alice, chat, "during-drain")
    task = asyncio.create_task(sender.run())
    await until(lambda: len(sender.acked()) >= RATE, 10, "alice's first acks before the drain")
    stopped_at = time.monotonic()
    stop = asyncio.get_running_loop().run_in_executor(None, docker, "stop", cluster.containers[target])
    down_after = None
    drained = bob.conn
    while not drained.closed:
        if down_after is None and cluster.lb_status()[target] != "UP":
            down_after = time.monotonic() - stopped_at
        check(time.monotonic() - stopped_at < 30, f"{target} did not close bob's connection within 30s of SIGTERM")
        await asyncio.sleep(0.05)
    closed_after = time.monotonic() - stopped_at
    check(drained.close_code == 1001, f"bob's connection to the draining {target} closed with {drained.close_code}, not 1001")
    check(down_after is not None, f"HAProxy still had {target} in rotation when it closed its connections")
    attempts = await bob.reconnect_via(lb, avoid=target)
    check(attempts == 1, f"bob needed {attempts} attempts to reconnect after the drain")
    n_acked = len(sender.acked())
    await until(lambda: len(sender.acked()) >= n_acked + RATE, 15, "alice's acks after bob's reconnect")
    sender.stop.set()
    await task
    await until(lambda: len(sender.acked()) == len(sender.keys), 15, "acks of every message alice sent")
    await stop
    exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", cluster.containers[target])
    check(exit_code == "0", f"{target} exited with {exit_code} after SIGTERM")
    expected = history(lb, chat, bob.token)
    await until(lambda: len(bob.stream()) >= len(expected), 15, "bob to catch up after the drain")
    in_order(bob.stream(), expected, "bob, across the drain")
    await until(lambda: len(alice.stream()) >= len(expected), 15, "alice to catch up")
    in_order(alice.stream(), expected, "alice")
    print(f"drain: docker stop {target}: HAProxy took it out after {down_after:.1f}s, it closed bob's "
          f"connection with 1001 after {closed_after:.1f}s, bob reconnected through HAProxy to "
          f"{bob.conn.node} at the first attempt with ?since= and missed nothing; {target} exited 0")

    for u in (alice, bob):
        check(all(not c.errors for c in u.conns), f"{u.name}: error frames {[c.errors for c in u.conns]}")
        await u.conn.close()
    print(f"cluster check ok: {len(expected)} messages; every connection of alice "
          f"({len(alice.conns)}) and bob ({len(bob.conns)}), joined across reconnects, equals the history")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--lb", required=True, help="HAProxy's public URL")
    p.add_argument("--stats", required=True, help="HAProxy's stats URL")
    p.add_argument("--node", action="append", required=True, help="NAME=CONTAINER (HAProxy's server name)")
    try:
        asyncio.run(main(p.parse_args()))
    except CheckFailed as e:
        print(f"cluster check FAILED: {e}", file=sys.stderr)
        sys.exit(1)
