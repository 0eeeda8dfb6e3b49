//! The real binary: exported traces, SIGTERM, kill -9, logs.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::Value;
use tokio_tungstenite::tungstenite;

use crate::helpers::{DEADLINE, PASSWORD, WsClient, eventually};
use crate::process::BinApp;

/// A real OTLP/HTTP receiver: decodes protobuf export requests with the
/// official OTLP types and keeps the spans.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let store = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let store = store.clone();
            async move {
                let req =
                    ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
                let mut s = store.lock().unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        s.extend(ss.spans);
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            AnyValue::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_dir() -> Arc<tempfile::TempDir> {
    Arc::new(tempfile::tempdir().unwrap())
}

#[tokio::test]
async fn traces_reach_an_otlp_receiver_with_the_callers_parent_and_message_ids() {
    let (endpoint, spans) = otlp_receiver().await;
    let mut app = BinApp::spawn(
        new_dir(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "shindensen-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("RUST_LOG", "info,shindensen=debug"),
        ],
    )
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let res = app
        .http
        .get(app.url("/chats"))
        .bearer_auth(&alice.token)
        .header("traceparent", format!("00-{trace_id}-{parent_id}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let mut ws = app.ws(&alice).await;
    ws.say(chat, "traced", "t1").await;
    let ack = ws.next_of("ack").await;
    let message_id = ack["id"].as_i64().unwrap().to_string();
    ws.close().await;

    let find = |spans: &[Span]| {
        let http = spans
            .iter()
            .find(|s| s.name == "GET /chats" && hex(&s.trace_id) == trace_id)
            .cloned();
        let msg = spans
            .iter()
            .find(|s| {
                s.name == "ws.message"
                    && attr(s, "message_id").as_deref() == Some(message_id.as_str())
            })
            .cloned();
        (http, msg)
    };
    eventually("the request and message spans are exported", || {
        let s = spans.lock().unwrap();
        let (h, m) = find(&s);
        h.is_some() && m.is_some()
    })
    .await;
    let (http, msg) = find(&spans.lock().unwrap());
    let http = http.unwrap();
    assert_eq!(
        hex(&http.parent_span_id),
        parent_id,
        "child of the caller's traceparent"
    );
    assert_eq!(attr(&http, "http.route").as_deref(), Some("/chats"));
    assert_eq!(attr(&http, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        attr(&http, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(http.kind, 2, "SPAN_KIND_SERVER");
    let msg = msg.unwrap();
    assert_eq!(attr(&msg, "chat_id"), Some(chat.to_string()));
    // The commit shows up as a store span.
    assert!(
        spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.name == "db.write_batch")
    );
    app.sigterm();
    assert!(app.wait().await.success());
}

/// Sends numbered messages until told to stop; returns the acked ids and
/// how the connection ended.
async fn sender(
    mut ws: WsClient,
    chat: i64,
    tag: String,
    stop: tokio_util::sync::CancellationToken,
    progress: Arc<AtomicUsize>,
) -> (Vec<i64>, Option<u16>) {
    let mut acked = Vec::new();
    let mut sent = 0usize;
    loop {
        // Keep up to 20 sends in flight.
        while sent - acked.len() < 20 && !stop.is_cancelled() {
            let frame = serde_json::json!({"chat_id": chat, "content": format!("{tag} {sent}"), "client_msg_id": format!("{tag}-{sent}")});
            if ws.stream.send_text(frame.to_string()).await.is_err() {
                return (acked, None);
            }
            sent += 1;
        }
        use futures_util::StreamExt;
        let next = tokio::select! {
            n = ws.stream.next() => n,
            _ = stop.cancelled(), if sent == acked.len() => return (acked, None),
        };
        match next {
            Some(Ok(tungstenite::Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "ack" {
                    acked.push(v["id"].as_i64().unwrap());
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(Ok(tungstenite::Message::Close(f))) => {
                return (acked, f.map(|f| u16::from(f.code)));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (acked, None),
        }
    }
}

trait SendText {
    async fn send_text(&mut self, text: String) -> Result<(), tungstenite::Error>;
}

impl SendText
    for tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>
{
    async fn send_text(&mut self, text: String) -> Result<(), tungstenite::Error> {
        use futures_util::SinkExt;
        self.send(tungstenite::Message::Text(text.into())).await
    }
}

/// The stored message ids, and SQLite's integrity check ("ok" when not on
/// SQLite: there is no such check to run).
async fn stored_ids(dir: &tempfile::TempDir) -> (Vec<i64>, String) {
    let ids = crate::db::column_i64(dir.path(), "SELECT id FROM messages ORDER BY id").await;
    let check = crate::db::integrity_check(dir.path())
        .await
        .unwrap_or_else(|| "ok".into());
    (ids, check)
}

#[tokio::test]
async fn sigterm_mid_stream_acks_then_closes_1001_and_loses_nothing_acked() {
    let mut app = BinApp::spawn(new_dir(), &[("SHINDENSEN_WS__SEND_BURST", "100000")]).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let progress = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let ws = app.ws(if i % 2 == 0 { &alice } else { &bob }).await;
        tasks.push(tokio::spawn(sender(
            ws,
            chat,
            format!("c{i}"),
            stop.clone(),
            progress.clone(),
        )));
    }
    // Let the stream get going, then SIGTERM in the middle of it.
    eventually("messages are flowing", || {
        progress.load(Ordering::Relaxed) > 500
    })
    .await;
    app.sigterm();
    let mut acked = Vec::new();
    for t in tasks {
        let (ids, close) = tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
        assert_eq!(close, Some(1001), "clients see 1001");
        acked.extend(ids);
    }
    let status = app.wait().await;
    assert!(
        status.success(),
        "exit 0 on SIGTERM: {status:?}\n{}",
        app.logs()
    );
    stop.cancel();
    assert!(
        acked.len() > 100,
        "the stream was running: {} acked",
        acked.len()
    );
    let (stored, check) = stored_ids(&app.dir).await;
    assert_eq!(check, "ok");
    let stored: HashSet<i64> = stored.into_iter().collect();
    let missing: Vec<_> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(missing.is_empty(), "acked but not stored: {missing:?}");
}

#[tokio::test]
async fn kill_9_mid_stream_from_20_clients_never_loses_an_acked_message() {
    let mut dir = new_dir();
    let mut all_acked: Vec<i64> = Vec::new();
    for round in 0..3 {
        let app = BinApp::spawn(dir.clone(), &[("SHINDENSEN_WS__SEND_BURST", "100000")]).await;
        let mut users = Vec::new();
        for i in 0..20 {
            users.push(app.user(&format!("u{i}")).await);
        }
        let mut chats = Vec::new();
        for i in 0..10 {
            chats.push(app.chat(&users[2 * i], &users[2 * i + 1]).await);
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let progress = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (i, u) in users.iter().enumerate() {
            let ws = app.ws(u).await;
            tasks.push(tokio::spawn(sender(
                ws,
                chats[i / 2],
                format!("r{round}u{i}"),
                stop.clone(),
                progress.clone(),
            )));
        }
        eventually("messages are flowing", || {
            progress.load(Ordering::Relaxed) > 500
        })
        .await;
        dir = app.kill9().await;
        for t in tasks {
            let (ids, _) = tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
            all_acked.extend(ids);
        }
        let (stored, check) = stored_ids(&dir).await;
        assert_eq!(check, "ok", "round {round}");
        let unique: HashSet<i64> = stored.iter().copied().collect();
        assert_eq!(unique.len(), stored.len(), "no duplicate ids");
        let missing = all_acked.iter().filter(|id| !unique.contains(id)).count();
        assert_eq!(
            missing, 0,
            "round {round}: acked messages lost after kill -9"
        );
    }
    assert!(
        all_acked.len() > 1500,
        "streams were running: {}",
        all_acked.len()
    );
}

#[tokio::test]
async fn logs_never_contain_tokens_or_passwords() {
    let mut app = BinApp::spawn(new_dir(), &[("RUST_LOG", "debug")]).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    app.login("alice", "not the password").await;
    app.get("/chats", Some(&alice.token)).await;
    let mut ws = app
        .try_ws(None, &format!("?access_token={}", alice.token))
        .await
        .unwrap();
    ws.say(chat, "hello", "x").await;
    ws.next_of("ack").await;
    ws.close().await;
    app.sigterm();
    app.wait().await;
    let logs = app.logs();
    assert!(logs.contains("shindensen listening"), "logs were captured");
    assert!(
        logs.lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with('{')),
        "JSON lines"
    );
    for secret in [
        alice.token.as_str(),
        bob.token.as_str(),
        PASSWORD,
        "not the password",
    ] {
        assert!(!logs.contains(secret), "a secret leaked into the logs");
    }
    // Token fragments too (a signature alone would be enough to matter).
    let signature = alice.token.rsplit('.').next().unwrap();
    assert!(!logs.contains(signature));
}

#[tokio::test]
async fn kubernetes_service_link_variables_do_not_stop_the_server() {
    // What Kubernetes injects for a Service named `shindensen` when the pod
    // does not set enableServiceLinks: false, plus a wrapper's variable.
    let links = [
        ("SHINDENSEN_SERVICE_HOST", "10.0.0.1"),
        ("SHINDENSEN_SERVICE_PORT", "80"),
        ("SHINDENSEN_SERVICE_PORT_HTTP", "80"),
        ("SHINDENSEN_PORT", "tcp://10.0.0.1:80"),
        ("SHINDENSEN_PORT_80_TCP", "tcp://10.0.0.1:80"),
        ("SHINDENSEN_PORT_80_TCP_PROTO", "tcp"),
        ("SHINDENSEN_PORT_80_TCP_PORT", "80"),
        ("SHINDENSEN_PORT_80_TCP_ADDR", "10.0.0.1"),
        ("SHINDENSEN_BIN", "/usr/local/bin/shindensen"),
        ("RUST_LOG", "debug"),
    ];
    let mut app = BinApp::spawn(new_dir(), &links).await;
    let alice = app.user("alice").await;
    let (status, _) = app.get("/chats", Some(&alice.token)).await;
    assert_eq!(status, axum::http::StatusCode::OK);
    app.sigterm();
    app.wait().await;
    let logs = app.logs();
    let ignored = logs
        .lines()
        .find(|l| l.contains("were ignored"))
        .unwrap_or_else(|| panic!("a debug line names the ignored variables:\n{logs}"));
    assert!(ignored.contains("SHINDENSEN_PORT_80_TCP_ADDR"), "{ignored}");
}

#[tokio::test]
async fn a_misspelt_section_or_an_unknown_file_key_still_stops_start_up() {
    let dir = new_dir();
    crate::db::ensure_database(dir.path()).await;
    let out = crate::process::command(&dir)
        .env("SHINDENSEN_SERVR__LISTEN", "127.0.0.1:0")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("servr"), "{stderr}");

    let file = dir.path().join("shindensen.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:0\"\nlistne = \"x\"\n",
    )
    .unwrap();
    let out = crate::process::command(&dir)
        .env("SHINDENSEN_CONFIG", &file)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listne"), "{stderr}");
}
