//! WebSocket delivery under load: ordering, resume, slow consumers, churn.

use std::collections::HashSet;

use serde_json::Value;

use crate::helpers::{TestApp, TestUser, WsClient, eventually, ids};

fn msg_ids(frames: &[Value]) -> Vec<i64> {
    frames.iter().map(|m| m["id"].as_i64().unwrap()).collect()
}

/// All message ids of a chat, ascending, through the HTTP API.
async fn history_ids(app: &TestApp, who: &TestUser, chat: i64) -> Vec<i64> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let (_, page) = app
            .history(who, &chat.to_string(), &format!("?after={after}&limit=200"))
            .await;
        let page = ids(&page);
        if page.is_empty() {
            return out;
        }
        after = *page.last().unwrap();
        out.extend(page);
    }
}

/// Sends `n` messages as fast as the socket takes them, then waits for all
/// acks. Returns the ack ids and the message frames seen meanwhile.
async fn blast_seen(
    mut ws: WsClient,
    chat: i64,
    tag: &str,
    n: usize,
) -> (WsClient, Vec<i64>, Vec<Value>) {
    for i in 0..n {
        ws.say(chat, &format!("{tag}-{i}"), &format!("{tag}-{i}"))
            .await;
    }
    let mut acks = Vec::with_capacity(n);
    let mut seen = Vec::new();
    while acks.len() < n {
        let v = ws.next_json().await;
        match v["type"].as_str() {
            Some("ack") => acks.push(v["id"].as_i64().unwrap()),
            Some("message") => seen.push(v),
            _ => panic!("unexpected frame {v}"),
        }
    }
    (ws, acks, seen)
}

async fn blast(ws: WsClient, chat: i64, tag: &str, n: usize) -> (WsClient, Vec<i64>) {
    let (ws, acks, _) = blast_seen(ws, chat, tag, n).await;
    (ws, acks)
}

#[tokio::test]
async fn four_connections_see_identical_order_for_concurrent_senders_equal_to_history() {
    let app = TestApp::spawn_with(|s| s.ws.send_burst = 10_000).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut watchers = [app.ws(&alice).await, app.ws(&bob).await];
    let a_send = app.ws(&alice).await;
    let b_send = app.ws(&bob).await;

    let (a, b) = tokio::join!(
        blast_seen(a_send, chat, "a", 200),
        blast_seen(b_send, chat, "b", 200)
    );
    let (mut a_send, a_acks, a_seen) = a;
    let (mut b_send, b_acks, b_seen) = b;
    assert!(a_acks.windows(2).all(|w| w[0] < w[1]), "acks in send order");
    assert!(b_acks.windows(2).all(|w| w[0] < w[1]));

    let history = history_ids(&app, &alice, chat).await;
    assert_eq!(history.len(), 400);
    assert!(history.windows(2).all(|w| w[0] < w[1]));
    let mut seen = Vec::new();
    for ws in watchers.iter_mut() {
        seen.push(msg_ids(&ws.messages(400).await));
    }
    for (ws, mut frames) in [(&mut a_send, a_seen), (&mut b_send, b_seen)] {
        let rest = 400 - frames.len();
        frames.extend(ws.messages(rest).await);
        seen.push(msg_ids(&frames));
    }
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s, &history, "connection {i} order differs from history");
    }
    // Each sender's own messages keep their send order too.
    let contents: Vec<String> = history_contents(&app, &alice, chat).await;
    let a_order: Vec<&String> = contents.iter().filter(|c| c.starts_with("a-")).collect();
    let expected: Vec<String> = (0..200).map(|i| format!("a-{i}")).collect();
    assert_eq!(a_order, expected.iter().collect::<Vec<_>>());
}

async fn history_contents(app: &TestApp, who: &TestUser, chat: i64) -> Vec<String> {
    let (_, first) = app
        .history(who, &chat.to_string(), "?limit=200&after=0")
        .await;
    let last = first.as_array().unwrap().last().unwrap()["id"]
        .as_i64()
        .unwrap();
    let (_, second) = app
        .history(who, &chat.to_string(), &format!("?limit=200&after={last}"))
        .await;
    first
        .as_array()
        .unwrap()
        .iter()
        .chain(second.as_array().unwrap())
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_receiver_that_reconnects_with_since_gets_every_message_once_in_order() {
    let app = TestApp::spawn_with(|s| s.ws.send_burst = 10_000).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let with_alice = app.chat(&alice, &bob).await;
    let with_carol = app.chat(&carol, &bob).await;

    let mut bob_ws = app.ws(&bob).await;
    let mut alice_ws = app.ws(&alice).await;
    alice_ws.say(with_alice, "before", "before").await;
    let since = bob_ws.next_json().await["id"].as_i64().unwrap();
    assert_eq!(alice_ws.next_of("ack").await["id"], since);
    bob_ws.close().await;
    eventually("bob is gone from the hub", || {
        app.state.hub.user_count() == 1
    })
    .await;

    // 100 messages while bob is away.
    let (alice_ws, away) = blast(alice_ws, with_alice, "away", 100).await;
    drop(alice_ws);

    // Carol keeps sending while bob reconnects.
    let carol_ws = app.ws(&carol).await;
    let sender = tokio::spawn(async move {
        let mut ws = carol_ws;
        let mut acks = Vec::new();
        for round in 0..20 {
            let (next, batch) = blast(ws, with_carol, &format!("live{round}"), 10).await;
            ws = next;
            acks.extend(batch);
        }
        acks
    });
    let mut bob_ws = app.ws_since(&bob, since).await;
    let carol_acks = sender.await.unwrap();
    let last = *carol_acks.last().unwrap();

    let mut got = Vec::new();
    while got.last() != Some(&last) {
        let v = bob_ws.next_of("message").await;
        got.push(v["id"].as_i64().unwrap());
    }
    let mut expected: Vec<i64> = history_ids(&app, &bob, with_alice).await;
    expected.extend(history_ids(&app, &bob, with_carol).await);
    expected.retain(|id| *id > since);
    expected.sort();
    assert_eq!(got, expected, "no gap, no duplicate, ascending");
    let got_set: HashSet<i64> = got.iter().copied().collect();
    assert!(
        away.iter().all(|id| got_set.contains(id)),
        "all 100 missed messages replayed"
    );
    assert_eq!(away.len(), 100);
    assert_eq!(carol_acks.len(), 200);
}

#[tokio::test]
async fn resume_past_the_replay_cap_ends_with_resync() {
    let app = TestApp::spawn_with(|s| {
        s.ws.send_burst = 10_000;
        s.ws.replay_max = 30;
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let (_, acks) = blast(app.ws(&alice).await, chat, "m", 50).await;
    let mut ws = app.ws_since(&bob, 0).await;
    let replayed = ws.messages(30).await;
    assert_eq!(msg_ids(&replayed), acks[..30].to_vec());
    let resync = ws.next_json().await;
    assert_eq!(resync["type"], "resync");
    assert_eq!(resync["last_id"], acks[29]);
    // Live traffic continues after the resync.
    let (_, more) = blast(app.ws(&alice).await, chat, "n", 1).await;
    assert_eq!(ws.next_of("message").await["id"], more[0]);
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_with_4008_and_others_complete() {
    let app = TestApp::spawn_with(|s| {
        s.ws.send_burst = 100_000;
        s.ws.send_rate_per_sec = 100_000.0;
        // A reading client has 300 frames or more outstanding per window
        // (its 100 copies and acks, and the peer's messages, which can run
        // ahead): with a queue near that, a reader that the scheduler
        // delays for a moment overflows too (seen on a loaded machine).
        // 4,096 leaves the readers thousands of frames of slack; the
        // client that never reads is sent 10,000 and still overflows.
        s.ws.outbound_queue = 4_096;
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut stuck = app.ws_small_buffer(&bob).await;
    let a = app.ws(&alice).await;
    let b = app.ws(&bob).await;

    // 10,000 messages of 400 bytes, both directions, pipelined in windows
    // of 100. Each side counts its acks and the message frames it receives.
    async fn exchange(mut ws: WsClient, chat: i64, tag: &'static str) -> (WsClient, usize, usize) {
        let body = "x".repeat(400);
        let (mut acks, mut received) = (0, 0);
        for round in 0..50 {
            for i in 0..100 {
                ws.say(chat, &body, &format!("{tag}-{round}-{i}")).await;
            }
            while acks < (round + 1) * 100 {
                let v = ws.next_json().await;
                match v["type"].as_str() {
                    Some("ack") => acks += 1,
                    Some("message") => received += 1,
                    _ => panic!("unexpected frame {v}"),
                }
            }
        }
        (ws, acks, received)
    }
    let (a_res, b_res) = tokio::join!(exchange(a, chat, "a"), exchange(b, chat, "b"));
    assert_eq!(a_res.1 + b_res.1, 10_000, "every send acked");
    for (mut ws, _, mut received) in [a_res, b_res] {
        while received < 10_000 {
            let v = ws.next_json().await;
            assert_eq!(v["type"], "message");
            received += 1;
        }
        ws.close().await;
    }
    assert_eq!(history_ids(&app, &alice, chat).await.len(), 10_000);

    // The client that never read was cut off, not waited for.
    eventually("the stuck client left the hub", || {
        app.state.hub.connection_count() == 0
    })
    .await;
    let frame = stuck.close_frame().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 4008);
}

#[tokio::test]
async fn ten_thousand_connect_disconnect_cycles_leave_the_hub_empty() {
    let app = TestApp::spawn().await;
    let mut users = Vec::new();
    for i in 0..4 {
        users.push(app.user(&format!("churn{i}")).await);
    }
    let workers = (0..16).map(|w| {
        let url = app.ws_url("");
        let token = users[w % users.len()].token.clone();
        tokio::spawn(async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            for i in 0..625 {
                let mut req = url.as_str().into_client_request().unwrap();
                req.headers_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
                // Half close politely, half just drop the TCP connection.
                if i % 2 == 0 {
                    let _ = ws.close(None).await;
                }
                drop(ws);
            }
        })
    });
    for w in futures_util::future::join_all(workers).await {
        w.unwrap();
    }
    eventually("every connection left the hub", || {
        app.state.hub.connection_count() == 0 && app.state.hub.user_count() == 0
    })
    .await;
}
