//! PostgreSQL only: several shindensen processes on one database, the
//! order in which ids become visible, the database going away and coming
//! back, and moving a SQLite deployment over with `migrate-data`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use sqlx::ConnectOptions;

use crate::db::{OwnPostgres, postgres_only};
use crate::helpers::{DEADLINE, PASSWORD, TestApp, WsClient, eventually_async, ids};
use crate::process::{self, BinApp};

const LOAD: &[(&str, &str)] = &[
    ("SHINDENSEN_WS__SEND_BURST", "100000"),
    ("SHINDENSEN_WS__SEND_RATE_PER_SEC", "100000"),
];

fn new_dir() -> Arc<tempfile::TempDir> {
    Arc::new(tempfile::tempdir().unwrap())
}

/// Two processes on one database (the same test directory).
async fn two_nodes() -> (BinApp, BinApp) {
    let dir = new_dir();
    let a = BinApp::spawn(dir.clone(), LOAD).await;
    let b = BinApp::spawn(dir, LOAD).await;
    (a, b)
}

/// Sends `n` messages with keys `{tag}-{i}` and returns the ack ids.
async fn send_all(mut ws: WsClient, chat: i64, tag: String, n: usize) -> Vec<i64> {
    for i in 0..n {
        ws.say(chat, &format!("{tag} {i}"), &format!("{tag}-{i}"))
            .await;
    }
    let mut acks = Vec::with_capacity(n);
    while acks.len() < n {
        let v = ws.next_json().await;
        match v["type"].as_str() {
            Some("ack") => acks.push(v["id"].as_i64().unwrap()),
            Some("error") => panic!("send refused: {v}"),
            _ => {}
        }
    }
    acks
}

/// The ids of the next `n` text messages on `ws`, checking that every
/// message frame (events too) arrives in ascending id order.
async fn ascending_texts(ws: &mut WsClient, n: usize) -> Vec<i64> {
    let mut last = 0;
    let mut texts = Vec::with_capacity(n);
    while texts.len() < n {
        let v = ws.next_of("message").await;
        let id = v["id"].as_i64().unwrap();
        assert!(id > last, "id {id} after {last}: not ascending");
        last = id;
        if v["kind"] == "text" {
            texts.push(id);
        }
    }
    texts
}

async fn text_history(
    app: &crate::helpers::Api,
    who: &crate::helpers::TestUser,
    chat: i64,
) -> Vec<i64> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = app
            .history(who, &chat.to_string(), &format!("?after={after}&limit=200"))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let page = page.as_array().unwrap().clone();
        let Some(last) = page.last() else { return out };
        after = last["id"].as_i64().unwrap();
        out.extend(
            page.iter()
                .filter(|m| m["kind"] == "text")
                .map(|m| m["id"].as_i64().unwrap()),
        );
    }
}

#[tokio::test]
async fn two_nodes_deliver_each_others_messages_to_every_connection_in_id_order() {
    postgres_only!();
    let (a, b) = two_nodes().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let carol = a.user("carol").await;
    let group = a.group(&alice, "Team", &[&bob, &carol]).await;
    let direct = b.chat(&bob, &alice).await;
    // Receivers on both nodes; senders on both nodes at once.
    let mut carol_on_b = b.ws(&carol).await;
    let mut alice_on_b = b.ws(&alice).await;
    let mut bob_on_a = a.ws(&bob).await;
    let sends = tokio::join!(
        send_all(a.ws(&alice).await, group, "a".into(), 300),
        send_all(b.ws(&bob).await, group, "b".into(), 300),
        send_all(b.ws(&bob).await, direct, "d".into(), 300),
    );
    for acks in [&sends.0, &sends.1, &sends.2] {
        assert!(acks.windows(2).all(|w| w[0] < w[1]), "acks in send order");
    }
    let group_history = text_history(&a.api, &carol, group).await;
    assert_eq!(group_history.len(), 600);
    let carol_seen = ascending_texts(&mut carol_on_b, 600).await;
    assert_eq!(
        carol_seen, group_history,
        "carol on node b: every group message, in id order"
    );
    // Alice and Bob are in both chats: one ascending stream across them.
    let mut both: Vec<i64> = group_history.clone();
    both.extend(text_history(&b.api, &bob, direct).await);
    both.sort_unstable();
    assert_eq!(both.len(), 900);
    assert_eq!(ascending_texts(&mut alice_on_b, 900).await, both);
    assert_eq!(ascending_texts(&mut bob_on_a, 900).await, both);
}

#[tokio::test]
async fn resume_on_the_other_node_gives_exactly_the_missed_messages_and_resends_get_the_original_ack()
 {
    postgres_only!();
    let (a, b) = two_nodes().await;
    let alice = a.user("alice").await;
    let bob = a.user("bob").await;
    let chat = a.chat(&alice, &bob).await;
    let mut bob_ws = a.ws(&bob).await;
    let first = send_all(a.ws(&alice).await, chat, "x".into(), 20).await;
    let seen = ascending_texts(&mut bob_ws, 20).await;
    assert_eq!(seen, first);
    bob_ws.close().await;
    // Bob is offline; alice keeps sending through node a.
    let missed = send_all(a.ws(&alice).await, chat, "y".into(), 50).await;
    // Bob comes back on node b.
    let mut resumed = b.ws_since(&bob, *seen.last().unwrap()).await;
    assert_eq!(ascending_texts(&mut resumed, 50).await, missed);
    let fence = b.say_and_ack(&alice, chat, "fence").await;
    assert_eq!(
        ascending_texts(&mut resumed, 1).await,
        vec![fence],
        "no duplicates after the replay"
    );

    // A resend through the other node gets the original ack, stores nothing.
    let mut on_a = a.ws(&alice).await;
    on_a.say(chat, "once", "k-once").await;
    let ack_a = on_a.next_of("ack").await;
    let mut on_b = b.ws(&alice).await;
    on_b.say(chat, "once", "k-once").await;
    let ack_b = on_b.next_of("ack").await;
    assert_eq!(ack_a["id"], ack_b["id"]);
    assert_eq!(ack_a["timestamp"], ack_b["timestamp"]);
    let history = text_history(&b.api, &bob, chat).await;
    assert_eq!(
        history
            .iter()
            .filter(|id| **id == ack_a["id"].as_i64().unwrap())
            .count(),
        1
    );
    assert_eq!(history.len(), 20 + 50 + 1 + 1);
}

#[tokio::test]
async fn concurrent_initiates_from_two_nodes_make_one_direct_chat() {
    postgres_only!();
    let (a, b) = two_nodes().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let calls = (0..20).map(|i| {
        let (node, who, target) = if i % 2 == 0 {
            (&a, &alice, "bob")
        } else {
            (&b, &bob, "alice")
        };
        node.initiate(who, target)
    });
    let results = futures_util::future::join_all(calls).await;
    let chats: HashSet<i64> = results
        .iter()
        .map(|(s, body)| {
            assert_eq!(*s, StatusCode::OK, "{body}");
            body["chat_id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(chats.len(), 1);
    assert_eq!(
        results
            .iter()
            .filter(|(_, b)| b["status"] == "created")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_removal_and_a_concurrent_send_from_another_node_cannot_both_win() {
    postgres_only!();
    let (a, b) = two_nodes().await;
    let alice = a.user("alice").await;
    let bob = a.user("bob").await;
    let group = a.group(&alice, "Team", &[&bob]).await;
    // Bob sends without pause through node b; once 20 of his sends are
    // acked, alice removes him on node a. He keeps sending until refused
    // (and a few more), so the removal lands mid-stream on any machine.
    let mut bob_ws = b.ws(&bob).await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let sender = tokio::spawn(async move {
        let mut started = Some(started_tx);
        let mut acked = Vec::new();
        let mut refused = 0;
        for i in 0..100_000 {
            if refused >= 5 {
                break;
            }
            bob_ws.say(group, &format!("b{i}"), &format!("b{i}")).await;
            loop {
                let v = bob_ws.next_json().await;
                match v["type"].as_str() {
                    Some("ack") => {
                        assert_eq!(refused, 0, "an ack after a refusal: {v}");
                        acked.push(v["id"].as_i64().unwrap());
                        break;
                    }
                    Some("error") => {
                        assert_eq!(v["code"], "chat_not_found", "{v}");
                        refused += 1;
                        break;
                    }
                    _ => {}
                }
            }
            if acked.len() == 20
                && let Some(tx) = started.take()
            {
                let _ = tx.send(());
            }
        }
        (acked, refused)
    });
    started_rx.await.expect("20 sends acked before the removal");
    let (status, _) = a.remove_member(&alice, group, bob.id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (acked, refused) = sender.await.unwrap();
    let history = crate::db::column_i64(
        a.dir.path(),
        &format!("SELECT id FROM messages WHERE chat_id = {group} AND kind = 'member_removed'"),
    )
    .await;
    let removal = history[0];
    assert!(
        acked.iter().all(|id| *id < removal),
        "an acked send after the removal: {acked:?} vs {removal}"
    );
    assert!(
        refused > 0 && !acked.is_empty(),
        "the removal landed mid-stream ({} acked, {refused} refused)",
        acked.len()
    );
}

#[tokio::test]
async fn ids_become_visible_in_id_order_even_when_an_earlier_commit_is_slow() {
    postgres_only!();
    // Node a's commit into chat X is held up (the test holds a lock its
    // insert needs) while node b commits into chat Y. A user in both chats
    // on node b must still receive X's message before Y's: an id taken
    // before COMMIT (a plain sequence) would let Y's larger id through
    // first, and a client resuming after it would never see X's.
    let (a, b) = two_nodes().await;
    let alice = a.user("alice").await;
    let bob = a.user("bob").await;
    let carol = a.user("carol").await;
    let x = a.chat(&alice, &carol).await;
    let y = a.chat(&bob, &carol).await;
    let mut carol_on_b = b.ws(&carol).await;

    let url = crate::db::database_url(a.dir.path());
    let mut blocker = url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .connect()
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM chats WHERE id = {x} FOR UPDATE"
    )))
    .execute(&mut blocker)
    .await
    .unwrap();
    let waiting = || async {
        crate::db::column_i64(
            a.dir.path(),
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await[0]
    };
    let mut alice_ws = a.ws(&alice).await;
    alice_ws.say(x, "slow", "slow").await;
    wait_for_i64("node a's insert waits on the test's lock", &waiting, 1).await;
    let mut bob_ws = b.ws(&bob).await;
    bob_ws.say(y, "fast", "fast").await;
    // Node b's send either waits for the stream lock (ids in commit order)
    // or, with ids taken before COMMIT, commits at once and is acked.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if waiting().await >= 2 {
            break;
        }
        let acked = tokio::time::timeout(Duration::from_millis(20), bob_ws.next_of("ack")).await;
        if acked.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node b's send neither waited nor committed"
        );
    }
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    let first = carol_on_b.next_of("message").await;
    let second = carol_on_b.next_of("message").await;
    assert_eq!(
        (first["chat_id"].as_i64(), second["chat_id"].as_i64()),
        (Some(x), Some(y)),
        "X's message was committed first"
    );
    assert!(
        first["id"].as_i64() < second["id"].as_i64(),
        "{first} then {second}"
    );
}

/// Waits until `probe` returns at least `at_least`.
async fn wait_for_i64<F, Fut>(what: &str, probe: F, at_least: i64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while probe().await < at_least {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tick.tick().await;
    }
}

#[tokio::test]
async fn postgres_restarted_under_load_loses_no_acked_message_and_nodes_recover() {
    postgres_only!();
    let pg = OwnPostgres::start();
    let dir = new_dir();
    let mut envs = LOAD.to_vec();
    envs.push(("DATABASE_URL", pg.url.as_str()));
    envs.push(("SHINDENSEN_DATABASE__CONNECT_TIMEOUT_MS", "500"));
    let app = BinApp::spawn(dir, &envs).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ws = app.ws(&alice).await;

    let mut acked = Vec::new();
    let mut unavailable = 0;
    // Sends before, during and after the outage; each waits for its answer.
    let mut n = 0;
    let mut send = async |ws: &mut WsClient| {
        n += 1;
        send_one(ws, chat, n).await
    };
    for _ in 0..50 {
        acked.push(send(&mut ws).await.expect("acked before the outage"));
    }
    pg.down();
    // While the database is down: sends are refused (never acked) and
    // readiness fails.
    loop {
        match send(&mut ws).await {
            Err(code) => {
                assert_eq!(code, "unavailable");
                unavailable += 1;
                if unavailable >= 3 {
                    break;
                }
            }
            Ok(id) => acked.push(id),
        }
    }
    let (status, body) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    pg.up();
    // The node recovers by itself: readiness and sends come back.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match send(&mut ws).await {
            Ok(id) => {
                acked.push(id);
                break;
            }
            Err(code) => assert_eq!(code, "unavailable"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sends did not recover"
        );
    }
    for _ in 0..50 {
        acked.push(send(&mut ws).await.expect("acked after recovery"));
    }
    let (status, _) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::OK);
    // Every acked message is stored, once.
    let mut conn = pg
        .url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stored: HashSet<i64> = sqlx::query_scalar("SELECT id FROM messages")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        acked.iter().all(|id| stored.contains(id)),
        "an acked message was lost"
    );
    assert!(unavailable >= 3);
    // And bob's connection got them live, in order, with no gap.
    let mut bob_ws = app.ws_since(&bob, 0).await;
    let replayed = ascending_texts(&mut bob_ws, acked.len()).await;
    let mut sorted = acked.clone();
    sorted.sort_unstable();
    assert_eq!(replayed, sorted);
}

/// Sends message `i` and returns its ack's id, or the error frame's code.
async fn send_one(ws: &mut WsClient, chat: i64, i: usize) -> Result<i64, String> {
    ws.say(chat, &format!("m{i}"), &format!("k{i}")).await;
    loop {
        let v = ws.next_json().await;
        match v["type"].as_str() {
            Some("ack") => return Ok(v["id"].as_i64().unwrap()),
            Some("error") => return Err(v["code"].as_str().unwrap().to_string()),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_node_that_cannot_reach_postgres_at_start_exits_with_a_clear_error() {
    postgres_only!();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let out = process::command(&dir)
        .env(
            "DATABASE_URL",
            format!("postgres://shindensen:secret-pw@127.0.0.1:{port}/chat"),
        )
        .env("SHINDENSEN_DATABASE__CONNECT_TIMEOUT_MS", "300")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("opening the database"), "{stderr}");
    assert!(
        !stderr.contains("secret-pw"),
        "no password in errors: {stderr}"
    );
}

#[tokio::test]
async fn backup_on_postgres_says_how_to_back_up() {
    postgres_only!();
    let dir = tempfile::tempdir().unwrap();
    let out = process::command(&dir)
        .args(["backup", "/tmp/never.db"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pg_dump"), "{stderr}");
}

#[tokio::test]
async fn migrate_data_moves_a_sqlite_deployment_to_postgres_and_refuses_a_non_empty_target() {
    postgres_only!();
    // A SQLite deployment with direct chats, a group with events, keys and markers.
    let src = Arc::new(tempfile::tempdir().unwrap());
    let sqlite_url = format!("sqlite:{}", src.path().join("old.db").display());
    let old = TestApp::spawn_in(src.clone(), |s| s.database.url = sqlite_url.clone()).await;
    let alice = old.user("alice").await;
    let bob = old.user("bob").await;
    let carol = old.user("carol").await;
    let direct = old.chat(&alice, &bob).await;
    let group = old.group(&alice, "Team", &[&bob]).await;
    old.add_member(&alice, group, "carol").await;
    let mut ws = old.ws(&alice).await;
    for i in 0..30 {
        ws.say(
            if i % 2 == 0 { direct } else { group },
            &format!("m{i}"),
            &format!("k{i}"),
        )
        .await;
        ws.next_of("ack").await;
    }
    let (_, direct_before) = old.history(&bob, &direct.to_string(), "?limit=200").await;
    let (_, group_before) = old.history(&carol, &group.to_string(), "?limit=200").await;
    let last = ids(&direct_before).last().copied().unwrap();
    old.mark_read(&bob, direct, last).await;
    let list_before = old.listed(&bob, direct).await;
    drop(ws);
    old.stop().await;

    let dst = Arc::new(tempfile::tempdir().unwrap());
    crate::db::ensure_database(dst.path()).await;
    let pg_url = crate::db::database_url(dst.path());
    let out = process::command(&dst)
        .args(["migrate-data", "--from", &sqlite_url, "--to", &pg_url])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("3 users") && stdout.contains("2 chats"),
        "{stdout}"
    );

    let new = TestApp::spawn_in(dst.clone(), |_| {}).await;
    // Passwords carried over (log in again), ids unchanged.
    let (status, body) = new.login("alice", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], alice.id);
    let (_, direct_after) = new.history(&bob, &direct.to_string(), "?limit=200").await;
    let (_, group_after) = new.history(&carol, &group.to_string(), "?limit=200").await;
    assert_eq!(direct_after, direct_before);
    assert_eq!(group_after, group_before);
    let list_after = new.listed(&bob, direct).await;
    assert_eq!(list_after["last_read_id"], list_before["last_read_id"]);
    assert_eq!(list_after["unread_count"], list_before["unread_count"]);
    // Keys: a resend gets the original ack; new messages continue the ids.
    let mut ws = new.ws(&alice).await;
    ws.say(direct, "m0", "k0").await;
    let ack = ws.next_of("ack").await;
    assert_eq!(ack["id"], direct_before[0]["id"]);
    ws.say(direct, "new", "k-new").await;
    let fresh = ws.next_of("ack").await["id"].as_i64().unwrap();
    let max_before = ids(&group_before)
        .into_iter()
        .chain(ids(&direct_before))
        .max()
        .unwrap();
    assert!(fresh > max_before);
    let (status, chat) = new.create_group(&carol, "New", &["bob"]).await;
    assert_eq!(status, StatusCode::CREATED, "{chat}");
    assert!(chat["chat_id"].as_i64().unwrap() > group);

    // A second copy into the same database is refused.
    let again = process::command(&dst)
        .args(["migrate-data", "--from", &sqlite_url, "--to", &pg_url])
        .output()
        .await
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}

#[tokio::test]
async fn logout_and_a_password_change_on_one_node_revoke_tokens_on_the_other() {
    postgres_only!();
    let dir = new_dir();
    // Node b checks open WebSockets' tokens every 200 ms (its ping interval).
    let a = BinApp::spawn(dir.clone(), &[]).await;
    let b = BinApp::spawn(dir, &[("SHINDENSEN_WS__PING_INTERVAL_MS", "200")]).await;
    let alice = a.user("alice").await;
    let (_, second) = a.login("alice", PASSWORD).await;
    let second_token = second["token"].as_str().unwrap().to_string();
    let mut on_b = b.ws(&alice).await;

    let res = a
        .http
        .post(a.url("/logout"))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    // Node b refuses the token within its 1 s check cache, and closes the
    // WebSocket opened with it.
    eventually_async("node b refuses the token", || async {
        b.get("/chats", Some(&alice.token)).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(on_b.close_frame().await.expect("closed").code, 4001.into());
    assert_eq!(b.get("/chats", Some(&second_token)).await.0, StatusCode::OK);

    // A password change on b revokes the other token on a; refresh works on both.
    let (status, refreshed) = a
        .post("/token/refresh", serde_json::json!({}), Some(&second_token))
        .await;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    let change =
        serde_json::json!({"old_password": PASSWORD, "new_password": "another password 2"});
    let (status, body) = b
        .post("/account/password", change, Some(&second_token))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let new_token = body["token"].as_str().unwrap();
    eventually_async("node a refuses the old token", || async {
        a.get("/chats", Some(&second_token)).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    let stale = refreshed["token"].as_str().unwrap();
    assert_eq!(
        a.get("/chats", Some(stale)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(a.get("/chats", Some(new_token)).await.0, StatusCode::OK);
}
