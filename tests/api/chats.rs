//! Chats: initiate (created/exists, one per pair under concurrency), list.

use reqwest::StatusCode;

use crate::helpers::TestApp;

#[tokio::test]
async fn initiate_creates_then_reports_exists_from_either_side() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let (status, body) = app.initiate(&alice, "bob").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "created");
    let id = body["chat_id"].as_i64().unwrap();
    assert!(id > 0);
    let (status, body) = app.initiate(&bob, "ALICE").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "exists");
    assert_eq!(body["chat_id"], id);
}

#[tokio::test]
async fn twenty_concurrent_initiates_for_one_pair_make_one_chat() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let calls = (0..20).map(|i| {
        let (who, target) = if i % 2 == 0 {
            (&alice, "bob")
        } else {
            (&bob, "alice")
        };
        app.initiate(who, target)
    });
    let results = futures_util::future::join_all(calls).await;
    let mut ids: Vec<i64> = results
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, StatusCode::OK, "{b}");
            b["chat_id"].as_i64().unwrap()
        })
        .collect();
    let created = results
        .iter()
        .filter(|(_, b)| b["status"] == "created")
        .count();
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(created, 1);
    let (_, list) = app.get("/chats", Some(&alice.token)).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn initiate_with_unknown_user_or_yourself_is_refused() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let (status, body) = app.initiate(&alice, "nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "user_not_found");
    let (status, body) = app.initiate(&alice, "Alice").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "invalid_target");
}

#[tokio::test]
async fn chat_list_shows_peer_and_last_message_most_recent_first() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let with_bob = app.chat(&alice, &bob).await;
    let with_carol = app.chat(&alice, &carol).await;

    let (status, list) = app.get("/chats", Some(&alice.token)).await;
    assert_eq!(status, StatusCode::OK);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        list[0]["chat_id"], with_carol,
        "newest chat first when no messages"
    );
    assert_eq!(list[0]["type"], "direct");
    assert_eq!(list[0]["peer"]["username"], "carol");
    assert!(list[0]["last_message"].is_null());
    assert!(list[0]["created_at"].as_str().unwrap().ends_with('Z'));

    let msg = app.store_message(&bob, with_bob, "hi alice").await;
    let (_, list) = app.get("/chats", Some(&alice.token)).await;
    let first = &list.as_array().unwrap()[0];
    assert_eq!(
        first["chat_id"], with_bob,
        "chat with the latest message first"
    );
    assert_eq!(first["peer"]["id"], bob.id);
    assert_eq!(first["last_message"]["id"], msg);
    assert_eq!(first["last_message"]["content"], "hi alice");
    assert_eq!(first["last_message"]["sender"], "bob");

    let (_, bobs) = app.get("/chats", Some(&bob.token)).await;
    assert_eq!(bobs.as_array().unwrap().len(), 1);
    assert_eq!(bobs[0]["peer"]["username"], "alice");
}
