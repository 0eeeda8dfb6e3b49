//! History: pagination windows, validation, privacy.

use reqwest::StatusCode;

use crate::helpers::{TestApp, ids};

#[tokio::test]
async fn history_pages_latest_before_and_after_ascending() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut all = Vec::new();
    for i in 0..120 {
        let who = if i % 2 == 0 { &alice } else { &bob };
        all.push(app.store_message(who, chat, &format!("m{i}")).await);
    }
    let c = chat.to_string();

    let (status, page) = app.history(&alice, &c, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ids(&page),
        all[70..].to_vec(),
        "default: latest 50, ascending"
    );
    let m = &page[49];
    assert_eq!(m["chat_id"], chat);
    assert_eq!(m["sender"], "bob");
    assert_eq!(m["sender_id"], bob.id);
    assert_eq!(m["content"], "m119");
    let ts = m["timestamp"].as_str().unwrap();
    assert_eq!(ts.len(), "2026-11-24T01:52:46.123Z".len(), "{ts}");
    assert!(ts.ends_with('Z'));

    let (_, page) = app
        .history(&alice, &c, &format!("?before={}&limit=30", all[70]))
        .await;
    assert_eq!(ids(&page), all[40..70].to_vec());
    let (_, page) = app
        .history(&alice, &c, &format!("?before={}", all[10]))
        .await;
    assert_eq!(ids(&page), all[..10].to_vec(), "short page at the start");
    let (_, page) = app
        .history(&alice, &c, &format!("?after={}&limit=5", all[9]))
        .await;
    assert_eq!(ids(&page), all[10..15].to_vec());
    let (_, page) = app.history(&bob, &c, &format!("?after={}", all[119])).await;
    assert_eq!(ids(&page), Vec::<i64>::new());
    let (_, page) = app.history(&bob, &c, "?limit=200").await;
    assert_eq!(ids(&page), all);
    let (_, page) = app.history(&bob, &c, "?limit=1").await;
    assert_eq!(ids(&page), vec![all[119]]);

    // Walking back with `before` visits every message exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let q = match cursor {
            Some(id) => format!("?limit=17&before={id}"),
            None => "?limit=17".into(),
        };
        let (_, page) = app.history(&alice, &c, &q).await;
        let page = ids(&page);
        if page.is_empty() {
            break;
        }
        cursor = Some(page[0]);
        seen.splice(0..0, page);
    }
    assert_eq!(seen, all);
}

#[tokio::test]
async fn limit_out_of_range_and_bad_cursors_are_400() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let c = app.chat(&alice, &bob).await.to_string();
    for q in [
        "?limit=0",
        "?limit=201",
        "?limit=-1",
        "?limit=abc",
        "?limit=",
        "?before=0",
        "?before=abc",
        "?after=-5",
        "?before=1&after=2",
        "?after=9223372036854775808",
    ] {
        let (status, body) = app.history(&alice, &c, q).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(body["code"], "invalid_request", "{q}");
        assert!(body["error"].as_str().unwrap().len() > 5);
    }
}

#[tokio::test]
async fn bad_chat_ids_are_400() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    for bad in ["abc", "-1", "0", "9223372036854775808", "1.5", "%20"] {
        let (status, body) = app.history(&alice, bad, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["code"], "invalid_request", "{bad}");
    }
    let (status, body) = app.history(&alice, "9223372036854775807", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "chat_not_found");
}

#[tokio::test]
async fn a_non_participant_gets_404_and_no_content() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let eve = app.user("eve").await;
    let chat = app.chat(&alice, &bob).await;
    app.store_message(&alice, chat, "secret plans").await;
    let (status, body) = app.history(&eve, &chat.to_string(), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "chat_not_found");
    assert!(!body.to_string().contains("secret"));
    // Same answer as for a chat that does not exist: existence is not leaked.
    let (status2, body2) = app.history(&eve, &(chat + 1000).to_string(), "").await;
    assert_eq!((status, &body), (status2, &body2));
}

#[tokio::test]
async fn history_entries_equal_the_websocket_message_frames_exactly() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut a = app.ws(&alice).await;
    let mut b = app.ws(&bob).await;
    let contents = [
        "plain",
        "\"quoted\" and \\backslashed\\",
        "ünïcödé ✓ 🎉 日本語",
        "line one\nline two\ttabbed",
        "</script><b>html</b> & 'single'",
    ];
    let mut frames = Vec::new();
    for (i, c) in contents.iter().enumerate() {
        a.say(chat, c, &format!("k{i}")).await;
        let mut f = b.next_of("message").await;
        f.as_object_mut().unwrap().remove("type");
        frames.push(f);
    }
    let (_, history) = app.history(&bob, &chat.to_string(), "").await;
    assert_eq!(history.as_array().unwrap(), &frames);
    let (_, after) = app
        .history(&bob, &chat.to_string(), "?after=0&limit=2")
        .await;
    assert_eq!(after.as_array().unwrap(), &frames[..2]);
    let (_, empty) = app.history(&bob, &chat.to_string(), "?after=999999").await;
    assert_eq!(empty, serde_json::json!([]));
}
