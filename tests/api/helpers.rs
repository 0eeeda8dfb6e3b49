//! `TestApp`: spawns the application and speaks its API.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::{Value, json};
use shindensen::app::{AppState, Application};
use shindensen::config::Settings;
use shindensen::ids::{ChatId, UserId};
use shindensen::store::{NewMessage, SendOutcome};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The signing secret of test apps, so tests can forge tokens against it.
pub const TEST_SECRET: &str = "test-secret-test-secret-test-secret-0123456789";
pub const PASSWORD: &str = "correct horse battery";

/// A client of one running server (in-process or a child process).
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(addr: &str) -> Api {
        Api {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }
}

pub struct TestApp {
    pub api: Api,
    pub state: AppState,
    pub dir: Arc<TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: i64,
    pub username: String,
    pub token: String,
}

/// Settings of a test app whose data lives in `dir` (see `db.rs`). Call
/// `crate::db::ensure_database(dir)` before building an app on them.
pub fn test_settings(dir: &Path) -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.database.url = crate::db::database_url(dir);
    s.auth.jwt_secret = Some(SecretString::from(TEST_SECRET));
    s
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::spawn_in(dir, tweak).await
    }

    /// Spawns an app on the database in `dir` (restarts reuse the dir).
    pub async fn spawn_in(dir: Arc<TempDir>, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        crate::db::ensure_database(dir.path()).await;
        let mut settings = test_settings(dir.path());
        tweak(&mut settings);
        let app = Application::build(settings).await.expect("app builds");
        let addr = app.local_addr();
        let state = app.state();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async {
            let _ = rx.await;
        }));
        TestApp {
            api: Api::new(&addr.to_string()),
            state,
            dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("test.db")
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts the app down gracefully and waits for it to finish.
    pub async fn stop(mut self) -> Arc<TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("app task").expect("app ran");
        }
        self.dir.clone()
    }

    /// Stores a message through the same writer the WebSocket uses.
    pub async fn store_message(&self, sender: &TestUser, chat_id: i64, content: &str) -> i64 {
        let outcome = self
            .state
            .store
            .send_message(NewMessage {
                chat_id: ChatId(chat_id),
                sender_id: UserId(sender.id),
                sender: sender.username.as_str().into(),
                content: content.into(),
                client_msg_id: None,
            })
            .await
            .expect("message stored");
        match outcome {
            SendOutcome::Created(m) => m.message.id.get(),
            SendOutcome::Duplicate(_) => panic!("unexpected duplicate"),
        }
    }
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request and returns the status and the JSON body (Null if none).
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let res = req.send().await.expect("request sent");
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn post(&self, path: &str, body: Value, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.post(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req).await
    }

    pub async fn patch(&self, path: &str, body: Value, token: &str) -> (StatusCode, Value) {
        self.send(
            self.http
                .patch(self.url(path))
                .json(&body)
                .bearer_auth(token),
        )
        .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.send(self.http.delete(self.url(path)).bearer_auth(token))
            .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req).await
    }

    pub async fn login(&self, username: &str, password: &str) -> (StatusCode, Value) {
        self.post(
            "/login",
            json!({"username": username, "password": password}),
            None,
        )
        .await
    }

    pub async fn register(&self, username: &str, password: &str) -> (StatusCode, Value) {
        self.post(
            "/register",
            json!({"username": username, "password": password}),
            None,
        )
        .await
    }

    /// Logs in (registering) a user with the test password.
    pub async fn user(&self, username: &str) -> TestUser {
        let (status, body) = self.login(username, PASSWORD).await;
        assert_eq!(status, StatusCode::OK, "login {username}: {body}");
        TestUser {
            id: body["user"]["id"].as_i64().expect("user id"),
            username: body["user"]["username"].as_str().expect("username").into(),
            token: body["token"].as_str().expect("token").into(),
        }
    }

    pub async fn initiate(&self, who: &TestUser, target: &str) -> (StatusCode, Value) {
        self.post(
            "/chats/initiate",
            json!({"target_username": target}),
            Some(&who.token),
        )
        .await
    }

    /// Creates the chat of two users and returns its id.
    pub async fn chat(&self, a: &TestUser, b: &TestUser) -> i64 {
        let (status, body) = self.initiate(a, &b.username).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["chat_id"].as_i64().expect("chat_id")
    }

    /// `POST /chats` for a group of `who` and the named members.
    pub async fn create_group(
        &self,
        who: &TestUser,
        title: &str,
        members: &[&str],
    ) -> (StatusCode, Value) {
        self.post(
            "/chats",
            json!({"type": "group", "title": title, "members": members}),
            Some(&who.token),
        )
        .await
    }

    /// Creates a group and returns its id.
    pub async fn group(&self, who: &TestUser, title: &str, members: &[&TestUser]) -> i64 {
        let names: Vec<&str> = members.iter().map(|u| u.username.as_str()).collect();
        let (status, body) = self.create_group(who, title, &names).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["chat_id"].as_i64().expect("chat_id")
    }

    pub async fn chat_of(&self, who: &TestUser, chat: i64) -> (StatusCode, Value) {
        self.get(&format!("/chats/{chat}"), Some(&who.token)).await
    }

    pub async fn add_member(
        &self,
        who: &TestUser,
        chat: i64,
        username: &str,
    ) -> (StatusCode, Value) {
        self.post(
            &format!("/chats/{chat}/members"),
            json!({"username": username}),
            Some(&who.token),
        )
        .await
    }

    pub async fn remove_member(&self, who: &TestUser, chat: i64, user: i64) -> (StatusCode, Value) {
        self.delete(&format!("/chats/{chat}/members/{user}"), &who.token)
            .await
    }

    pub async fn set_role(
        &self,
        who: &TestUser,
        chat: i64,
        user: i64,
        role: &str,
    ) -> (StatusCode, Value) {
        self.patch(
            &format!("/chats/{chat}/members/{user}"),
            json!({"role": role}),
            &who.token,
        )
        .await
    }

    pub async fn mark_read(&self, who: &TestUser, chat: i64, up_to: i64) -> (StatusCode, Value) {
        self.post(
            &format!("/chats/{chat}/read"),
            json!({"up_to": up_to}),
            Some(&who.token),
        )
        .await
    }

    /// Sends `content` over a new WebSocket and returns the acked id.
    pub async fn say_and_ack(&self, who: &TestUser, chat: i64, content: &str) -> i64 {
        let mut ws = self.ws(who).await;
        ws.send_json(json!({"chat_id": chat, "content": content}))
            .await;
        let id = ws.next_of("ack").await["id"].as_i64().expect("ack id");
        ws.close().await;
        id
    }

    /// The caller's entry for `chat` in `GET /chats`.
    pub async fn listed(&self, who: &TestUser, chat: i64) -> Value {
        let (status, list) = self.get("/chats", Some(&who.token)).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        list.as_array()
            .expect("a list")
            .iter()
            .find(|c| c["chat_id"] == chat)
            .cloned()
            .unwrap_or_else(|| panic!("chat {chat} is not in {}'s list: {list}", who.username))
    }

    pub async fn history(&self, who: &TestUser, chat: &str, query: &str) -> (StatusCode, Value) {
        self.get(&format!("/chats/{chat}/messages{query}"), Some(&who.token))
            .await
    }
}

impl std::ops::Deref for TestApp {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The ids of a JSON array of messages.
pub fn ids(messages: &Value) -> Vec<i64> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("expected an array of messages, got {messages}"))
        .iter()
        .map(|m| m["id"].as_i64().expect("id"))
        .collect()
}

// ---- WebSocket ----

use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should happen.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
}

impl Api {
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.base.trim_start_matches("http://"))
    }

    /// Connects with `Authorization: Bearer` and the given query.
    pub async fn try_ws(
        &self,
        token: Option<&str>,
        query: &str,
    ) -> Result<WsClient, tungstenite::Error> {
        let mut req = self.ws_url(query).into_client_request()?;
        if let Some(t) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (stream, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(WsClient { stream })
    }

    pub async fn ws(&self, user: &TestUser) -> WsClient {
        self.try_ws(Some(&user.token), "")
            .await
            .expect("websocket connects")
    }

    pub async fn ws_since(&self, user: &TestUser, since: i64) -> WsClient {
        self.try_ws(Some(&user.token), &format!("?since={since}"))
            .await
            .expect("websocket connects")
    }

    /// A connection whose socket receive buffer is tiny, for clients that
    /// stop reading: the server's queue fills instead of the kernel's buffers.
    pub async fn ws_small_buffer(&self, user: &TestUser) -> WsClient {
        self.ws_small_buffer_query(user, "").await
    }

    /// [`Api::ws_small_buffer`], resuming after `since`.
    pub async fn ws_small_buffer_since(&self, user: &TestUser, since: i64) -> WsClient {
        self.ws_small_buffer_query(user, &format!("?since={since}"))
            .await
    }

    async fn ws_small_buffer_query(&self, user: &TestUser, query: &str) -> WsClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let addr = self.base.trim_start_matches("http://").parse().unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let mut req = self.ws_url(query).into_client_request().unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", user.token).parse().unwrap(),
        );
        let (stream, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
        WsClient { stream }
    }
}

impl WsClient {
    pub async fn send_json(&mut self, v: Value) {
        self.stream
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("frame sent");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream
            .send(Message::Text(text.to_string().into()))
            .await
            .expect("frame sent");
    }

    /// Sends a chat message with an idempotency key.
    pub async fn say(&mut self, chat_id: i64, content: &str, key: &str) {
        self.send_json(json!({"chat_id": chat_id, "content": content, "client_msg_id": key}))
            .await
    }

    /// The next JSON frame (pings and pongs skipped); panics on close or timeout.
    pub async fn next_json(&mut self) -> Value {
        let next = tokio::time::timeout(DEADLINE, async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Text(t))) => {
                        return serde_json::from_str::<Value>(&t).expect("JSON frame");
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => panic!("expected a text frame, got {other:?}"),
                }
            }
        })
        .await;
        next.expect("a frame within the deadline")
    }

    /// The next frame of the given `type`, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let v = self.next_json().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Every frame up to and including the first that `last` accepts.
    pub async fn frames_until(&mut self, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = self.next_json().await;
            let done = last(&v);
            out.push(v);
            if done {
                return out;
            }
        }
    }

    /// Sends a `typing` frame.
    pub async fn typing(&mut self, chat_id: i64) {
        self.send_json(json!({"type": "typing", "chat_id": chat_id}))
            .await
    }

    /// Sends a `read` frame.
    pub async fn read(&mut self, chat_id: i64, up_to: i64) {
        self.send_json(json!({"type": "read", "chat_id": chat_id, "up_to": up_to}))
            .await
    }

    /// Collects `n` message frames, skipping acks.
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let v = self.next_json().await;
            if v["type"] == "message" {
                out.push(v);
            }
        }
        out
    }

    /// Reads (discarding data frames) until the server's close frame.
    pub async fn close_frame(&mut self) -> Option<CloseFrame> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("socket error before a close frame: {e}"),
                    None => return None,
                }
            }
        })
        .await
        .expect("closed within the deadline")
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// Waits for the async `cond` to hold, checking every 20 ms, up to the
/// deadline (for conditions that need a request or a scrape).
pub async fn eventually_async<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let start = std::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while !cond().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        poll.tick().await;
    }
}

/// Waits for `cond` to hold, checking every few milliseconds, up to the deadline.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(5));
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        poll.tick().await;
    }
}
