//! What a bad day in operations does (issue 19): a clock behind after a
//! restart, a token of an account the database does not have, the
//! database file deleted under the writer, connections that never speak.

use std::time::{Duration, Instant};

use jsonwebtoken::{EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{DEADLINE, TEST_SECRET, TestApp, TestUser, eventually, eventually_async};

/// `user`'s issued token re-signed with `sub` and `username` replaced.
fn signed(user: &TestUser, sub: i64, username: &str) -> String {
    use base64::Engine as _;
    let payload = user.token.split('.').nth(1).unwrap();
    let mut claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["sub"] = json!(sub.to_string());
    claims["username"] = json!(username);
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap()
}

fn timestamp_of(page: &Value, id: i64) -> String {
    page.as_array()
        .expect("a page")
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("message {id} in {page}"))["timestamp"]
        .as_str()
        .expect("a timestamp")
        .to_string()
}

#[tokio::test]
async fn timestamps_never_go_backwards_across_a_restart_with_the_clock_behind() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let first = app.say_and_ack(&alice, chat, "before the restart").await;
    let dir = app.stop().await;
    // The run that stored `first` had a clock an hour ahead of this one's.
    crate::db::execute(
        dir.path(),
        &format!("UPDATE messages SET created_at = created_at + 3600000 WHERE id = {first}"),
    )
    .await;

    let app = TestApp::spawn_in(dir, |_| {}).await;
    let second = app.say_and_ack(&alice, chat, "after the restart").await;
    let group = app.group(&alice, "after the restart", &[&bob]).await;
    let (status, page) = app.history(&alice, &chat.to_string(), "?limit=10").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let (t1, t2) = (timestamp_of(&page, first), timestamp_of(&page, second));
    // RFC 3339 in UTC with a fixed width: string order is time order.
    assert_eq!(t1.len(), t2.len(), "{t1} {t2}");
    assert!(
        t2 >= t1,
        "message {second} at {t2} is before message {first} at {t1}"
    );
    let (status, events) = app.history(&alice, &group.to_string(), "?limit=10").await;
    assert_eq!(status, StatusCode::OK, "{events}");
    let created = events[0]["timestamp"].as_str().unwrap().to_string();
    assert!(created >= t2, "group event at {created} is before {t2}");
}

#[tokio::test]
async fn a_signed_token_of_an_account_the_database_does_not_have_is_401_never_500() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let _bob = app.user("bob").await;
    // What a restore from an older backup leaves: tokens of later accounts.
    let ghost = signed(&alice, alice.id + 1000, "ghost");
    let answers = [
        app.post(
            "/chats/initiate",
            json!({"target_username": "bob"}),
            Some(&ghost),
        )
        .await,
        app.post("/chats", json!({"title": "t", "members": []}), Some(&ghost))
            .await,
        app.get("/chats", Some(&ghost)).await,
        app.get("/chats/1/messages", Some(&ghost)).await,
    ];
    for (status, body) in answers {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["code"], "invalid_token", "{body}");
    }
    let err = app.try_ws(Some(&ghost), "").await.err().expect("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(res) => {
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("expected a 401 answer, got {other}"),
    }
}

#[tokio::test]
async fn frames_carry_the_stored_username_not_the_token_claim() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut bob_ws = app.ws(&bob).await;
    let liar = signed(&alice, alice.id, "bob");
    let mut ws = app
        .try_ws(Some(&liar), "")
        .await
        .expect("alice's id is an account");
    ws.send_json(json!({"chat_id": chat, "content": "who am I", "client_msg_id": "k1"}))
        .await;
    ws.next_of("ack").await;
    let frame = bob_ws.next_of("message").await;
    assert_eq!(frame["sender_id"], alice.id);
    assert_eq!(frame["sender"], "alice", "{frame}");
}

/// Reads until the server closes the connection (EOF or reset); false if
/// it is still open at `deadline`.
async fn closed_by_server(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn connections_that_never_send_a_byte_are_closed_while_clients_are_served() {
    // The test process holds both ends of every connection.
    shindensen::limits::raise_nofile();
    let (soft, _) = shindensen::limits::nofile().unwrap();
    let n = 2_000.min((soft.saturating_sub(600) / 2) as usize);
    assert!(
        n >= 300,
        "open-files limit {soft} leaves room for only {n} connections"
    );
    let app = TestApp::spawn_with(|s| s.server.header_read_timeout_ms = 1_000).await;
    let alice = app.user("alice").await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let opened = Instant::now();
    let mut silent = Vec::with_capacity(n);
    for _ in 0..n {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    // A new connection per request: a pooled one idle for longer than the
    // 1 s header timeout is closed by the server, as it should be.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let chats = || {
        fresh
            .get(app.url("/chats"))
            .bearer_auth(&alice.token)
            .send()
    };
    assert_eq!(chats().await.unwrap().status(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, s) in silent.iter_mut().enumerate() {
        assert!(
            closed_by_server(s, deadline).await,
            "silent connection {i} of {n} still open"
        );
    }
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before the deadline"
    );
    assert_eq!(chats().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn a_slow_request_header_is_cut_off_after_its_first_byte_too() {
    let app = TestApp::spawn_with(|s| s.server.header_read_timeout_ms = 500).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_by_server(&mut s, Instant::now() + Duration::from_secs(10)).await);
}

#[tokio::test]
async fn over_max_connections_a_new_connection_is_closed_and_served_again_below_it() {
    let app = TestApp::spawn_with(|s| s.server.max_connections = 12).await;
    let alice = app.user("alice").await;
    let addr = app.base.trim_start_matches("http://").to_string();
    // WebSockets count too: 4 of them and 8 idle HTTP connections fill it.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(app.ws(&alice).await);
    }
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    eventually("the server counts 4 WebSockets", || {
        app.state.hub.connection_count() == 4
    })
    .await;
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, extra.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty(),
        "served over the cap: {}",
        String::from_utf8_lossy(&answer)
    );
    drop(idle);
    drop(sockets);
    // Below the cap again: served.
    eventually_async("served again below the cap", || async {
        reqwest::get(app.url("/healthz"))
            .await
            .is_ok_and(|res| res.status() == StatusCode::OK)
    })
    .await;
    let refused = metric(
        &app,
        "shindensen_connections_refused_total{reason=\"max_connections\"}",
    )
    .await;
    assert!(refused >= 1.0, "refusals counted: {refused}");
}

async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn over_the_per_user_cap_a_websocket_upgrade_is_429_too_many_connections() {
    let app = TestApp::spawn_with(|s| s.ws.max_connections_per_user = 3).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(app.ws(&alice).await);
    }
    eventually("3 connections registered", || {
        app.state
            .hub
            .connections_of(shindensen::ids::UserId(alice.id))
            == 3
    })
    .await;
    match app.try_ws(Some(&alice.token), "").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
            let body: Value =
                serde_json::from_slice(res.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], "too_many_connections");
        }
        other => panic!("expected 429, got {:?}", other.map(|_| "a connection")),
    }
    // Other accounts are not affected; a closed connection frees a place.
    app.ws(&bob).await;
    open.pop().unwrap().close().await;
    eventually("2 connections registered", || {
        app.state
            .hub
            .connections_of(shindensen::ids::UserId(alice.id))
            == 2
    })
    .await;
    app.ws(&alice).await;
}

/// Sends `n` keyed messages one at a time; returns the answers (ack or error frames).
async fn send_each(
    ws: &mut crate::helpers::WsClient,
    chat: i64,
    tag: &str,
    n: usize,
) -> Vec<Value> {
    let mut answers = Vec::new();
    for i in 0..n {
        ws.send_json(json!({"chat_id": chat, "content": format!("{tag} {i}"), "client_msg_id": format!("{tag}-{i}")}))
            .await;
        answers.push(
            ws.frames_until(|f| f["type"] == "ack" || f["type"] == "error")
                .await
                .pop()
                .unwrap(),
        );
    }
    answers
}

async fn no_ack_once_a_file_is_gone(suffix: &str) {
    crate::db::sqlite_only!();
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ws = app.ws(&alice).await;
    let before = send_each(&mut ws, chat, "before", 3).await;
    assert!(before.iter().all(|f| f["type"] == "ack"), "{before:?}");
    let mut file = app.db_path().into_os_string();
    file.push(suffix);
    std::fs::remove_file(&file).unwrap();
    let after = send_each(&mut ws, chat, "after", 5).await;
    for f in &after {
        assert_eq!(f["type"], "error", "acked after {file:?} was deleted: {f}");
        assert_eq!(f["code"], "unavailable", "{f}");
    }
    let (status, body) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test]
async fn no_send_is_acked_after_the_database_file_is_deleted() {
    no_ack_once_a_file_is_gone("").await;
}

#[tokio::test]
async fn no_send_is_acked_after_the_wal_file_is_deleted() {
    no_ack_once_a_file_is_gone("-wal").await;
}

#[tokio::test]
async fn a_resume_replay_that_is_never_read_is_closed_after_the_write_timeout() {
    let app = TestApp::spawn_with(|s| {
        s.server.write_timeout_ms = 1_000;
        s.ws.replay_max = 1_000;
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    // 1,000 messages of 4,000 four-byte characters: a 16 MB replay, more
    // than the kernel's socket buffers take.
    let long = "😀".repeat(4_000);
    for _ in 0..1_000 {
        app.store_message(&alice, chat, &long).await;
    }
    let clients = 5;
    let mut held = Vec::new();
    for _ in 0..clients {
        held.push(app.ws_small_buffer_since(&bob, 0).await); // never read
    }
    let series = "shindensen_connections_write_timeout_total";
    eventually_async(
        "every non-reading client closed by the write timeout",
        || async {
            metric(&app, series).await >= clients as f64 && app.state.hub.connection_count() == 0
        },
    )
    .await;
    drop(held);
}

#[tokio::test]
async fn readiness_fails_while_writes_fail_and_recovers_when_they_succeed() {
    use sqlx::{Connection, Executor};
    crate::db::sqlite_only!();
    let app = TestApp::spawn_with(|s| s.database.busy_timeout_ms = 200).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ws = app.ws(&alice).await;
    assert_eq!(app.get("/readyz", None).await.0, StatusCode::OK);

    // Another process holds the write lock beyond the busy timeout.
    let url = format!("sqlite:{}", app.db_path().display());
    let mut locker = sqlx::SqliteConnection::connect(&url).await.unwrap();
    locker.execute("BEGIN IMMEDIATE").await.unwrap();
    let answer = send_each(&mut ws, chat, "locked", 1).await.pop().unwrap();
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    let (status, body) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    locker.execute("ROLLBACK").await.unwrap();
    // Readiness probes with a write of its own: ready again without a send.
    eventually_async("ready after the lock was released", || async {
        app.get("/readyz", None).await.0 == StatusCode::OK
    })
    .await;
    let answer = send_each(&mut ws, chat, "unlocked", 1).await.pop().unwrap();
    assert_eq!(answer["type"], "ack", "{answer}");
}

#[tokio::test]
async fn account_creations_per_address_are_capped_when_configured() {
    let app = TestApp::spawn_with(|s| s.auth.registrations_per_ip = 3).await;
    for name in ["u1", "u2"] {
        app.user(name).await;
    }
    let (status, body) = app.register("u3", crate::helpers::PASSWORD).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = app.login("u4", crate::helpers::PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "rate_limited");
    let (status, body) = app.register("u5", crate::helpers::PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    // Existing accounts still log in.
    assert_eq!(
        app.login("u1", crate::helpers::PASSWORD).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let app = TestApp::spawn_with(|s| s.server.header_read_timeout_ms = 500).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The answer arrives; then the connection stays silent.
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_by_server(&mut s, Instant::now() + Duration::from_secs(10)).await);
}

#[tokio::test]
async fn at_the_open_files_limit_new_connections_are_refused_and_history_is_never_a_500() {
    // 300 descriptors: the server keeps 256 back and serves at most 44
    // connections (it logs both numbers at start).
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let app = crate::process::BinApp::spawn_with_nofile(dir, &[], 300).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    // Every answer on a connection the server took is a 200; the extra
    // connections are closed without one. Never a 500.
    let mut served = 0;
    for s in held.iter_mut() {
        let req = format!(
            "GET /chats/{chat}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            alice.token
        );
        if s.write_all(req.as_bytes()).await.is_err() {
            continue;
        }
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        if text.is_empty() {
            continue;
        }
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{}",
            text.lines().next().unwrap_or("")
        );
        served += 1;
    }
    assert!(served > 0 && served < 80, "{served} of 80 served");
    let logs = app.logs.lock().unwrap().clone();
    assert!(logs.contains("open-files limit"), "{logs}");
}

#[tokio::test]
async fn large_pages_held_for_clients_that_do_not_read_stay_within_the_response_budget() {
    // 8 MiB for bodies in flight; pages of about 3.4 MB.
    let app = TestApp::spawn_with(|s| {
        s.server.inflight_response_bytes = 8 * 1024 * 1024;
        s.server.request_timeout_ms = 2_000;
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let long = "😀".repeat(4_000);
    for _ in 0..200 {
        app.store_message(&alice, chat, &long).await;
    }
    let addr: std::net::SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    let big = format!("/chats/{chat}/messages?limit=200");
    let mut held = Vec::new();
    for _ in 0..5 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        let req = format!(
            "GET {big} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            alice.token
        );
        s.write_all(req.as_bytes()).await.unwrap();
        held.push(s); // never read
    }
    // Two pages fit in the budget; a reading client gets 429 for a third
    // while they are held, small pages are served, and once the
    // non-readers are gone big pages are served again.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, body) = app.get(&big, Some(&alice.token)).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(body["code"], "rate_limited");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the budget never ran out: {status}"
        );
    }
    let (status, page) = app.history(&alice, &chat.to_string(), "?limit=5").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page.as_array().unwrap().len(), 5);
    drop(held);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, page) = app.get(&big, Some(&alice.token)).await;
        if status == StatusCode::OK {
            assert_eq!(page.as_array().unwrap().len(), 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "big pages not served again: {status}"
        );
    }
}

#[tokio::test]
async fn under_concurrent_senders_the_checkpointer_runs_beside_the_writer_and_the_wal_stays_bounded()
 {
    crate::db::sqlite_only!();
    let every = 20;
    let app = TestApp::spawn_with(|s| {
        s.database.wal_checkpoint_frames = every;
        s.database.write_batch_max = 16;
        s.ws.send_rate_per_sec = 1_000_000.0;
        s.ws.send_burst = 1_000_000;
    })
    .await;
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(app.user(&format!("sender{i}")).await);
    }
    let mut chats = Vec::new();
    for pair in users.chunks(2) {
        chats.push(app.chat(&pair[0], &pair[1]).await);
    }
    let wal = {
        let mut p = app.db_path().into_os_string();
        p.push("-wal");
        std::path::PathBuf::from(p)
    };
    let runs_before = metric(&app, CHECKPOINTER_RUNS).await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (wal, done) = (wal.clone(), done.clone());
        async move {
            // Samples the WAL's size every millisecond while the load runs.
            let mut every_ms = tokio::time::interval(Duration::from_millis(1));
            let mut largest = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
                every_ms.tick().await;
            }
            largest
        }
    });
    // Every sender pipelines its messages, so batches fill and the writer
    // never waits for the checkpointer.
    let per_sender = 500;
    let mut senders = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let mut ws = app.ws(user).await;
        let chat = chats[i / 2];
        senders.push(tokio::spawn(async move {
            for k in 0..per_sender {
                ws.say(chat, &format!("m{k}"), &format!("{i}-{k}")).await;
            }
            let mut acks = 0;
            while acks < per_sender {
                let frame = ws.next_json().await;
                assert_ne!(frame["type"], "error", "{frame}");
                if frame["type"] == "ack" {
                    acks += 1;
                }
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let largest = sampler.await.unwrap();
    // The writer finishes a checkpoint at 8 × `every` frames at the latest,
    // plus what one batch of 16 messages appends; without checkpoints this
    // load appends well over a thousand frames.
    let bound = u64::from(8 * every + 90) * (4096 + 24);
    assert!(
        largest < bound,
        "the WAL grew to {largest} bytes (bound {bound})"
    );
    // (The metrics are the test process's: count this test's runs.)
    let runs = metric(&app, CHECKPOINTER_RUNS).await - runs_before;
    assert!(runs >= 1.0, "the checkpointer never ran");
}

const CHECKPOINTER_RUNS: &str =
    r#"shindensen_db_checkpoint_duration_seconds_count{on="checkpointer"}"#;
