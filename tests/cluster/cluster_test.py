#!/usr/bin/env python3
"""The contract's "Several nodes" section on a real cluster: three
shindensen nodes, PostgreSQL and NATS, each on its own host (a network
namespace with a veth into a private bridge).

    cluster_test.py --binary target/debug/shindensen [--only NAME ...] [--keep]

Run as root (scripts/cluster-test does). Prints one line per check with
its figures; exits non-zero at the first failure, leaving the logs in the
printed directory.
"""
import argparse
import asyncio
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from client import PASSWORD, Session, call, history, login, until  # noqa: E402
from net import Nats, Net, Postgres, Process, http_ok, wait_until  # noqa: E402

NODES = ["n1", "n2", "n3"]


class Cluster:
    def __init__(self, binary, base):
        self.base = base
        self.net = Net()
        self.net.add_host("pg", 10)
        self.net.add_host("nats", 11)
        for i, n in enumerate(NODES):
            self.net.add_host(n, 21 + i)
        self.pg = Postgres(self.net, "pg", self.net.ip(10), base)
        self.nats = Nats(self.net, "nats", self.net.ip(11), base)
        self.secret = secrets.token_urlsafe(48)
        self.binary = os.path.abspath(binary)
        self.nodes = {}
        for i, n in enumerate(NODES):
            env = dict(os.environ)
            env.update({
                "DATABASE_URL": f"postgres://postgres@{self.pg.ip}:5432/shindensen",
                "JWT_SECRET": self.secret,
                "SHINDENSEN_CLUSTER__NATS_URL": f"nats://{self.nats.ip}:4222",
                "SHINDENSEN_SERVER__LISTEN": "0.0.0.0:3000",
                "SHINDENSEN_WS__SEND_RATE_PER_SEC": "100000",
                "SHINDENSEN_WS__SEND_BURST": "100000",
                "SHINDENSEN_AUTH__LOGIN_ATTEMPTS_PER_IP": "100000",
                "SHINDENSEN_AUTH__LOGIN_ATTEMPTS_PER_USERNAME": "100000",
                "SHINDENSEN_DATABASE__CONNECT_TIMEOUT_MS": "2000",
                "SHINDENSEN_SHUTDOWN__DRAIN_DELAY_MS": "0",
                "SHINDENSEN_LOG__FORMAT": "pretty",
                "RUST_LOG": "info",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "",
            })
            self.nodes[n] = Process(self.net, n, [self.binary], env=env, log_dir=base)

    def url(self, node):
        return f"http://{self.net.ip(21 + NODES.index(node))}:3000"

    def start(self):
        self.pg.start()
        wait_until("the database", lambda: self.pg_exec("SELECT 1"), timeout=30)
        self.pg_exec("CREATE DATABASE shindensen")
        self.nats.start()
        for n in NODES:
            self.start_node(n)

    def pg_exec(self, sql):
        out = self.net.exec("pg", "runuser", "-u", "postgres", "--", "psql", "-h", self.pg.ip,
                            "-U", "postgres", "-tAc", sql)
        return out.returncode == 0

    def start_node(self, n):
        self.nodes[n].start()
        wait_until(f"{n} ready", lambda: http_ok(self.url(n) + "/readyz"), timeout=60)

    def metric(self, node, name):
        with urllib.request.urlopen(self.url(node) + "/metrics", timeout=5) as res:
            for line in res.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return None

    def close(self):
        for p in list(self.nodes.values()) + [self.nats.proc, self.pg.proc]:
            try:
                p.kill()
            except Exception:  # noqa: BLE001
                pass
        self.net.close()


def user(c, name, node="n1"):
    token, uid = login(c.url(node), name)
    return Session(name, token, uid)


def group(c, owner, title, members, node="n1"):
    status, chat = call(c.url(node), "POST", "/chats",
                        {"type": "group", "title": title, "members": members}, token=owner.token)
    assert status == 201, (status, chat)
    return chat["chat_id"]


def check_stream(session, allowed_chats=None):
    assert not session.violations, session.violations[:5]
    ids = session.ids()
    assert len(ids) == len(set(ids)), f"{session.name}: duplicates"
    if allowed_chats is not None:
        stray = [m for m in session.messages if m["chat_id"] not in allowed_chats]
        assert not stray, f"{session.name}: messages of chats not its own: {stray[:3]}"


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# --- the checks -----------------------------------------------------------

async def cross_node_delivery(c, tag):
    """A message sent on one node reaches members on the others; typing
    and read frames cross nodes; every connection's ids equal history."""
    alice, bob, carol = (user(c, f"{tag}{n}") for n in ("alice", "bob", "carol"))
    chat = group(c, alice, "cross", [bob.name, carol.name])
    await alice.connect(c.url("n1"), since=0)
    await bob.connect(c.url("n2"), since=0)
    await carol.connect(c.url("n3"), since=0)
    keys = [await alice.send(chat, f"hello {i}") for i in range(30)]
    last = (await alice.acked(keys[-1]))["id"]
    for s in (bob, carol):
        await until(f"{s.name} to get {last}", lambda s=s: s.last_id >= last)
    expected = [m["id"] for m in history(c.url("n2"), bob.token, chat)]
    for s in (alice, bob, carol):
        check_stream(s, {chat})
        assert s.ids(chat) == expected, (s.name, s.ids(chat)[:5], expected[:5])
    # They came over NATS, not by polling the database.
    for n in ("n2", "n3"):
        got = c.metric(n, "shindensen_stream_from_peers_total") or 0
        assert got >= len(keys), f"{n} delivered only {got} messages from NATS announcements"
    await bob.send_frame({"type": "typing", "chat_id": chat})
    await until("typing on n1 and n3", lambda: all(
        any(f["type"] == "typing" and f["user_id"] == bob.user_id for f in s.others)
        for s in (alice, carol)))
    await carol.send_frame({"type": "read", "chat_id": chat, "up_to": last})
    await until("read on n1 and n2", lambda: all(
        any(f["type"] == "read" and f["user_id"] == carol.user_id and f["up_to"] == last
            for f in s.others) for s in (alice, bob)))
    for s in (alice, bob, carol):
        await s.close()
    return f"{len(expected)} messages n1 -> n2, n3 in order; typing n2 -> n1, n3; read n3 -> n1, n2"


async def concurrent_senders(c, tag, per_sender=150):
    """Senders on all nodes at once: every connection receives ascending
    ids, equal to history, and every acked message."""
    users = [user(c, f"{tag}u{i}") for i in range(6)]
    chat = group(c, users[0], "busy", [u.name for u in users[1:]])
    for i, u in enumerate(users):
        await u.connect(c.url(NODES[i % 3]), since=0)
    started = time.monotonic()

    async def sender(u):
        keys = []
        for i in range(per_sender):
            keys.append(await u.send(chat, f"{u.name} {i}"))
            if i % 25 == 24:
                await u.acked(keys[-1])
        await u.acked(keys[-1])
        return keys

    all_keys = await asyncio.gather(*(sender(u) for u in users))
    acked = {u.acks[k]["id"] for u, keys in zip(users, all_keys) for k in keys}
    top = max(acked)
    for u in users:
        await until(f"{u.name} to get {top}", lambda u=u: u.last_id >= top)
    elapsed = time.monotonic() - started
    expected = [m["id"] for m in history(c.url("n3"), users[0].token, chat)]
    assert acked <= set(expected), "an acked message is missing from history"
    for u in users:
        check_stream(u, {chat})
        assert u.ids(chat) == expected, (u.name, len(u.ids(chat)), len(expected))
    for u in users:
        await u.close()
    n = len(acked)
    return f"{n} messages from 6 senders on 3 nodes, {n / elapsed:.0f} msg/s; 6 connections == history"


async def resume_elsewhere(c, tag):
    """Resume on another node gives exactly the missed messages; a resend
    through another node gets the original ack."""
    alice, bob = user(c, f"{tag}alice"), user(c, f"{tag}bob")
    status, body = call(c.url("n1"), "POST", "/chats/initiate", {"target_username": bob.name},
                        token=alice.token)
    assert status == 200, body
    chat = body["chat_id"]
    await alice.connect(c.url("n1"), since=0)
    await bob.connect(c.url("n2"), since=0)
    k = await alice.send(chat, "before")
    first = (await alice.acked(k))["id"]
    await until("bob gets the first", lambda: bob.last_id >= first)
    await bob.close()
    keys = [await alice.send(chat, f"missed {i}") for i in range(10)]
    missed = [(await alice.acked(k))["id"] for k in keys]
    before = len(bob.messages)
    await bob.connect(c.url("n3"), since=bob.last_id)
    await until("bob's replay", lambda: bob.last_id >= missed[-1])
    got = [m["id"] for m in bob.messages[before:]]
    assert got == missed, (got, missed)
    # Idempotent resend through another node.
    original = alice.acks[keys[3]]
    await alice.close()
    alice.acks.clear()
    await alice.connect(c.url("n2"), since=alice.last_id)
    await alice.send(chat, "missed 3", key=keys[3])
    again = await alice.acked(keys[3])
    assert again["id"] == original["id"], (again, original)
    stored = [m for m in history(c.url("n1"), bob.token, chat) if m["content"] == "missed 3"]
    assert len(stored) == 1, stored
    check_stream(bob, {chat})
    await alice.close()
    await bob.close()
    return "bob resumed on n3 with exactly the 10 he missed on n2; alice's resend via n2 got the original ack"


async def removal_elsewhere(c, tag):
    """A member removed while nodes 1 and 2 keep sending gets nothing of
    the chat after the removal event, on node 3."""
    alice, dave, erin = (user(c, f"{tag}{n}") for n in ("alice", "dave", "erin"))
    chat = group(c, alice, "removal", [dave.name, erin.name])
    await alice.connect(c.url("n1"), since=0)
    await dave.connect(c.url("n2"), since=0)
    await erin.connect(c.url("n3"), since=0)
    stop = asyncio.Event()

    async def chatter(s):
        n = 0
        while not stop.is_set():
            k = await s.send(chat, f"{s.name} {n}")
            n += 1
            if n % 10 == 0:
                await s.acked(k)
        return n

    tasks = [asyncio.create_task(chatter(s)) for s in (alice, dave)]
    await until("erin sees 60 messages", lambda: len(erin.ids(chat)) >= 60)
    status, _ = await asyncio.to_thread(call, c.url("n1"), "DELETE",
                                        f"/chats/{chat}/members/{erin.user_id}", None, alice.token)
    assert status == 204, status
    await asyncio.sleep(0)  # let the senders go on for a while after the removal
    await until("60 more messages after the removal", lambda: len(alice.ids(chat)) >= len(erin.ids(chat)) + 60)
    stop.set()
    await asyncio.gather(*tasks)
    removal = [m for m in erin.messages if m.get("kind") == "member_removed"]
    assert removal, "erin never got her removal event"
    last = erin.messages[-1]
    assert last.get("kind") == "member_removed", f"erin got {last} after her removal"
    after = [i for i in alice.ids(chat) if i > removal[0]["id"]]
    check_stream(erin, {chat})
    for s in (alice, dave, erin):
        await s.close()
    return f"erin's last frame is her removal (id {removal[0]['id']}); {len(after)} later messages did not reach her"


async def kill_a_node(c, tag):
    """kill -9 of a node under load: after resumes every acked message
    reached every member session exactly once, in order."""
    users = [user(c, f"{tag}k{i}") for i in range(6)]
    chat = group(c, users[0], "kill", [u.name for u in users[1:]])
    home = {u.name: NODES[i % 3] for i, u in enumerate(users)}
    for u in users:
        await u.connect(c.url(home[u.name]), since=0)
    keys = {u.name: [] for u in users}
    stop = asyncio.Event()

    async def sender(u):
        i = 0
        while not stop.is_set():
            try:
                k = await u.send(chat, f"{u.name} {i}", key=f"{u.name}-{i}")
                keys[u.name].append(k)
                i += 1
                if i % 10 == 0:
                    await u.acked(k, timeout=5)
            except Exception:  # noqa: BLE001 - its node died: resume elsewhere, resend
                await reconnect(u)
                for k in keys[u.name]:
                    if k not in u.acks:
                        await u.send(chat, f"{u.name} {int(k.rsplit('-', 1)[1])}", key=k)

    async def reconnect(u):
        u.abandon()
        for n in NODES:
            if n != "n2":
                try:
                    await u.connect(c.url(n), since=u.last_id)
                    return
                except Exception:  # noqa: BLE001
                    continue

    tasks = [asyncio.create_task(sender(u)) for u in users]
    await until("some traffic", lambda: len(users[0].ids(chat)) >= 200)
    c.nodes["n2"].kill(signal.SIGKILL)
    killed_at = len(users[0].ids(chat))
    # Receivers on n2 notice the dead socket when they next send: the
    # senders above do that. Let the others go on for a while.
    await until("traffic after the kill", lambda: len(users[0].ids(chat)) >= killed_at + 200, timeout=30)
    stop.set()
    await asyncio.gather(*tasks)
    for u in users:
        for k in keys[u.name]:
            await u.acked(k, timeout=20)
    acked = {u.acks[k]["id"] for u in users for k in keys[u.name]}
    top = max(acked)
    for u in users:
        await until(f"{u.name} to reach {top}", lambda u=u: u.last_id >= top, timeout=30)
    expected = [m["id"] for m in history(c.url("n1"), users[0].token, chat)]
    assert acked <= set(expected)
    for u in users:
        check_stream(u, {chat})
        assert u.ids(chat) == expected, (u.name, len(u.ids(chat)), len(expected))
    for u in users:
        await u.close()
    c.start_node("n2")
    return f"n2 killed after {killed_at} messages; {len(acked)} acked, all reached all 6 sessions once, in order"


async def nats_partition(c, tag, seconds=10):
    """A node cut off from NATS for 10 s misses nothing; it says so in a
    metric and a log line; the fallback's delay is measured."""
    alice, bob = user(c, f"{tag}alice"), user(c, f"{tag}bob")
    chat = group(c, alice, "partition", [bob.name])
    await alice.connect(c.url("n1"), since=0)
    await bob.connect(c.url("n3"), since=0)

    async def paced(duration, interval=0.05):
        sent = {}
        end = time.monotonic() + duration
        while time.monotonic() < end:
            k = await alice.send(chat, "tick")
            sent[k] = time.monotonic()
            await asyncio.sleep(interval)
        for k in sent:
            await alice.acked(k)
        return {alice.acks[k]["id"]: t for k, t in sent.items()}

    def delays(sent):
        return [1000 * (bob.arrived[i] - t) for i, t in sent.items() if i in bob.arrived]

    normal = await paced(3)
    await until("bob has the first phase", lambda: all(i in bob.arrived for i in normal))
    c.net.cut("n3", c.nats.ip)
    cut_at = time.monotonic()
    try:
        during = await paced(seconds)
        await until("bob has the cut-off phase", lambda: all(i in bob.arrived for i in during), timeout=10)
        await until("n3 reports NATS down",
                    lambda: c.metric("n3", "shindensen_cluster_nats_connected") == 0.0, timeout=30)
    finally:
        c.net.heal("n3", c.nats.ip)
    await until("n3 reconnects to NATS",
                lambda: c.metric("n3", "shindensen_cluster_nats_connected") == 1.0, timeout=30)
    after = await paced(2)
    await until("bob has the last phase", lambda: all(i in bob.arrived for i in after))
    assert "lost the NATS connection" in c.nodes["n3"].log()
    expected = [m["id"] for m in history(c.url("n1"), alice.token, chat)]
    check_stream(bob, {chat})
    assert bob.ids(chat) == expected
    await alice.close()
    await bob.close()
    d0, d1 = delays(normal), delays(during)
    return (f"cut {seconds}s ({time.monotonic() - cut_at:.0f}s until healed): {len(during)} messages, none lost; "
            f"delay n1 -> n3 p50 {statistics.median(d0):.1f} ms / max {max(d0):.1f} ms over NATS, "
            f"p50 {statistics.median(d1):.1f} ms / p99 {pct(d1, 0.99):.1f} ms / max {max(d1):.1f} ms cut off")


async def database_and_nats_restarts(c, tag):
    """PostgreSQL down: sends get `unavailable`, readiness fails, nodes
    recover by themselves. NATS down and back: delivery goes on."""
    alice, bob = user(c, f"{tag}alice"), user(c, f"{tag}bob")
    chat = group(c, alice, "restarts", [bob.name])
    await alice.connect(c.url("n1"), since=0)
    await bob.connect(c.url("n2"), since=0)
    k = await alice.send(chat, "before")
    await alice.acked(k)

    c.pg.stop()
    await until("n1 not ready", lambda: not http_ok(c.url("n1") + "/readyz"), timeout=30)
    k = await alice.send(chat, "while the database is down")
    await until("an error frame", lambda: alice.errors or k in alice.acks, timeout=30)
    assert k not in alice.acks and alice.errors[-1]["code"] == "unavailable", (alice.errors, alice.acks.get(k))
    c.pg.start()
    for n in NODES:
        await until(f"{n} ready again", lambda n=n: http_ok(c.url(n) + "/readyz"), timeout=60)
    k = await alice.send(chat, "after the database came back", key=k)
    await alice.acked(k, timeout=30)

    c.nats.stop()
    await until("n1 reports NATS down",
                lambda: c.metric("n1", "shindensen_cluster_nats_connected") == 0.0, timeout=30)
    keys = [await alice.send(chat, f"without NATS {i}") for i in range(5)]
    ids = [(await alice.acked(x))["id"] for x in keys]
    await until("bob gets them without NATS", lambda: bob.last_id >= ids[-1], timeout=10)
    c.nats.start()
    for n in NODES:
        await until(f"{n} back on NATS",
                    lambda n=n: c.metric(n, "shindensen_cluster_nats_connected") == 1.0, timeout=30)
    k = await alice.send(chat, "with NATS again")
    last = (await alice.acked(k))["id"]
    await until("bob gets it", lambda: bob.last_id >= last)
    expected = [m["id"] for m in history(c.url("n2"), bob.token, chat)]
    check_stream(bob, {chat})
    assert bob.ids(chat) == expected
    await alice.close()
    await bob.close()
    return "PostgreSQL down: error frame `unavailable`, /readyz 503, all nodes ready again after; NATS down: delivery by polling, back on NATS after"


CHECKS = [cross_node_delivery, concurrent_senders, resume_elsewhere, removal_elsewhere,
          nats_partition, kill_a_node, database_and_nats_restarts]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--only", nargs="*")
    p.add_argument("--keep", action="store_true", help="keep the logs directory")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("cluster_test.py needs root (network namespaces)")
    base = tempfile.mkdtemp(prefix="shindensen-cluster-")
    c = Cluster(args.binary, base)
    ok = False
    try:
        c.start()
        print(f"cluster up: nodes {', '.join(c.url(n) for n in NODES)}, PostgreSQL {c.pg.ip}, NATS {c.nats.ip}")
        for i, check in enumerate(CHECKS):
            if args.only and check.__name__ not in args.only:
                continue
            started = time.monotonic()
            result = asyncio.run(asyncio.wait_for(check(c, f"t{i}"), 180))
            print(f"ok   {check.__name__} ({time.monotonic() - started:.1f}s): {result}", flush=True)
        ok = True
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print(f"FAILED; logs in {base}", file=sys.stderr)
    finally:
        c.close()
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
