//! Application assembly: `build` opens the store and binds the listener
//! (port 0 in tests), `run` serves until the shutdown future resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{JwtKeys, PasswordHasher, jwt};
use crate::config::{AuthMode, MIN_SECRET_BYTES, Settings};
use crate::ratelimit::KeyedLimiter;
use crate::store::Store;
use crate::ws::Hub;

/// Shared state of every request and connection; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

pub struct AppInner {
    pub settings: Settings,
    pub store: Store,
    pub jwt: JwtKeys,
    pub hasher: PasswordHasher,
    pub login_ip: KeyedLimiter<std::net::IpAddr>,
    pub login_user: KeyedLimiter<String>,
    /// Open WebSocket connections, for fan-out.
    pub hub: Arc<Hub>,
    /// Cancelled the moment shutdown is requested: readiness fails.
    pub draining: CancellationToken,
    /// Cancelled after the drain delay: stop accepting, WebSockets close.
    pub shutdown: CancellationToken,
    /// Tracks WebSocket connections so shutdown can wait for them to flush.
    pub ws_tracker: TaskTracker,
}

impl Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

pub struct Application {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: AppState,
}

impl Application {
    /// Opens the database (applying migrations), resolves the signing
    /// secret and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        settings.validate()?;
        let hub = Arc::new(Hub::new());
        let store = Store::open(&settings.database, hub.clone())
            .await
            .context("opening the database")?;
        let secret = signing_secret(&settings, store.path())?;
        let window = Duration::from_secs(settings.auth.login_window_secs);
        let listener = TcpListener::bind(&settings.server.listen)
            .await
            .with_context(|| format!("binding server.listen = {}", settings.server.listen))?;
        let metrics_listener = match settings.metrics.listen.as_str() {
            "" => None,
            addr => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics.listen = {addr}"))?,
            ),
        };
        crate::telemetry::metrics::install();
        let hash_concurrency = std::thread::available_parallelism().map_or(2, |n| n.get());
        let state = AppState(Arc::new(AppInner {
            jwt: JwtKeys::new(&secret, settings.auth.token_ttl_secs),
            hasher: PasswordHasher::new(hash_concurrency),
            login_ip: KeyedLimiter::new(settings.auth.login_attempts_per_ip, window),
            login_user: KeyedLimiter::new(settings.auth.login_attempts_per_username, window),
            store,
            hub,
            draining: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            ws_tracker: TaskTracker::new(),
            settings,
        }));
        Ok(Application {
            listener,
            metrics_listener,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Address of the separate metrics listener, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then shuts down in order:
    /// readiness fails at once; after `shutdown.drain_delay_ms` the
    /// listeners stop accepting and WebSockets stop reading, commit and ack
    /// what they received and close with 1001; in-flight HTTP requests
    /// finish; the writer commits everything queued; the database closes.
    /// All of it within `shutdown.grace_period_ms`.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let settings = &state.settings;
        let grace = Duration::from_millis(settings.shutdown.grace_period_ms);
        let header_timeout = Duration::from_millis(settings.server.header_read_timeout_ms);
        tracing::info!(addr = %self.local_addr(), "shindensen listening");
        let main = tokio::spawn(crate::http::server::serve(
            self.listener,
            crate::http::router(state.clone()),
            header_timeout,
            state.shutdown.clone(),
            grace,
        ));
        let ops = self.metrics_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics and probes listening");
            }
            tokio::spawn(crate::http::server::serve(
                listener,
                crate::http::ops_router(state.clone()),
                header_timeout,
                state.shutdown.clone(),
                grace,
            ))
        });

        shutdown.await;
        let started = tokio::time::Instant::now();
        tracing::info!("shutdown requested: readiness now fails");
        state.draining.cancel();
        let drain = Duration::from_millis(settings.shutdown.drain_delay_ms).min(grace / 2);
        tokio::time::sleep(drain).await;
        state.shutdown.cancel();

        let deadline = started + grace;
        let stopped = tokio::time::timeout_at(deadline, async {
            let _ = main.await;
            if let Some(ops) = ops {
                let _ = ops.await;
            }
            // WebSocket connections saw the cancellation: they stop reading,
            // let what they received commit, send the acks and close.
            state.ws_tracker.close();
            state.ws_tracker.wait().await;
        })
        .await;
        if stopped.is_err() {
            tracing::warn!("connections did not close within the grace period");
        }
        // Everything queued for the writer commits before it stops.
        if tokio::time::timeout_at(deadline + Duration::from_secs(5), state.store.close())
            .await
            .is_err()
        {
            tracing::error!("the database writer did not stop in time");
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// The configured secret, or the one kept next to the database (created on
/// first start).
fn signing_secret(settings: &Settings, db_path: &Path) -> anyhow::Result<SecretString> {
    if let Some(secret) = &settings.auth.jwt_secret {
        if secret.expose_secret().len() < MIN_SECRET_BYTES {
            // validate() refuses this outside open mode.
            tracing::warn!(
                "auth.jwt_secret is shorter than {MIN_SECRET_BYTES} bytes; accepted only because auth.mode = open"
            );
        }
        return Ok(secret.clone());
    }
    let path = secret_path(db_path);
    let secret = jwt::load_or_create_secret(&path).with_context(|| {
        format!(
            "reading or creating the signing secret at {}",
            path.display()
        )
    })?;
    tracing::info!(path = %path.display(), "using the signing secret kept next to the database");
    if settings.auth.mode == AuthMode::Open {
        tracing::warn!(
            "auth.mode = open: anyone can log in as anyone with a username alone. Use only for local development"
        );
    }
    Ok(secret)
}

/// `<database file>.jwt-secret`.
pub fn secret_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(".jwt-secret");
    PathBuf::from(name)
}
