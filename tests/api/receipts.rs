//! Read markers, unread counts, read receipts and typing.

use reqwest::StatusCode;

use crate::helpers::TestApp;

#[tokio::test]
async fn read_markers_move_forward_only_and_give_unread_counts() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.store_message(&bob, chat, &format!("m{i}")).await);
    }
    app.store_message(&alice, chat, "mine").await;
    let entry = app.listed(&alice, chat).await;
    assert_eq!(
        (
            entry["last_read_id"].as_i64(),
            entry["unread_count"].as_i64()
        ),
        (Some(0), Some(5))
    );

    let (status, marker) = app.mark_read(&alice, chat, ids[2]).await;
    assert_eq!(status, StatusCode::OK, "{marker}");
    assert_eq!(marker["chat_id"], chat);
    assert_eq!(marker["last_read_id"], ids[2]);
    assert_eq!(marker["unread_count"], 2, "her own message is never unread");
    // Lower: nothing changes, still 200.
    let (status, marker) = app.mark_read(&alice, chat, ids[0]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(marker["last_read_id"], ids[2]);
    // Above the latest message: 400.
    let (status, body) = app.mark_read(&alice, chat, ids[4] + 100).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (status, _) = app.mark_read(&alice, chat, -1).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let entry = app.listed(&alice, chat).await;
    assert_eq!(
        (
            entry["last_read_id"].as_i64(),
            entry["unread_count"].as_i64()
        ),
        (Some(ids[2]), Some(2))
    );
    // Bob's view: his marker is his own, and alice's shows in the chat.
    assert_eq!(app.listed(&bob, chat).await["unread_count"], 1);
    let (_, detail) = app.chat_of(&bob, chat).await;
    let alice_row = detail["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == alice.id)
        .unwrap()
        .clone();
    assert_eq!(alice_row["last_read_id"], ids[2]);
}

#[tokio::test]
async fn a_read_frame_reaches_every_member_connection_but_the_one_that_sent_it() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let group = app.group(&alice, "Team", &[&bob, &carol]).await;
    let last = app.store_message(&bob, group, "read me").await;
    let mut alice_phone = app.ws(&alice).await;
    let mut alice_laptop = app.ws(&alice).await;
    let mut bobs = app.ws(&bob).await;
    let mut carols = app.ws(&carol).await;

    alice_phone.read(group, last).await;
    for ws in [&mut alice_laptop, &mut bobs, &mut carols] {
        let r = ws.next_of("read").await;
        assert_eq!(r["chat_id"], group);
        assert_eq!(r["user_id"], alice.id);
        assert_eq!(r["username"], "alice");
        assert_eq!(r["up_to"], last);
        assert!(
            r.get("id").is_none(),
            "read frames are not timeline entries"
        );
    }
    // The phone gets nothing: the next frame it sees is a later message.
    let next = app.store_message(&bob, group, "after").await;
    let frame = alice_phone.next_json().await;
    assert_eq!(
        (frame["type"].as_str(), frame["id"].as_i64()),
        (Some("message"), Some(next))
    );
    // Unread counts agree across her two devices: one server-side marker.
    assert_eq!(app.listed(&alice, group).await["unread_count"], 1);

    // Over HTTP every connection is told, and a marker that does not move
    // tells nobody.
    let (status, _) = app.mark_read(&carol, group, next).await;
    assert_eq!(status, StatusCode::OK);
    let r = alice_phone.next_of("read").await;
    assert_eq!(
        (r["user_id"].as_i64(), r["up_to"].as_i64()),
        (Some(carol.id), Some(next))
    );
    assert_eq!(carols.next_of("read").await["user_id"], carol.id);
    app.mark_read(&carol, group, last).await;
    let fence = app.store_message(&bob, group, "fence").await;
    let frames = alice_laptop.frames_until(|v| v["id"] == fence).await;
    let reads: Vec<_> = frames.iter().filter(|v| v["type"] == "read").collect();
    assert_eq!(reads.len(), 1, "only carol's forward move: {frames:?}");

    // A refusal is an error frame; the connection stays open.
    bobs.read(group, fence + 10).await;
    let e = bobs.next_of("error").await;
    assert_eq!(e["code"], "invalid_request");
    bobs.read(999_999, 1).await;
    assert_eq!(bobs.next_of("error").await["code"], "chat_not_found");
}

#[tokio::test]
async fn typing_reaches_the_other_members_never_the_typists_own_connections() {
    let app = TestApp::spawn_with(|s| s.ws.typing_interval_ms = 60_000).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let eve = app.user("eve").await;
    let group = app.group(&alice, "Team", &[&bob, &carol]).await;
    let mut alice_phone = app.ws(&alice).await;
    let mut alice_laptop = app.ws(&alice).await;
    let mut bobs = app.ws(&bob).await;
    let mut carols = app.ws(&carol).await;

    alice_phone.typing(group).await;
    // Within the interval further ones are dropped without an error.
    alice_phone.typing(group).await;
    alice_phone.typing(group).await;
    for ws in [&mut bobs, &mut carols] {
        let t = ws.next_of("typing").await;
        assert_eq!(
            (t["chat_id"].as_i64(), t["user_id"].as_i64()),
            (Some(group), Some(alice.id))
        );
        assert_eq!(t["username"], "alice");
    }
    let fence = app.store_message(&bob, group, "fence").await;
    for ws in [&mut alice_phone, &mut alice_laptop] {
        let frames = ws.frames_until(|v| v["id"] == fence).await;
        assert!(
            frames.iter().all(|v| v["type"] == "message"),
            "no typing and no error on the typist's connections: {frames:?}"
        );
    }
    for ws in [&mut bobs, &mut carols] {
        let frames = ws.frames_until(|v| v["id"] == fence).await;
        assert!(
            frames.iter().all(|v| v["type"] != "typing"),
            "one typing frame per interval: {frames:?}"
        );
    }
    // Bob typing is a different user: forwarded at once.
    bobs.typing(group).await;
    assert_eq!(carols.next_of("typing").await["user_id"], bob.id);
    // Not a member: an error frame.
    let mut eves = app.ws(&eve).await;
    eves.typing(group).await;
    assert_eq!(eves.next_of("error").await["code"], "chat_not_found");
    // Typing is not stored and not replayed.
    let (_, history) = app.history(&alice, &group.to_string(), "").await;
    assert!(
        history
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["type"] != "typing" && m["kind"] != "typing")
    );
    let mut resumed = app.ws_since(&carol, 0).await;
    let replay = resumed.frames_until(|v| v["id"] == fence).await;
    assert!(replay.iter().all(|v| v["type"] == "message"), "{replay:?}");
}
