#!/usr/bin/env python3
"""API smoke test against a running shindensen (container, pod, or local).

    smoke.py URL                 login, initiate, WebSocket send/receive, history
    smoke.py URL --save FILE     ... and remember what was created
    smoke.py URL --verify FILE   check that what FILE remembers is still there

Exits 0 on success; prints what it checked.
"""
import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
import uuid

import websockets

PASSWORD = "smoke-test-password"


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


def login(base, name):
    status, body = call(base, "POST", "/login", {"username": name, "password": PASSWORD})
    assert status == 200, (status, body)
    return body["token"], body["user"]["id"]


async def exchange(base, chat, alice, bob, content):
    ws_base = base.replace("http://", "ws://", 1) + "/ws"
    async with websockets.connect(ws_base, additional_headers={"Authorization": "Bearer " + bob}) as b, \
            websockets.connect(f"{ws_base}?access_token={alice}") as a:
        key = str(uuid.uuid4())
        await a.send(json.dumps({"chat_id": chat, "content": content, "client_msg_id": key}))
        got = json.loads(await asyncio.wait_for(b.recv(), 10))
        assert got["type"] == "message" and got["content"] == content, got
        while True:
            frame = json.loads(await asyncio.wait_for(a.recv(), 10))
            if frame["type"] == "ack":
                assert frame["client_msg_id"] == key and frame["id"] == got["id"], frame
                break
        # A resend with the same key gets the original ack and stores nothing.
        await a.send(json.dumps({"chat_id": chat, "content": content, "client_msg_id": key}))
        again = json.loads(await asyncio.wait_for(a.recv(), 10))
        assert again == frame, (again, frame)
        return got["id"]


async def refused(base, chat, token):
    ws_base = base.replace("http://", "ws://", 1) + "/ws"
    async with websockets.connect(f"{ws_base}?access_token={token}") as a:
        await a.send(json.dumps({"chat_id": chat, "content": "   ", "client_msg_id": "blank"}))
        frame = json.loads(await asyncio.wait_for(a.recv(), 10))
        assert frame["type"] == "error" and frame["code"] == "invalid_content", frame


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--save")
    p.add_argument("--verify")
    args = p.parse_args()
    base = args.url.rstrip("/")

    if args.verify:
        state = json.load(open(args.verify))
        token, _ = login(base, state["alice"])
        status, history = call(base, "GET", f"/chats/{state['chat']}/messages?limit=200", token=token)
        assert status == 200, (status, history)
        ids = [m["id"] for m in history]
        missing = [i for i in state["messages"] if i not in ids]
        assert not missing, f"messages lost: {missing}"
        print(f"verified: chat {state['chat']} still has messages {state['messages']}")
        return

    status, body = call(base, "GET", "/readyz")
    assert status == 200, (status, body)
    suffix = uuid.uuid4().hex[:8]
    alice_name, bob_name = f"alice-{suffix}", f"bob-{suffix}"
    alice, _ = login(base, alice_name)
    bob, _ = login(base, bob_name)
    status, body = call(base, "POST", "/chats/initiate", {"target_username": bob_name}, alice)
    assert status == 200 and body["status"] == "created", (status, body)
    chat = body["chat_id"]
    ids = [asyncio.run(exchange(base, chat, alice, bob, f"smoke {i}")) for i in range(3)]
    status, history = call(base, "GET", f"/chats/{chat}/messages", token=bob)
    assert status == 200 and [m["id"] for m in history] == ids, (status, history)
    status, body = call(base, "GET", "/chats/abc/messages", token=bob)
    assert status == 400 and body["code"] == "invalid_request", (status, body)
    status, body = call(base, "POST", "/login", {"username": alice_name, "password": "wrong password"})
    assert status == 401 and body["code"] == "invalid_credentials", (status, body)
    asyncio.run(refused(base, chat, alice))
    print(f"smoke ok: login, initiate, 3 WebSocket messages {ids} delivered and acked, "
          "history matches, resends idempotent, 400/401 and invalid_content errors as expected")
    if args.save:
        json.dump({"alice": alice_name, "chat": chat, "messages": ids}, open(args.save, "w"))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"smoke FAILED: {e}", file=sys.stderr)
        sys.exit(1)
