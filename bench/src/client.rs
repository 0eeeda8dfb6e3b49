//! Starting servers, reading their /proc figures, and a small HTTP client
//! (hyper, one keep-alive connection per worker) for setup and HTTP load.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use axum::body::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

pub const PASSWORD: &str = "bench-password-1234";

/// A server under test.
pub struct Server {
    /// Where setup and HTTP load go (the first node of a cluster).
    pub addr: String,
    /// Every node; a user's WebSocket goes to `nodes[user.id % nodes.len()]`,
    /// so the two users of a pair (consecutive ids) sit on different nodes.
    pub nodes: Vec<String>,
    pub baseline: bool,
    child: Option<tokio::process::Child>,
    dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub rss_now_kib: u64,
    pub rss_kib: u64,
    pub cpu_secs: f64,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Server {
    /// A running server, or a cluster given as comma-separated node URLs.
    pub fn external(urls: &str) -> Server {
        let nodes: Vec<String> = urls
            .split(',')
            .map(|u| {
                u.trim()
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string()
            })
            .filter(|u| !u.is_empty())
            .collect();
        Server {
            addr: nodes.first().cloned().unwrap_or_default(),
            nodes,
            baseline: false,
            child: None,
            dir: None,
        }
    }

    /// Starts shindensen on a fresh database, limits raised for load.
    pub async fn spawn(bin: Option<PathBuf>) -> anyhow::Result<Server> {
        let bin = match bin {
            Some(b) => b,
            None => std::env::current_exe()?
                .parent()
                .context("bench binary has a directory")?
                .join("shindensen"),
        };
        let dir = std::env::temp_dir().join(format!("shindensen-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let secret: String = (0..48)
            .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
            .collect();
        let child = tokio::process::Command::new(&bin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "DATABASE_URL",
                format!("sqlite:{}", dir.join("bench.db").display()),
            )
            .env("JWT_SECRET", secret)
            .env("SHINDENSEN_SERVER__LISTEN", &addr)
            .env("SHINDENSEN_LOG__LEVEL", "warn")
            .env("SHINDENSEN_LOG__FORMAT", "json")
            .env("SHINDENSEN_WS__SEND_RATE_PER_SEC", "1000000")
            .env("SHINDENSEN_WS__SEND_BURST", "1000000")
            // A client closed with 4008 resumes with `?since=`; above
            // saturation its backlog can exceed the default replay cap,
            // after which a real client pages the gap over HTTP. The relay
            // client resumes over the WebSocket only, and counts a `resync`
            // as an error.
            .env("SHINDENSEN_WS__REPLAY_MAX", "1000000")
            // The idle mode spreads its connections over 100 accounts.
            .env("SHINDENSEN_WS__MAX_CONNECTIONS_PER_USER", "1000000")
            .env("SHINDENSEN_AUTH__LOGIN_ATTEMPTS_PER_IP", "1000000")
            .env("SHINDENSEN_AUTH__LOGIN_ATTEMPTS_PER_USERNAME", "1000000")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let server = Server {
            nodes: vec![addr.clone()],
            addr,
            baseline: false,
            child: Some(child),
            dir: Some(dir),
        };
        server.wait_ready("/readyz").await?;
        Ok(server)
    }

    /// Starts the bare relay (this binary, `baseline-server`).
    pub async fn spawn_baseline() -> anyhow::Result<Server> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["baseline-server", "--listen", &addr])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let server = Server {
            nodes: vec![addr.clone()],
            addr,
            baseline: true,
            child: Some(child),
            dir: None,
        };
        server.wait_ready("/healthz").await?;
        Ok(server)
    }

    async fn wait_ready(&self, path: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut h) = Http::connect(&self.addr).await
                && let Ok((200, _)) = h.call("GET", path, None, None).await
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("server at {} did not become ready", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// RSS and CPU of a server this tool started (from /proc).
    pub fn usage(&self) -> Option<Usage> {
        let pid = self.child.as_ref()?.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(Usage {
            rss_now_kib: field("VmRSS:")?,
            rss_kib: field("VmHWM:")?,
            cpu_secs: ticks / 100.0,
        })
    }

    /// The directory of the database of a server this tool started.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.dir.as_deref()
    }

    /// The WebSocket URL of the node `user_id` connects to.
    pub fn ws_url(&self, user_id: i64) -> String {
        let node = &self.nodes[user_id.rem_euclid(self.nodes.len() as i64) as usize];
        format!("ws://{node}/ws")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.start_kill();
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The server's Prometheus text, or `None` when it cannot be read.
pub async fn scrape(server: &Server) -> Option<String> {
    match Http::connect(&server.addr)
        .await
        .ok()?
        .call("GET", "/metrics", None, None)
        .await
    {
        Ok((200, body)) => Some(String::from_utf8_lossy(&body).into_owned()),
        _ => None,
    }
}

/// The value of an unlabelled series in Prometheus text.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One keep-alive HTTP/1.1 connection.
pub struct Http {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Http {
    pub async fn connect(addr: &str) -> anyhow::Result<Http> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http {
            sender,
            host: addr.to_string(),
        })
    }

    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        self.sender.ready().await?;
        let res = self.sender.send_request(req.body(body)?).await?;
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    pub async fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> anyhow::Result<Value> {
        let (status, bytes) = self.call(method, path, body, token).await?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status >= 300 {
            bail!("{method} {path}: {status} {v}");
        }
        Ok(v)
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub token: Option<String>,
}

/// Logs in (registering) `n` users; for the baseline, synthetic ids 1..=n.
pub async fn users(server: &Server, n: usize) -> anyhow::Result<Vec<User>> {
    if server.baseline {
        return Ok((1..=n as i64).map(|id| User { id, token: None }).collect());
    }
    let mut out = Vec::with_capacity(n);
    let chunks: Vec<Vec<usize>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(8)
        .map(|c| c.to_vec())
        .collect();
    for chunk in chunks {
        let logins = chunk.into_iter().map(|i| async move {
            let mut h = Http::connect(&server.addr).await?;
            let v = h
                .json(
                    "POST",
                    "/login",
                    Some(&json!({"username": format!("bench{i}"), "password": PASSWORD})),
                    None,
                )
                .await?;
            Ok::<_, anyhow::Error>(User {
                id: v["user"]["id"].as_i64().ok_or_else(|| anyhow!("no id"))?,
                token: v["token"].as_str().map(String::from),
            })
        });
        for u in futures_util::future::join_all(logins).await {
            out.push(u?);
        }
    }
    Ok(out)
}

/// The chat of users `a` and `b` (baseline: chat `k` is users 2k-1 and 2k).
pub async fn chat(server: &Server, a: &User, b_index: usize, k: usize) -> anyhow::Result<i64> {
    if server.baseline {
        return Ok(k as i64 + 1);
    }
    let mut h = Http::connect(&server.addr).await?;
    let v = h
        .json(
            "POST",
            "/chats/initiate",
            Some(&json!({"target_username": format!("bench{b_index}")})),
            a.token.as_deref(),
        )
        .await?;
    v["chat_id"].as_i64().ok_or_else(|| anyhow!("no chat id"))
}

pub async fn connect(server: &Server, user: &User) -> anyhow::Result<Ws> {
    let url = if server.baseline {
        format!("{}?user={}", server.ws_url(user.id), user.id)
    } else {
        server.ws_url(user.id)
    };
    connect_url(&url, user).await
}

/// Opens a WebSocket to `url` (which may carry `?since=`) as `user`.
pub async fn connect_url(url: &str, user: &User) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request()?;
    if let Some(t) = &user.token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true).await?;
    Ok(ws)
}

/// Opens `n` connections spread over `users`, 64 at a time.
pub async fn open_idle(server: &Server, users: &[User], n: usize) -> anyhow::Result<Vec<Ws>> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let batch = (i..(i + 64).min(n)).map(|k| connect(server, &users[k % users.len()]));
        for ws in futures_util::future::join_all(batch).await {
            out.push(ws?);
        }
        i += 64;
    }
    Ok(out)
}

pub struct HttpResult {
    pub name: String,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// One request shape for the closed loop.
#[derive(Clone)]
struct Req {
    name: &'static str,
    method: &'static str,
    path: String,
    body: Option<Value>,
    token: Option<String>,
}

/// Closed-loop load on one request shape.
async fn closed_loop(
    server: &Server,
    req: Req,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<HttpResult> {
    let deadline = Instant::now() + duration;
    let workers = (0..concurrency).map(|_| {
        let Req {
            method,
            path,
            body,
            token,
            ..
        } = req.clone();
        let addr = server.addr.clone();
        tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut errors = 0u64;
            let mut h = Http::connect(&addr).await?;
            while Instant::now() < deadline {
                let t = Instant::now();
                match h.call(method, &path, body.as_ref(), token.as_deref()).await {
                    Ok((200, _)) => {
                        let _ = hist.record(t.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
            }
            Ok::<_, anyhow::Error>((hist, errors))
        })
    });
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for w in futures_util::future::join_all(workers).await {
        let (h, e) = w??;
        total.add(h)?;
        errors += e;
    }
    Ok(HttpResult {
        name: req.name.into(),
        per_sec: total.len() as f64 / duration.as_secs_f64(),
        p50_ms: total.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: total.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
    })
}

pub async fn http_load(
    server: &Server,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Vec<HttpResult>> {
    let u = users(server, 2).await?;
    let chat_id = chat(server, &u[0], 1, 0).await?;
    // 60 messages, so a history page holds 50.
    let mut ws = connect(server, &u[0]).await?;
    for i in 0..60 {
        let frame = json!({"chat_id": chat_id, "content": format!("history message {i} with some text in it")});
        ws.send(tokio_tungstenite::tungstenite::Message::Text(
            frame.to_string().into(),
        ))
        .await?;
    }
    let mut acks = 0;
    while acks < 60 {
        if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = ws.next().await
            && t.contains("\"ack\"")
        {
            acks += 1;
        }
    }
    let token = u[0].token.clone();
    let history = Req {
        name: "GET /chats/{id}/messages (50)",
        method: "GET",
        path: format!("/chats/{chat_id}/messages"),
        body: None,
        token: token.clone(),
    };
    let list = Req {
        name: "GET /chats",
        method: "GET",
        path: "/chats".into(),
        body: None,
        token,
    };
    let login = Req {
        name: "POST /login (argon2id)",
        method: "POST",
        path: "/login".into(),
        body: Some(json!({"username": "bench0", "password": PASSWORD})),
        token: None,
    };
    let mut out = vec![
        closed_loop(server, history, concurrency, duration).await?,
        closed_loop(server, list, concurrency, duration).await?,
        closed_loop(server, login, concurrency.min(8), duration).await?,
    ];
    // The argon2id cost on its own: one hash with the server's parameters, here.
    let hashes = 10;
    let t = Instant::now();
    for _ in 0..hashes {
        use argon2::password_hash::PasswordHasher as _;
        let _ = argon2::Argon2::default().hash_password(PASSWORD.as_bytes());
    }
    let per_hash = t.elapsed().as_secs_f64() * 1000.0 / hashes as f64;
    out.push(HttpResult {
        name: "argon2id hash alone (1 core)".into(),
        per_sec: 1000.0 / per_hash,
        p50_ms: per_hash,
        p99_ms: per_hash,
        errors: 0,
    });
    Ok(out)
}
