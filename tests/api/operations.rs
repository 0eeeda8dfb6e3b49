//! Operations: probes, metrics, request ids, CORS, timeouts, backup, healthcheck.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::db::sqlite_only;
use crate::helpers::{DEADLINE, TestApp, eventually, ids};
use crate::process;

#[tokio::test]
async fn readiness_fails_when_the_database_file_goes_away_and_recovers() {
    sqlite_only!();
    let app = TestApp::spawn().await;
    let (status, _) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::OK);
    let db = app.db_path();
    let moved = db.with_extension("moved");
    std::fs::rename(&db, &moved).unwrap();
    let (status, body) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "not_ready");
    assert_eq!(body["status"], "not_ready");
    assert_ne!(body["checks"]["database"], "ok");
    assert!(
        !body.to_string().contains(db.to_str().unwrap()),
        "no paths leak: {body}"
    );
    // Liveness does no I/O: still fine.
    let (status, _) = app.get("/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    std::fs::rename(&moved, &db).unwrap();
    let (status, _) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn readiness_fails_from_the_first_moment_of_shutdown_while_requests_still_work() {
    let mut app = TestApp::spawn_with(|s| s.shutdown.drain_delay_ms = 3_000).await;
    let alice = app.user("alice").await;
    app.signal_shutdown();
    let (status, body) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["lifecycle"], "shutting_down");
    // During the drain delay the API keeps serving.
    let (status, _) = app.get("/chats", Some(&alice.token)).await;
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_scrape_after_traffic_has_every_metric_with_route_labels_and_passes_promtool() {
    let app = TestApp::spawn_with(|s| {
        s.ws.send_burst = 3;
        s.ws.send_rate_per_sec = 0.01;
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    app.history(&alice, &chat.to_string(), "").await;
    app.history(&alice, "abc", "").await;
    app.get("/no/such/route/42", None).await;
    app.login("alice", "wrong password").await;
    app.get("/chats", Some("bad")).await;
    let mut a = app.ws(&alice).await;
    let mut b = app.ws(&bob).await;
    a.say(chat, "hello", "m1").await;
    a.next_of("ack").await;
    a.say(chat, "hello", "m1").await;
    a.next_of("ack").await;
    a.say(chat, "", "bad").await;
    a.next_of("error").await;
    b.next_of("message").await;
    b.close().await;
    eventually("bob's close is counted", || {
        app.state.hub.connection_count() == 1
    })
    .await;

    let res = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    for needle in [
        r#"http_server_request_duration_seconds_bucket{method="GET",route="/chats/{chat_id}/messages",status="200",le="0.005"}"#,
        r#"http_server_request_duration_seconds_count{method="GET",route="/chats/{chat_id}/messages",status="400"}"#,
        r#"http_server_request_duration_seconds_count{method="GET",route="unmatched",status="404"}"#,
        r#"http_server_request_duration_seconds_count{method="POST",route="/login",status="401"}"#,
        r#"http_server_request_duration_seconds_bucket{method="POST",route="/login",status="200",le="10"}"#,
        "http_server_active_requests{method=\"GET\"}",
        "shindensen_ws_connections ",
        "shindensen_ws_connections_opened_total ",
        r#"shindensen_ws_connections_closed_total{reason="client"}"#,
        "shindensen_messages_accepted_total ",
        "shindensen_messages_duplicate_total ",
        r#"shindensen_messages_rejected_total{reason="invalid_content"}"#,
        "shindensen_messages_delivered_total ",
        "shindensen_message_delivery_seconds_bucket{le=",
        "shindensen_db_write_batch_size_bucket{le=",
        "shindensen_db_commit_duration_seconds_bucket{le=",
        r#"shindensen_auth_failures_total{reason="invalid_credentials"}"#,
        r#"shindensen_auth_failures_total{reason="invalid_token"}"#,
        &format!(
            r#"shindensen_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        ),
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_open_fds ",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    assert!(sample(&text, "shindensen_messages_accepted_total ").unwrap() >= 1.0);
    assert!(sample(&text, "shindensen_messages_duplicate_total ").unwrap() >= 1.0);
    // No label carries an id: every label value is a template, method,
    // status, reason, version or bucket bound.
    for id in [chat.to_string(), alice.id.to_string()] {
        assert!(
            !text.contains(&format!("/{id}")),
            "an id leaked into a label"
        );
    }
    assert!(!text.contains("/chats/abc"));
    promtool_check(&text);
}

#[tokio::test]
async fn metrics_can_live_on_a_separate_listener_only() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    crate::db::ensure_database(dir.path()).await;
    let mut settings = crate::helpers::test_settings(dir.path());
    settings.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    settings.metrics.on_main_port = false;
    let app = shindensen::app::Application::build(settings).await.unwrap();
    let main = format!("http://{}", app.local_addr());
    let ops = format!("http://{}", app.metrics_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async {
        let _ = rx.await;
    }));
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{main}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let res = http.get(format!("{ops}/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("shindensen_build_info"));
    assert_eq!(
        http.get(format!("{ops}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{ops}/login"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn request_ids_are_generated_or_propagated() {
    let app = TestApp::spawn().await;
    let res = app.http.get(app.url("/healthz")).send().await.unwrap();
    let generated = res.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let res = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-123");
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let app =
        TestApp::spawn_with(|s| s.server.cors_allowed_origins = vec!["https://app.example".into()])
            .await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/chats"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn a_slow_header_client_is_cut_off_while_normal_requests_succeed() {
    let app = TestApp::spawn_with(|s| s.server.header_read_timeout_ms = 500).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // Meanwhile normal requests are served.
    for _ in 0..5 {
        let (status, _) = app.get("/healthz", None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server never closed the slow connection");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "closed too late: {waited:?}"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        !text.contains("200 OK"),
        "the slow request was served: {text}"
    );
}

#[tokio::test]
async fn slow_requests_get_a_json_408() {
    // A body that never finishes arriving keeps the handler waiting.
    let app = TestApp::spawn_with(|s| s.server.request_timeout_ms = 300).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"user")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
}

#[tokio::test]
async fn backup_under_write_load_is_consistent_and_holds_every_message_acked_before_it() {
    sqlite_only!();
    let app = TestApp::spawn_with(|s| s.ws.send_burst = 100_000).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ws = app.ws(&alice).await;
    // Acked before the backup starts.
    let mut acked_before = Vec::new();
    for i in 0..300 {
        ws.say(chat, &format!("before {i}"), &format!("b{i}")).await;
    }
    while acked_before.len() < 300 {
        let v = ws.next_json().await;
        if v["type"] == "ack" {
            acked_before.push(v["id"].as_i64().unwrap());
        }
    }
    // Keep writing during the backup.
    let writer = tokio::spawn(async move {
        for i in 0..2_000 {
            ws.say(chat, &format!("during {i}"), &format!("d{i}")).await;
        }
        ws
    });
    let target = app.dir.path().join("backup.db");
    let out = process::command(&app.dir)
        .arg("backup")
        .arg(&target)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("integrity_check ok"), "{stdout}");
    let _ws = writer.await.unwrap();

    use sqlx::ConnectOptions;
    let mut copy = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&target)
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut copy)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    let in_copy: HashSet<i64> = sqlx::query_scalar("SELECT id FROM messages")
        .fetch_all(&mut copy)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        acked_before.iter().all(|id| in_copy.contains(id)),
        "every message acked before the backup is in it"
    );
    // Refuses to overwrite.
    let again = process::command(&app.dir)
        .arg("backup")
        .arg(&target)
        .output()
        .await
        .unwrap();
    assert!(!again.status.success());
}

#[tokio::test]
async fn healthcheck_exits_zero_only_when_the_instance_is_ready() {
    let app = TestApp::spawn_with(|s| s.shutdown.drain_delay_ms = 5_000).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let ok = process::command(&app.dir)
        .args(["healthcheck", "--addr", &addr])
        .status()
        .await
        .unwrap();
    assert!(ok.success());
    // Not ready while draining (readiness fails from the first moment of
    // shutdown; the listener still answers during the drain delay).
    let mut app = app;
    app.signal_shutdown();
    let not_ready = process::command(&app.dir)
        .args(["healthcheck", "--addr", &addr])
        .status()
        .await
        .unwrap();
    assert!(!not_ready.success());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap().to_string();
    drop(listener);
    let down = process::command(&app.dir)
        .args(["healthcheck", "--addr", &closed])
        .status()
        .await
        .unwrap();
    assert!(!down.success());
}

#[tokio::test]
async fn history_survives_the_migrate_command_and_config_prints_redacted() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    app.store_message(&alice, chat, "kept").await;
    let dir = app.stop().await;
    let out = process::command(&dir)
        .arg("migrate")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = process::command(&dir).arg("config").output().await.unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("jwt_secret = \"[redacted]\""), "{printed}");
    assert!(!printed.contains(crate::helpers::TEST_SECRET));
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let (_, history) = app.history(&alice, &chat.to_string(), "").await;
    assert_eq!(ids(&history).len(), 1);
    let _ = json!({});
}
