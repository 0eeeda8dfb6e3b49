//! WebSocket protocol: auth, frames, acks, idempotency, errors, limits.

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite;

use crate::helpers::{TestApp, eventually, ids};

#[tokio::test]
async fn no_or_bad_token_is_401_before_any_upgrade() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    for (token, query) in [
        (None, ""),
        (Some("garbage"), ""),
        (None, "?access_token=garbage"),
    ] {
        match app.try_ws(token, query).await {
            Err(tungstenite::Error::Http(res)) => {
                assert_eq!(res.status(), StatusCode::UNAUTHORIZED)
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("upgraded without a valid token ({token:?}, {query})"),
        }
    }
    // Browsers pass the token in the query.
    let ws = app
        .try_ws(None, &format!("?access_token={}", alice.token))
        .await
        .expect("query token accepted");
    ws.close().await;
    // A bad `since` is a 400 before upgrading.
    match app.try_ws(Some(&alice.token), "?since=abc").await {
        Err(tungstenite::Error::Http(res)) => assert_eq!(res.status(), StatusCode::BAD_REQUEST),
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_message_reaches_every_connection_of_both_users_and_the_sender_gets_an_ack() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut phone = app.ws(&alice).await;
    let mut laptop = app.ws(&alice).await;
    let mut bobs = app.ws(&bob).await;

    phone.say(chat, "Hello via WS", "k-1").await;
    let echo = phone.next_of("message").await;
    let ack = phone.next_of("ack").await;
    assert_eq!(ack["client_msg_id"], "k-1");
    assert_eq!(ack["chat_id"], chat);
    assert_eq!(ack["id"], echo["id"]);
    assert_eq!(ack["timestamp"], echo["timestamp"]);
    assert_eq!(
        echo["client_msg_id"], "k-1",
        "the sender's connections see the key"
    );

    let on_laptop = laptop.next_json().await;
    assert_eq!(
        on_laptop, echo,
        "the sender's other device gets the same frame"
    );
    let at_bob = bobs.next_json().await;
    assert_eq!(at_bob["type"], "message");
    assert_eq!(at_bob["id"], echo["id"]);
    assert_eq!(at_bob["chat_id"], chat);
    assert_eq!(at_bob["sender"], "alice");
    assert_eq!(at_bob["sender_id"], alice.id);
    assert_eq!(at_bob["content"], "Hello via WS");
    assert!(
        at_bob.get("client_msg_id").is_none(),
        "others never see the key: {at_bob}"
    );

    let (_, history) = app.history(&bob, &chat.to_string(), "").await;
    assert_eq!(history[0]["id"], echo["id"]);
    assert_eq!(history[0]["timestamp"], echo["timestamp"]);
}

#[tokio::test]
async fn the_seed_send_frame_without_type_or_key_works() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut a = app.ws(&alice).await;
    let mut b = app.ws(&bob).await;
    a.send_json(json!({"chat_id": chat, "content": "Hello via WS"}))
        .await;
    let m = b.next_json().await;
    assert_eq!(m["content"], "Hello via WS");
    let ack = a.next_of("ack").await;
    assert!(ack["client_msg_id"].is_null());
    assert_eq!(ack["id"], m["id"]);
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_stays_open() {
    let app = TestApp::spawn_with(|s| {
        s.ws.send_burst = 12;
        s.ws.send_rate_per_sec = 0.01;
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let chat = app.chat(&alice, &bob).await;
    let not_mine = app.chat(&bob, &carol).await;
    let mut ws = app.ws(&alice).await;

    ws.send_text("{not json").await;
    let e = ws.next_json().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_json"))
    );
    assert!(e["message"].as_str().unwrap().len() > 5);

    ws.send_json(json!({"chat_id": "one", "content": "x", "client_msg_id": "k0"}))
        .await;
    let e = ws.next_json().await;
    assert_eq!(
        (e["code"].as_str(), e["client_msg_id"].as_str()),
        (Some("invalid_json"), Some("k0"))
    );

    let long = "x".repeat(4001);
    for (i, content) in ["", "   \n ", long.as_str(), "bell\u{7}", "esc\u{1b}[0m"]
        .iter()
        .enumerate()
    {
        ws.say(chat, content, &format!("c{i}")).await;
        let e = ws.next_json().await;
        assert_eq!(e["code"], "invalid_content", "{content:?}");
        assert_eq!(e["client_msg_id"], format!("c{i}"));
    }
    ws.say(chat, &"é".repeat(4000), "max").await;
    assert_eq!(
        ws.next_of("ack").await["client_msg_id"],
        "max",
        "4,000 characters is allowed"
    );

    for (i, target) in [not_mine, 999_999].into_iter().enumerate() {
        ws.say(target, "hi", &format!("n{i}")).await;
        let e = ws.next_json().await;
        assert_eq!(e["code"], "chat_not_found");
        assert_eq!(e["client_msg_id"], format!("n{i}"));
    }

    // The burst is 12 and the first validation failures did not count:
    // 1 stored + 2 chat_not_found = 3 used; 9 more pass, the 10th is limited.
    for i in 0..9 {
        ws.say(chat, "ok", &format!("r{i}")).await;
        assert_eq!(ws.next_of("ack").await["client_msg_id"], format!("r{i}"));
    }
    ws.say(chat, "too fast", "r-limited").await;
    let e = ws.next_of("error").await;
    assert_eq!(e["code"], "rate_limited");
    assert_eq!(e["client_msg_id"], "r-limited");
    let (_, history) = app.history(&alice, &chat.to_string(), "?limit=200").await;
    assert_eq!(ids(&history).len(), 10, "nothing stored for refused frames");
    assert!(!history.to_string().contains("too fast"));
}

#[tokio::test]
async fn a_resend_with_the_same_client_msg_id_returns_the_original_ack_also_after_a_restart() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ws = app.ws(&alice).await;
    ws.say(chat, "once", "idem-1").await;
    let first = ws.next_of("ack").await;
    ws.say(chat, "once", "idem-1").await;
    let again = ws.next_of("ack").await;
    assert_eq!(first, again);
    ws.close().await;

    let dir = app.stop().await;
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let mut ws = app.ws(&alice).await;
    ws.say(chat, "once", "idem-1").await;
    let after_restart = ws.next_json().await;
    assert_eq!(
        after_restart, first,
        "no new message frame, the original ack"
    );
    let (_, history) = app.history(&alice, &chat.to_string(), "").await;
    assert_eq!(ids(&history), vec![first["id"].as_i64().unwrap()]);
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let mut ws = app.ws(&alice).await;
    let big = format!(r#"{{"chat_id":1,"content":"{}"}}"#, "x".repeat(70 * 1024));
    let _ = ws.stream.send(tungstenite::Message::Text(big.into())).await;
    let frame = ws.close_frame().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1009);
    eventually("the connection leaves the hub", || {
        app.state.hub.connection_count() == 0
    })
    .await;
}

#[tokio::test]
async fn silent_connections_are_pinged_and_closed_when_they_stop_answering() {
    let app = TestApp::spawn_with(|s| {
        s.ws.ping_interval_ms = 50;
        s.ws.idle_timeout_ms = 300;
    })
    .await;
    let alice = app.user("alice").await;
    // A reading client answers pings (tungstenite pongs automatically) and
    // stays open well past the idle timeout.
    let mut live = app.ws(&alice).await;
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        loop {
            match live.stream.next().await {
                Some(Ok(tungstenite::Message::Ping(_))) => pings += 1,
                Some(Ok(tungstenite::Message::Close(f))) => return (pings, f),
                Some(Ok(_)) => {}
                other => panic!("live client: {other:?}"),
            }
        }
    });
    // A client that reads nothing never pongs: the server drops it.
    let mut dead = app.ws(&alice).await;
    eventually("both connections registered", || {
        app.state.hub.connection_count() == 2
    })
    .await;
    eventually("the silent connection is dropped", || {
        app.state.hub.connection_count() == 1
    })
    .await;
    let frame = dead.close_frame().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4000, "idle timeout");
    assert!(!reader.is_finished(), "the live client is still connected");
    // Shutting down ends the live client too, after it has seen many pings.
    drop(app);
    let (pings, frame) = reader.await.unwrap();
    assert!(pings >= 5, "pings: {pings}");
    assert_eq!(frame.map(|f| u16::from(f.code)), Some(1001));
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001_after_acking_what_they_sent() {
    let app = TestApp::spawn_with(|s| s.ws.send_burst = 1000).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ws = app.ws(&alice).await;
    for i in 0..50 {
        ws.say(chat, &format!("m{i}"), &format!("s{i}")).await;
    }
    // Wait until the server has read the frames, then shut down.
    ws.next_of("ack").await;
    let stop = tokio::spawn(app.stop());
    let mut acked = 1;
    let code = loop {
        match ws.stream.next().await {
            Some(Ok(tungstenite::Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "ack" {
                    acked += 1;
                }
            }
            Some(Ok(tungstenite::Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, Some(1001));
    let dir = stop.await.unwrap();
    assert_eq!(
        acked, 50,
        "every message received before shutdown was acked"
    );
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let (_, history) = app.history(&alice, &chat.to_string(), "?limit=200").await;
    assert_eq!(ids(&history).len(), 50);
}
