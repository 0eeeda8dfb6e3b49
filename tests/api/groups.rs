//! Group chats: creation, members and roles, timeline events, audience.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, TestUser, WsClient, ids};

async fn users(app: &TestApp, names: &[&str]) -> Vec<TestUser> {
    let mut out = Vec::new();
    for n in names {
        out.push(app.user(n).await);
    }
    out
}

fn member_names(chat: &Value) -> Vec<(String, String)> {
    chat["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {chat}"))
        .iter()
        .map(|m| {
            (
                m["username"].as_str().unwrap().to_string(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// All of a chat's messages through the HTTP API, ascending.
async fn all_history(app: &TestApp, who: &TestUser, chat: i64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = app
            .history(who, &chat.to_string(), &format!("?after={after}&limit=200"))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let page = page.as_array().unwrap().clone();
        let Some(last) = page.last() else {
            return out;
        };
        after = last["id"].as_i64().unwrap();
        out.extend(page);
    }
}

#[tokio::test]
async fn creating_a_group_makes_the_creator_admin_and_ignores_duplicates() {
    let app = TestApp::spawn().await;
    let [alice, _bob, _carol] =
        <[TestUser; 3]>::try_from(users(&app, &["alice", "bob", "carol"]).await).unwrap();
    let (status, chat) = app
        .create_group(&alice, "Team", &["bob", "BOB", "carol", "alice"])
        .await;
    assert_eq!(status, StatusCode::CREATED, "{chat}");
    assert_eq!(chat["type"], "group");
    assert_eq!(chat["title"], "Team");
    assert!(chat["peer"].is_null());
    assert_eq!(chat["member_count"], 3);
    assert_eq!(
        member_names(&chat),
        pairs(&[("alice", "admin"), ("bob", "member"), ("carol", "member")])
    );
    // Its timeline starts with the creation event.
    let id = chat["chat_id"].as_i64().unwrap();
    let history = all_history(&app, &alice, id).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["kind"], "chat_created");
    assert_eq!(history[0]["event"]["title"], "Team");
    assert_eq!(history[0]["sender"], "alice");
    assert_eq!(history[0]["content"], "alice created the group \"Team\"");
}

#[tokio::test]
async fn creating_a_group_is_refused_for_unknown_names_bad_titles_and_too_many_members() {
    let app = TestApp::spawn_with(|s| s.chats.max_members = 3).await;
    let alice = app.user("alice").await;
    for n in ["bob", "carol", "dave"] {
        app.user(n).await;
    }
    let (status, body) = app.create_group(&alice, "Team", &["bob", "nobody"]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("user_not_found"))
    );
    let (_, list) = app.get("/chats", Some(&alice.token)).await;
    assert_eq!(list.as_array().unwrap().len(), 0, "nothing was created");

    for title in ["", "   ", "line\nbreak", &"x".repeat(101)] {
        let (status, body) = app.create_group(&alice, title, &["bob"]).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{title:?}: {body}"
        );
        assert_eq!(body["code"], "invalid_title");
    }
    let (status, body) = app
        .create_group(&alice, "Team", &["bob", "carol", "dave"])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "too_many_members");
    let (status, body) = app
        .post(
            "/chats",
            serde_json::json!({"type": "direct", "title": "x", "members": ["bob"]}),
            Some(&alice.token),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A group of one is fine.
    let (status, _) = app.create_group(&alice, "Notes", &[]).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn the_chat_list_shows_groups_and_direct_chats_with_counts_and_markers() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let direct = app.chat(&alice, &bob).await;
    let group = app.group(&alice, "Team", &[&bob, &carol]).await;
    app.store_message(&bob, group, "hi team").await;
    let entry = app.listed(&alice, group).await;
    assert_eq!(entry["type"], "group");
    assert_eq!(entry["title"], "Team");
    assert_eq!(entry["member_count"], 3);
    assert_eq!(entry["last_read_id"], 0);
    assert_eq!(entry["unread_count"], 1, "the event is not unread text");
    assert_eq!(entry["last_message"]["content"], "hi team");
    assert!(
        entry.get("members").is_none(),
        "the list has no member lists"
    );
    let entry = app.listed(&alice, direct).await;
    assert_eq!(entry["type"], "direct");
    assert_eq!(entry["peer"]["username"], "bob");
    assert!(entry["title"].is_null());
    assert_eq!(entry["member_count"], 2);
    // Most recent activity first: the group had the last message.
    let (_, list) = app.get("/chats", Some(&alice.token)).await;
    assert_eq!(ids_of(&list), vec![group, direct]);
}

fn ids_of(list: &Value) -> Vec<i64> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["chat_id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn only_members_see_a_group_and_only_admins_change_it() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    app.user("carol").await;
    let eve = app.user("eve").await;
    let group = app.group(&alice, "Team", &[&bob]).await;

    let (status, chat) = app.chat_of(&bob, group).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(chat["members"].as_array().unwrap().len(), 2);
    for (status, body) in [
        app.chat_of(&eve, group).await,
        app.chat_of(&eve, 999_999).await,
        app.history(&eve, &group.to_string(), "").await,
        app.add_member(&eve, group, "eve").await,
        app.mark_read(&eve, group, 0).await,
    ] {
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("chat_not_found"))
        );
    }

    // A member who is not an admin: 403.
    let (status, body) = app.add_member(&bob, group, "carol").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (status, body) = app
        .patch(
            &format!("/chats/{group}"),
            serde_json::json!({"title": "Mine"}),
            &bob.token,
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (status, _) = app.remove_member(&bob, group, alice.id).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app.set_role(&bob, group, bob.id, "admin").await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The admin: add, rename, promote.
    let (status, chat) = app.add_member(&alice, group, "carol").await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    assert_eq!(chat["member_count"], 3);
    let (status, again) = app.add_member(&alice, group, "CAROL").await;
    assert_eq!(status, StatusCode::OK, "already a member: nothing changes");
    assert_eq!(again["member_count"], 3);
    let (status, body) = app.add_member(&alice, group, "nobody").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("user_not_found"))
    );
    let (status, chat) = app
        .patch(
            &format!("/chats/{group}"),
            serde_json::json!({"title": "Team 2"}),
            &alice.token,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(chat["title"], "Team 2");
    let (status, body) = app
        .patch(
            &format!("/chats/{group}"),
            serde_json::json!({"title": ""}),
            &alice.token,
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_title"))
    );
    let (status, chat) = app.set_role(&alice, group, bob.id, "admin").await;
    assert_eq!(status, StatusCode::OK);
    assert!(member_names(&chat).contains(&("bob".to_string(), "admin".to_string())));
    let (status, _) = app.set_role(&alice, group, bob.id, "owner").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Not a member: user_not_found.
    for (status, body) in [
        app.set_role(&alice, group, eve.id, "admin").await,
        app.remove_member(&alice, group, eve.id).await,
        app.remove_member(&alice, group, 999_999).await,
    ] {
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("user_not_found"))
        );
    }

    // Member operations on a direct chat: not_a_group.
    let direct = app.chat(&alice, &bob).await;
    for (status, body) in [
        app.add_member(&alice, direct, "carol").await,
        app.remove_member(&alice, direct, bob.id).await,
        app.set_role(&alice, direct, bob.id, "admin").await,
        app.patch(
            &format!("/chats/{direct}"),
            serde_json::json!({"title": "x"}),
            &alice.token,
        )
        .await,
    ] {
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("not_a_group")),
            "{body}"
        );
    }
    let (status, chat) = app.chat_of(&alice, direct).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(chat["type"], "direct");
    assert_eq!(chat["peer"]["username"], "bob");
}

#[tokio::test]
async fn changes_are_timeline_events_with_ids_from_the_message_sequence() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let group = app.group(&alice, "Team", &[&bob]).await;
    let m1 = app.store_message(&bob, group, "one").await;
    app.add_member(&alice, group, "carol").await;
    app.set_role(&alice, group, carol.id, "admin").await;
    app.patch(
        &format!("/chats/{group}"),
        serde_json::json!({"title": "Team 2"}),
        &alice.token,
    )
    .await;
    let m2 = app.store_message(&carol, group, "two").await;
    app.remove_member(&alice, group, bob.id).await;
    app.remove_member(&carol, group, carol.id).await;

    let history = all_history(&app, &alice, group).await;
    let kinds: Vec<&str> = history
        .iter()
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "chat_created",
            "text",
            "member_added",
            "role_changed",
            "title_changed",
            "text",
            "member_removed",
            "member_removed"
        ]
    );
    let all_ids = ids(&Value::Array(history.clone()));
    assert!(
        all_ids.windows(2).all(|w| w[0] < w[1]),
        "one ascending sequence"
    );
    assert!(all_ids.contains(&m1) && all_ids.contains(&m2));
    let contents: Vec<&str> = history
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents[2], "alice added carol");
    assert_eq!(contents[3], "alice made carol an admin");
    assert_eq!(contents[4], "alice renamed the group to \"Team 2\"");
    assert_eq!(contents[6], "alice removed bob");
    assert_eq!(contents[7], "carol left");
    assert_eq!(history[2]["event"]["user"]["id"], carol.id);
    assert_eq!(history[2]["event"]["user"]["username"], "carol");
    assert_eq!(history[3]["event"]["role"], "admin");
    assert_eq!(history[4]["event"]["title"], "Team 2");
    assert_eq!(history[6]["sender_id"], alice.id);
    assert!(history[1].get("event").is_none(), "text has no event");
    // A direct chat's timeline has no events.
    let direct = app.chat(&alice, &bob).await;
    assert!(all_history(&app, &alice, direct).await.is_empty());
}

#[tokio::test]
async fn the_added_user_gets_member_added_and_reads_the_whole_history() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let group = app.group(&alice, "Team", &[&bob]).await;
    for i in 0..5 {
        app.store_message(&bob, group, &format!("before {i}")).await;
    }
    let mut carols = app.ws(&carol).await;
    let mut bobs = app.ws(&bob).await;
    app.add_member(&alice, group, "carol").await;
    let added = carols.next_of("message").await;
    assert_eq!(added["kind"], "member_added");
    assert_eq!(added["chat_id"], group);
    assert_eq!(added["event"]["user"]["id"], carol.id);
    assert_eq!(bobs.next_of("message").await["id"], added["id"]);
    // Everything said before she joined is hers to read.
    let history = all_history(&app, &carol, group).await;
    assert_eq!(history.len(), 7);
    assert_eq!(history[1]["content"], "before 0");
    // And new messages reach her.
    let id = app.store_message(&bob, group, "welcome").await;
    assert_eq!(carols.next_of("message").await["id"], id);
}

/// Reads `ws` until the message `fence` (in another chat), returning the
/// message frames of `chat` seen before it. Each connection receives its
/// messages in id order, so anything of `chat` below the fence's id that
/// was delivered at all was delivered before it.
async fn frames_of_chat_before(ws: &mut WsClient, chat: i64, fence: i64) -> Vec<Value> {
    ws.frames_until(|v| v["type"] == "message" && v["id"] == fence)
        .await
        .into_iter()
        .filter(|v| v["type"] == "message" && v["chat_id"] == chat)
        .collect()
}

#[tokio::test]
async fn a_removed_member_gets_member_removed_last_and_nothing_after_while_others_keep_sending() {
    let app = TestApp::spawn_with(|s| s.ws.send_burst = 100_000).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let group = app.group(&alice, "Team", &[&bob, &carol]).await;
    let side = app.chat(&alice, &bob).await;
    let mut bob_phone = app.ws(&bob).await;
    let mut bob_laptop = app.ws(&bob).await;

    // Alice and Carol send to the group without pause while Bob is removed.
    let senders: Vec<_> = [(&alice, "a"), (&carol, "c")]
        .into_iter()
        .map(|(who, tag)| {
            let ws_app = app.api.base.clone();
            let user = who.clone();
            let tag = tag.to_string();
            tokio::spawn(async move {
                let api = crate::helpers::Api::new(ws_app.trim_start_matches("http://"));
                let mut ws = api.ws(&user).await;
                // In waves of ten, each acked before the next, so the
                // stream goes on for a while.
                for wave in 0..30 {
                    for i in 0..10 {
                        let n = wave * 10 + i;
                        ws.say(group, &format!("{tag}{n}"), &format!("{tag}{n}"))
                            .await;
                    }
                    let mut acks = 0;
                    while acks < 10 {
                        if ws.next_json().await["type"] == "ack" {
                            acks += 1;
                        }
                    }
                }
            })
        })
        .collect();
    // Remove Bob mid-stream: once he has seen some of it.
    let early = bob_phone.messages(50).await;
    let (status, _) = app.remove_member(&alice, group, bob.id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for s in senders {
        s.await.unwrap();
    }
    let fence = app.store_message(&alice, side, "fence").await;
    for (i, ws) in [&mut bob_phone, &mut bob_laptop].into_iter().enumerate() {
        let mut seen = if i == 0 { early.clone() } else { Vec::new() };
        seen.extend(frames_of_chat_before(ws, group, fence).await);
        let last = seen.last().expect("bob saw his removal");
        assert_eq!(
            last["kind"], "member_removed",
            "the removal is the last frame of the group"
        );
        assert_eq!(last["event"]["user"]["id"], bob.id);
        assert!(
            seen.iter()
                .filter(|v| v["kind"] == "member_removed")
                .count()
                == 1
        );
        assert!(seen.len() > 50, "bob was removed mid-stream");
    }
    assert!(
        history_sent_after(&all_history(&app, &alice, group).await, "member_removed") > 0,
        "the others kept sending after the removal"
    );
    // Bob can no longer read the group; the others saw everything.
    let (status, _) = app.history(&bob, &group.to_string(), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let history = all_history(&app, &alice, group).await;
    assert_eq!(history.len(), 1 + 600 + 1);
}

/// How many text messages come after the first message of `kind`.
fn history_sent_after(history: &[Value], kind: &str) -> usize {
    history
        .iter()
        .skip_while(|m| m["kind"] != kind)
        .filter(|m| m["kind"] == "text")
        .count()
}

#[tokio::test]
async fn three_members_sending_concurrently_see_the_same_order_as_history() {
    let app = TestApp::spawn_with(|s| s.ws.send_burst = 100_000).await;
    let members = users(&app, &["alice", "bob", "carol"]).await;
    let group = app
        .group(&members[0], "Team", &[&members[1], &members[2]])
        .await;
    let mut watchers = Vec::new();
    for m in &members {
        watchers.push(app.ws(m).await);
    }
    let tasks: Vec<_> = members
        .iter()
        .map(|m| {
            let base = app.api.base.clone();
            let user = m.clone();
            tokio::spawn(async move {
                let api = crate::helpers::Api::new(base.trim_start_matches("http://"));
                let mut ws = api.ws(&user).await;
                for i in 0..200 {
                    ws.say(group, &format!("{}-{i}", user.username), &format!("k{i}"))
                        .await;
                }
                let mut acks = 0;
                while acks < 200 {
                    if ws.next_json().await["type"] == "ack" {
                        acks += 1;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let history: Vec<i64> = all_history(&app, &members[0], group)
        .await
        .iter()
        .filter(|m| m["kind"] == "text")
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(history.len(), 600);
    for (i, ws) in watchers.iter_mut().enumerate() {
        let seen: Vec<i64> = ws
            .messages(600)
            .await
            .iter()
            .map(|m| m["id"].as_i64().unwrap())
            .collect();
        assert_eq!(seen, history, "connection {i}");
    }
}

#[tokio::test]
async fn resume_replays_a_removal_that_happened_offline_and_nothing_else_of_that_chat() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let group = app.group(&alice, "Team", &[&bob]).await;
    let other = app.group(&alice, "Other", &[&bob]).await;
    let since = app.store_message(&alice, group, "seen").await;
    // Bob is offline from here.
    app.store_message(&alice, group, "before removal").await;
    app.remove_member(&alice, group, bob.id).await;
    app.store_message(&alice, group, "after removal").await;
    let kept = app.store_message(&alice, other, "still mine").await;

    let mut ws = app.ws_since(&bob, since).await;
    let replayed = ws.frames_until(|v| v["id"] == kept).await;
    let summary: Vec<(i64, String)> = replayed
        .iter()
        .map(|v| {
            (
                v["chat_id"].as_i64().unwrap(),
                v["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (group, "member_removed".to_string()),
            (other, "text".to_string())
        ],
        "{replayed:?}"
    );
}

#[tokio::test]
async fn the_last_admin_leaving_promotes_the_longest_standing_member() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let dave = app.user("dave").await;
    let group = app.group(&alice, "Team", &[&carol]).await;
    app.add_member(&alice, group, "bob").await;
    app.add_member(&alice, group, "dave").await;
    let mut carols = app.ws(&carol).await;
    let (status, _) = app.remove_member(&alice, group, alice.id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let left = carols.next_of("message").await;
    assert_eq!(left["kind"], "member_removed");
    assert_eq!(left["content"], "alice left");
    let promoted = carols.next_of("message").await;
    assert_eq!(promoted["kind"], "role_changed");
    assert_eq!(
        promoted["event"]["user"]["id"], carol.id,
        "carol joined first"
    );
    assert_eq!(promoted["event"]["role"], "admin");
    let (_, chat) = app.chat_of(&carol, group).await;
    assert_eq!(
        member_names(&chat),
        pairs(&[("carol", "admin"), ("bob", "member"), ("dave", "member")])
    );
    // Carol can now act as admin.
    let (status, _) = app.remove_member(&carol, group, dave.id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let _ = bob;
}

#[tokio::test]
async fn a_group_whose_last_member_leaves_is_kept_and_readable_by_nobody() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let group = app.group(&alice, "Solo", &[]).await;
    app.store_message(&alice, group, "note").await;
    let (status, _) = app.remove_member(&alice, group, alice.id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.history(&alice, &group.to_string(), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = app.get("/chats", Some(&alice.token)).await;
    assert!(list.as_array().unwrap().is_empty());
    // Still stored: its messages are in the database.
    let stored = crate::db::column_i64(
        app.dir.path(),
        &format!("SELECT count(*) FROM messages WHERE chat_id = {group}"),
    )
    .await;
    assert_eq!(stored, vec![3], "created, the note, and the leave");
}
