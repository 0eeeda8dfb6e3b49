//! Settings and their layered loading.
//!
//! Layers, later ones win:
//! 1. built-in defaults ([`Settings::default`]);
//! 2. an optional TOML file (`--config PATH` or `SHINDENSEN_CONFIG`);
//! 3. `SHINDENSEN_SECTION__KEY` environment variables (e.g. `SHINDENSEN_SERVER__LISTEN`);
//! 4. the seed's `DATABASE_URL` and `JWT_SECRET`.
//!
//! Everything is validated once, at start-up, and every error names the key
//! and says how to fix it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "SHINDENSEN_";
/// Environment variable naming the optional config file.
pub const ENV_CONFIG_FILE: &str = "SHINDENSEN_CONFIG";
/// Minimum length of the JWT signing secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub ws: WsSettings,
    pub chats: ChatSettings,
    pub cluster: ClusterSettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    pub tracing: TracingSettings,
    pub shutdown: ShutdownSettings,
    pub web: WebSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSettings {
    /// Serve the embedded browser client (`web/`) at `GET /`.
    pub enabled: bool,
}

impl Default for WebSettings {
    fn default() -> Self {
        Self { enabled: true }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Serve `GET /metrics` on the public listener.
    pub on_main_port: bool,
    /// Also serve `/metrics` (and the probes) on this address; empty: no extra listener.
    #[serde(with = "optional_addr")]
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            on_main_port: true,
            listen: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingSettings {
    /// OTLP/HTTP (protobuf) endpoint, e.g. `http://collector:4318`. Empty:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// if set, else tracing export is off.
    pub otlp_endpoint: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// After SIGTERM, keep serving (readiness already failing) this long so
    /// load balancers stop sending traffic, in milliseconds.
    pub drain_delay_ms: u64,
    /// The most a shutdown may take in all; then the process exits anyway.
    pub grace_period_ms: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            drain_delay_ms: 0,
            grace_period_ms: 20_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address of the public listener (HTTP API, WebSocket, probes, metrics).
    #[serde(with = "addr")]
    pub listen: SocketAddr,
    /// Largest accepted HTTP request body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Time limit for one HTTP request (not WebSocket sessions), in milliseconds.
    pub request_timeout_ms: u64,
    /// A client must send its request headers within this time, in
    /// milliseconds, counted from the moment the connection is accepted
    /// (a connection that sends nothing is closed after it).
    pub header_read_timeout_ms: u64,
    /// Origins allowed by CORS (`["*"]` for any); empty: no CORS headers.
    pub cors_allowed_origins: Vec<String>,
    /// Most open client connections (HTTP and WebSocket) per listener; one
    /// more is closed at once. Lowered at start to what the open-files
    /// limit allows.
    pub max_connections: usize,
    /// Bytes of large response bodies (history pages over 64 KiB) held for
    /// clients at once; a page that finds none free within half the
    /// request timeout is 429 `rate_limited`.
    pub inflight_response_bytes: usize,
    /// A connection whose writes make no progress for this long (the
    /// client stopped reading) is closed, in milliseconds.
    pub write_timeout_ms: u64,
    /// Serve cleartext HTTP/2 (prior knowledge) beside HTTP/1.1. Off: a
    /// proxy in front speaks HTTP/2 to clients and HTTP/1.1 to us.
    pub http2: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3000)),
            max_body_bytes: 64 * 1024,
            request_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            cors_allowed_origins: Vec::new(),
            max_connections: 50_000,
            write_timeout_ms: 30_000,
            inflight_response_bytes: 64 * 1024 * 1024,
            http2: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Off,
    Normal,
    Full,
    Extra,
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite:PATH`, `sqlite://PATH` or a plain file path; or
    /// `postgres://user:password@host:port/database` (`postgresql://` too).
    #[serde(serialize_with = "redact_url_password")]
    pub url: String,
    /// SQLite `synchronous` pragma. `full` (default) makes an ack survive power loss.
    pub synchronous: Synchronous,
    /// How long a connection waits for a lock before failing, in milliseconds.
    pub busy_timeout_ms: u64,
    /// Connections in the read-only pool (history, chat list, login look-ups).
    pub read_pool_size: u32,
    /// PostgreSQL: how long to wait for a connection before the call fails
    /// (and, at start, before giving up), in milliseconds.
    pub connect_timeout_ms: u64,
    /// Most message inserts committed in one transaction by the writer.
    pub write_batch_max: usize,
    /// Capacity of the writer's request queue; senders wait when it is full.
    pub write_queue: usize,
    /// SQLite: new WAL frames (pages) after which the checkpointer thread
    /// copies the WAL into the database file. From four times this the
    /// writer finishes the checkpoint itself so the WAL starts over (its
    /// file stays below 8 × 4,000 frames × 4 KiB ≈ 128 MiB, and near
    /// 64 MiB under load).
    pub wal_checkpoint_frames: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "sqlite:shindensen.db".into(),
            synchronous: Synchronous::Full,
            busy_timeout_ms: 5_000,
            read_pool_size: 4,
            connect_timeout_ms: 5_000,
            write_batch_max: 2_048,
            write_queue: 16_384,
            wal_checkpoint_frames: 4_000,
        }
    }
}

impl DatabaseSettings {
    pub fn backend(&self) -> Backend {
        let url = self.url.trim_start();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

/// Several processes on one PostgreSQL database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// How often a node reads the messages other nodes committed when
    /// nothing else told it of them (no NATS, or NATS quiet or down), in
    /// milliseconds: the bound on cross-node delay without NATS.
    pub poll_interval_ms: u64,
    /// NATS server(s) for cross-node fan-out (`nats://host:4222`, several
    /// comma-separated); PostgreSQL only. Unset: nodes find each other's
    /// messages by polling the database.
    #[serde(
        serialize_with = "redact_optional_url",
        skip_serializing_if = "Option::is_none"
    )]
    pub nats_url: Option<String>,
    /// Subject prefix, so several deployments can share one NATS.
    pub nats_subject: String,
    /// How long a node waits for a position missing from what NATS
    /// brought before it reads it from the database, in milliseconds.
    pub gap_wait_ms: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            poll_interval_ms: 200,
            nats_url: None,
            nats_subject: "shindensen".into(),
            gap_wait_ms: 50,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every login needs the password.
    Password,
    /// The seed's behaviour: the username alone logs in. Development only.
    Open,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// HS256 signing secret, at least 32 bytes. Unset: generated on first
    /// start and kept next to the database file.
    #[serde(serialize_with = "redact")]
    pub jwt_secret: Option<SecretString>,
    /// Token lifetime, in seconds.
    pub token_ttl_secs: u64,
    /// `POST /login` with an unknown username creates the account.
    pub auto_register: bool,
    /// Login attempts allowed per client address per window (token bucket).
    pub login_attempts_per_ip: u32,
    /// Login attempts allowed per username per window (token bucket).
    pub login_attempts_per_username: u32,
    /// The window, in seconds, over which the attempt budgets refill.
    pub login_window_secs: u64,
    /// Accounts created per client address per registration window
    /// (`/register` and `/login`'s auto-registration); 0: no limit. Off by
    /// default: behind a proxy every client has the proxy's address.
    pub registrations_per_ip: u32,
    /// The window, in seconds, of `registrations_per_ip`.
    pub registration_window_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::Password,
            jwt_secret: None,
            token_ttl_secs: 24 * 3600,
            auto_register: true,
            login_attempts_per_ip: 30,
            login_attempts_per_username: 10,
            login_window_secs: 60,
            registrations_per_ip: 0,
            registration_window_secs: 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WsSettings {
    /// Largest inbound WebSocket frame/message, in bytes; larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Longest message content, in characters.
    pub max_content_chars: usize,
    /// Sends allowed per second per connection (token bucket refill rate).
    pub send_rate_per_sec: f64,
    /// Burst of sends allowed per connection (token bucket capacity).
    pub send_burst: u32,
    /// Frames queued for one connection before it is closed with 4008.
    pub outbound_queue: usize,
    /// Interval between server pings, in milliseconds.
    pub ping_interval_ms: u64,
    /// A connection that sends nothing (not even a pong) for this long is closed, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Most messages replayed on `?since=` before `{"type":"resync"}`.
    pub replay_max: u32,
    /// At most one typing notice per user and chat is forwarded in this interval.
    /// Open WebSocket connections per account (per node); one more is
    /// refused with 429 `too_many_connections`.
    pub max_connections_per_user: usize,
    pub typing_interval_ms: u64,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_content_chars: 4_000,
            send_rate_per_sec: 50.0,
            send_burst: 100,
            outbound_queue: 1_024,
            ping_interval_ms: 20_000,
            idle_timeout_ms: 60_000,
            replay_max: 1_000,
            typing_interval_ms: 2_000,
            max_connections_per_user: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatSettings {
    /// Most members of a group, its creator included.
    pub max_members: usize,
    /// Longest group title, in characters.
    pub max_title_chars: usize,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            max_members: 1_000,
            max_title_chars: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal (containers), pretty otherwise.
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` filter directive; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:[redacted]@host/db`.
fn redact_url_password<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redacted_url(url))
}

fn redact_optional_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.serialize_str(&redacted_url(url)),
        None => s.serialize_none(),
    }
}

/// The URL with any password replaced, for logs and `shindensen config`.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:[redacted]@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn redact<S: Serializer>(value: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

/// A configuration error, already phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Loads the layers from the process environment (see the module docs).
    pub fn load(config_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_from(config_file, &env)
    }

    /// Loads the layers with `env` standing for the process environment.
    pub fn load_from(
        config_file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let defaults = config::Config::try_from(&Settings::default())
            .map_err(|e| ConfigError(format!("built-in defaults: {e}")))?;
        let mut builder = config::Config::builder().add_source(defaults);

        let file: Option<PathBuf> = config_file
            .map(Path::to_path_buf)
            .or_else(|| env.get(ENV_CONFIG_FILE).map(PathBuf::from));
        if let Some(path) = &file {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist (given by --config or {ENV_CONFIG_FILE})",
                    path.display()
                )));
            }
            builder = builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }

        // Only SHINDENSEN_SECTION__KEY is configuration (see `is_setting_var`).
        let overrides: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| is_setting_var(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("SHINDENSEN")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("server.cors_allowed_origins")
                .source(Some(overrides)),
        );

        // The seed's variables come last.
        if let Some(url) = env.get("DATABASE_URL").filter(|v| !v.is_empty()) {
            builder = builder
                .set_override("database.url", url.as_str())
                .map_err(|e| ConfigError(e.to_string()))?;
        }
        if let Some(secret) = env.get("JWT_SECRET").filter(|v| !v.is_empty()) {
            builder = builder
                .set_override("auth.jwt_secret", secret.as_str())
                .map_err(|e| ConfigError(e.to_string()))?;
        }

        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(describe(e)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that types alone cannot. Every message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.server.max_body_bytes < 1024 {
            return fail("server.max_body_bytes", "must be at least 1024");
        }
        if self.server.request_timeout_ms == 0 || self.server.header_read_timeout_ms == 0 {
            return fail(
                "server.request_timeout_ms / server.header_read_timeout_ms",
                "must be greater than 0",
            );
        }
        if self.server.inflight_response_bytes < 1024 * 1024 {
            return fail(
                "server.inflight_response_bytes",
                "must be at least 1048576 (1 MiB)",
            );
        }
        if self.server.write_timeout_ms == 0 {
            return fail("server.write_timeout_ms", "must be greater than 0");
        }
        if self.server.max_connections == 0 {
            return fail("server.max_connections", "must be greater than 0");
        }
        for origin in &self.server.cors_allowed_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return fail(
                    "server.cors_allowed_origins",
                    "entries must be origins such as https://app.example.com, or \"*\"",
                );
            }
        }
        if self.shutdown.grace_period_ms < 1_000 {
            return fail("shutdown.grace_period_ms", "must be at least 1000");
        }
        if self.database.url.trim().is_empty() {
            return fail(
                "database.url (DATABASE_URL)",
                "must name a SQLite file (sqlite:shindensen.db) or a PostgreSQL database (postgres://user:password@host/db)",
            );
        }
        if self.database.backend() == Backend::Sqlite
            && (self.database.url.contains(":memory:") || self.database.url.contains("mode=memory"))
        {
            return fail(
                "database.url (DATABASE_URL)",
                "in-memory databases are not supported (the writer and the read pool must share one file); name a file",
            );
        }
        if self.database.read_pool_size == 0 {
            return fail("database.read_pool_size", "must be at least 1");
        }
        if self.database.write_batch_max == 0
            || self.database.write_queue == 0
            || self.database.wal_checkpoint_frames == 0
        {
            return fail(
                "database.write_batch_max / database.write_queue / database.wal_checkpoint_frames",
                "must be at least 1",
            );
        }
        if self.auth.token_ttl_secs < 60 {
            return fail("auth.token_ttl_secs", "must be at least 60 seconds");
        }
        if self.auth.login_window_secs == 0
            || self.auth.login_attempts_per_ip == 0
            || self.auth.login_attempts_per_username == 0
        {
            return fail(
                "auth.login_*",
                "login_attempts_per_ip, login_attempts_per_username and login_window_secs must be at least 1",
            );
        }
        if self.auth.registration_window_secs == 0 {
            return fail("auth.registration_window_secs", "must be at least 1");
        }
        if let Some(secret) = &self.auth.jwt_secret {
            let len = secret.expose_secret().len();
            if len < MIN_SECRET_BYTES && self.auth.mode == AuthMode::Password {
                return fail(
                    "auth.jwt_secret (JWT_SECRET)",
                    &format!(
                        "is {len} bytes; it must be at least {MIN_SECRET_BYTES}. Generate one with \
                         `openssl rand -base64 48`, or unset it to have shindensen generate and keep one \
                         next to the database"
                    ),
                );
            }
        }
        if self.ws.max_frame_bytes < 1024 {
            return fail("ws.max_frame_bytes", "must be at least 1024");
        }
        if self.ws.max_content_chars == 0 {
            return fail("ws.max_content_chars", "must be at least 1");
        }
        if self.ws.send_rate_per_sec.is_nan()
            || self.ws.send_rate_per_sec <= 0.0
            || self.ws.send_burst == 0
        {
            return fail(
                "ws.send_rate_per_sec / ws.send_burst",
                "must be greater than 0",
            );
        }
        if self.cluster.poll_interval_ms == 0 {
            return fail("cluster.poll_interval_ms", "must be at least 1");
        }
        if self.cluster.gap_wait_ms == 0 {
            return fail("cluster.gap_wait_ms", "must be at least 1");
        }
        if self.cluster.nats_url.is_some() && self.database.backend() != Backend::Postgres {
            return fail(
                "cluster.nats_url",
                "needs a PostgreSQL database.url: one SQLite file serves one node",
            );
        }
        if self.cluster.nats_subject.is_empty()
            || !self
                .cluster
                .nats_subject
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return fail(
                "cluster.nats_subject",
                "must be a NATS subject token (letters, digits, _ - .)",
            );
        }
        if self.database.connect_timeout_ms == 0 {
            return fail("database.connect_timeout_ms", "must be at least 1");
        }
        if self.ws.max_connections_per_user == 0 {
            return fail("ws.max_connections_per_user", "must be at least 1");
        }
        if self.ws.typing_interval_ms == 0 {
            return fail("ws.typing_interval_ms", "must be at least 1");
        }
        if self.chats.max_members < 2 {
            return fail("chats.max_members", "must be at least 2");
        }
        if self.chats.max_title_chars == 0 {
            return fail("chats.max_title_chars", "must be at least 1");
        }
        if self.ws.outbound_queue == 0 {
            return fail("ws.outbound_queue", "must be at least 1");
        }
        if self.ws.ping_interval_ms == 0 || self.ws.idle_timeout_ms <= self.ws.ping_interval_ms {
            return fail(
                "ws.idle_timeout_ms",
                "must be greater than ws.ping_interval_ms (and both greater than 0)",
            );
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted (`shindensen config`).
    pub fn redacted_toml(&self) -> String {
        // Plain data with string keys; the secret is redacted by `redact`.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

/// Socket addresses are written as strings (`0.0.0.0:3000`) and parsed
/// once, at load.
mod addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(addr)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let raw = String::deserialize(d)?;
        parse(&raw).map_err(serde::de::Error::custom)
    }

    pub fn parse(raw: &str) -> Result<SocketAddr, String> {
        raw.trim()
            .parse()
            .map_err(|_| format!("{raw:?} is not an IP address and port such as 0.0.0.0:3000"))
    }
}

/// An optional socket address: empty means none.
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let raw = String::deserialize(d)?;
        if raw.trim().is_empty() {
            return Ok(None);
        }
        super::addr::parse(&raw)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// Whether an environment variable is a setting: `SHINDENSEN_<SECTION>__<KEY>`,
/// both parts non-empty. Other variables with the prefix are someone else's
/// (Kubernetes service links such as `SHINDENSEN_PORT_80_TCP_ADDR`, a
/// wrapper's `SHINDENSEN_BIN`) and are ignored; `SHINDENSEN_CONFIG` names
/// the file. A variable in the `__` form with an unknown section or key still
/// stops start-up.
pub fn is_setting_var(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX)
        .and_then(|rest| rest.split_once("__"))
        .is_some_and(|(section, key)| !section.is_empty() && !key.is_empty())
}

/// The variables with the `SHINDENSEN_` prefix that are not settings and so
/// were ignored (logged at debug level once logging is up).
pub fn ignored_env_vars(env: &HashMap<String, String>) -> Vec<String> {
    let mut ignored: Vec<String> = env
        .keys()
        .filter(|k| k.starts_with(ENV_PREFIX) && k.as_str() != ENV_CONFIG_FILE)
        .filter(|k| !is_setting_var(k))
        .cloned()
        .collect();
    ignored.sort();
    ignored
}

/// Rephrases the `config` crate's errors so they name the key plainly.
fn describe(err: config::ConfigError) -> String {
    let text = err.to_string();
    if text.contains("unknown field") {
        format!(
            "{text}. Check the key's spelling; environment variables take the form \
             SHINDENSEN_SECTION__KEY, e.g. SHINDENSEN_SERVER__LISTEN"
        )
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_serve_on_port_3000_with_a_local_database() {
        let s = Settings::load_from(None, &env(&[])).unwrap();
        assert_eq!(s.server.listen, "0.0.0.0:3000".parse().unwrap());
        assert_eq!(s.database.url, "sqlite:shindensen.db");
        assert_eq!(s.database.synchronous, Synchronous::Full);
    }

    #[test]
    fn env_overrides_file_and_seed_variables_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:1\"\n[database]\nurl = \"sqlite:file.db\"\nread_pool_size = 7\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&file),
            &env(&[
                ("SHINDENSEN_SERVER__LISTEN", "127.0.0.1:2"),
                ("SHINDENSEN_DATABASE__URL", "sqlite:env.db"),
                ("DATABASE_URL", "sqlite:seed.db"),
                ("SHINDENSEN_CONFIG", "ignored-because-flag-wins"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(s.database.url, "sqlite:seed.db");
        assert_eq!(s.database.read_pool_size, 7);
    }

    #[test]
    fn variables_not_of_the_section_key_form_are_not_settings() {
        // Kubernetes service links for a Service named `shindensen`, and
        // other tools' variables that share the prefix.
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
            ("SHINDENSEN_SERVER__LISTEN", "127.0.0.1:7"),
        ];
        let s = Settings::load_from(None, &env(&links)).unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:7".parse().unwrap());
        let ignored = ignored_env_vars(&env(&links));
        assert_eq!(ignored.len(), 9, "{ignored:?}");
        assert!(!ignored.contains(&"SHINDENSEN_SERVER__LISTEN".to_string()));
        for bad in ["SHINDENSEN___X", "SHINDENSEN_SERVER__", "SHINDENSEN__KEY"] {
            assert!(!is_setting_var(bad), "{bad}");
        }
        // The `__` form with an unknown section still stops start-up.
        let err =
            Settings::load_from(None, &env(&[("SHINDENSEN_SERVR__LISTEN", "x")])).unwrap_err();
        assert!(err.to_string().contains("servr"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err =
            Settings::load_from(None, &env(&[("SHINDENSEN_SERVER__LISTEN", "nope")])).unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");

        let err =
            Settings::load_from(None, &env(&[("SHINDENSEN_SERVER__LISTN", "x")])).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");

        let err = Settings::load_from(None, &env(&[("JWT_SECRET", "supersecret")])).unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"), "{err}");
        assert!(err.to_string().contains("at least 32"), "{err}");
    }

    #[test]
    fn database_urls_pick_the_backend_and_passwords_are_never_printed() {
        let s = Settings::load_from(
            None,
            &env(&[(
                "DATABASE_URL",
                "postgres://shindensen:hunter22@db.internal:5432/chat?sslmode=require",
            )]),
        )
        .unwrap();
        assert_eq!(s.database.backend(), Backend::Postgres);
        let out = s.redacted_toml();
        assert!(!out.contains("hunter22"), "{out}");
        assert!(
            out.contains("postgres://shindensen:[redacted]@db.internal:5432/chat?sslmode=require")
        );
        assert_eq!(redacted_url("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redacted_url("sqlite:a.db"), "sqlite:a.db");
        let s = Settings::load_from(None, &env(&[])).unwrap();
        assert_eq!(s.database.backend(), Backend::Sqlite);
    }

    #[test]
    fn short_secret_is_allowed_in_open_mode() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("JWT_SECRET", "supersecret"),
                ("SHINDENSEN_AUTH__MODE", "open"),
            ]),
        )
        .unwrap();
        assert_eq!(s.auth.mode, AuthMode::Open);
    }

    #[test]
    fn printed_config_redacts_the_secret() {
        let secret = "x".repeat(40);
        let s = Settings::load_from(None, &env(&[("JWT_SECRET", &secret)])).unwrap();
        let out = s.redacted_toml();
        assert!(out.contains("[redacted]"));
        assert!(!out.contains(&secret));
        // The printed configuration is itself a valid config file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("printed.toml");
        std::fs::write(
            &file,
            out.replace("\"[redacted]\"", &format!("\"{secret}\"")),
        )
        .unwrap();
        let again = Settings::load_from(Some(&file), &env(&[])).unwrap();
        assert_eq!(again.redacted_toml(), out);
    }
}
