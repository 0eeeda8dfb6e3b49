//! Application assembly: `build` opens the store and binds the listener
//! (port 0 in tests), `run` serves until the shutdown future resolves,
//! then shuts down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AuthMode, MIN_SECRET_BYTES, Settings};
use crate::domain::{Accounts, Chats, Notify};
use crate::store::{self, Store};
use crate::ws::Hub;

/// Shared state of every request and connection; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

pub struct AppInner {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub accounts: Accounts,
    pub chats: Chats,
    /// Open WebSocket connections, for fan-out.
    pub hub: Arc<Hub>,
    /// Cancelled the moment shutdown is requested: readiness fails.
    pub draining: CancellationToken,
    /// Cancelled after the drain delay: stop accepting, WebSockets close.
    pub shutdown: CancellationToken,
    /// Tracks WebSocket connections so shutdown can wait for them to flush.
    pub ws_tracker: TaskTracker,
    /// Bytes of large response bodies held for clients.
    pub responses: crate::http::budget::ResponseBudget,
}

impl Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    /// State around an open store whose committed messages go to `hub`.
    /// `notify` carries read and typing notices: the hub itself on one
    /// node, the hub and the other nodes in a cluster.
    pub fn new(
        settings: Settings,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        notify: Arc<dyn Notify>,
        secret: &SecretString,
    ) -> AppState {
        AppState(Arc::new(AppInner {
            accounts: Accounts::new(&settings.auth, secret, store.clone()),
            chats: Chats::new(
                store.clone(),
                notify,
                settings.chats.clone(),
                Duration::from_millis(settings.ws.typing_interval_ms),
            ),
            store,
            hub,
            draining: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            ws_tracker: TaskTracker::new(),
            responses: crate::http::budget::ResponseBudget::new(
                settings.server.inflight_response_bytes,
                Duration::from_millis(settings.server.request_timeout_ms / 2),
            ),
            settings,
        }))
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
        let (peers, notify) = connect_peers(&settings, &hub).await?;
        let store =
            store::open_with_peers(&settings.database, &settings.cluster, hub.clone(), peers)
                .await
                .context("opening the database")?;
        let secret = signing_secret(&settings, store.as_ref()).await?;
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| format!("binding server.listen = {}", settings.server.listen))?;
        let metrics_listener = match settings.metrics.listen {
            None => None,
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics.listen = {addr}"))?,
            ),
        };
        crate::telemetry::metrics::install();
        Ok(Application {
            listener,
            metrics_listener,
            state: AppState::new(settings, store, hub, notify, &secret),
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
        let options = |websockets| crate::http::server::ServeOptions {
            header_read_timeout: Duration::from_millis(settings.server.header_read_timeout_ms),
            max_connections: crate::limits::connection_cap(settings.server.max_connections),
            http2: settings.server.http2,
            write_timeout: Duration::from_millis(settings.server.write_timeout_ms),
            grace,
            websockets,
        };
        tracing::info!(addr = %self.local_addr(), "shindensen listening");
        let main = tokio::spawn(crate::http::server::serve(
            self.listener,
            crate::http::router(state.clone()),
            options(Some(state.hub.clone())),
            state.shutdown.clone(),
        ));
        let ops = self.metrics_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics and probes listening");
            }
            tokio::spawn(crate::http::server::serve(
                listener,
                crate::http::ops_router(state.clone()),
                options(None),
                state.shutdown.clone(),
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

/// The configured secret, or the one the store keeps (SQLite: next to the
/// database file, created on first start).
/// With `cluster.nats_url`: the link to the other nodes for the store,
/// and a notifier that reaches them too.
async fn connect_peers(
    settings: &Settings,
    hub: &Arc<Hub>,
) -> anyhow::Result<(Option<store::Peers>, Arc<dyn Notify>)> {
    let local: Arc<dyn Notify> = hub.clone();
    if settings.cluster.nats_url.is_none() {
        return Ok((None, local));
    }
    #[cfg(feature = "postgres")]
    {
        let node = format!("{}@{}", std::process::id(), settings.server.listen);
        let (cluster, peers, feed) = crate::cluster::Cluster::connect(&settings.cluster, &node)
            .await
            .context("connecting to NATS")?;
        feed.deliver_to(local.clone());
        Ok((Some(peers), cluster.notify(local)))
    }
    #[cfg(not(feature = "postgres"))]
    anyhow::bail!("cluster.nats_url: this build has no PostgreSQL backend")
}

async fn signing_secret(settings: &Settings, store: &dyn Store) -> anyhow::Result<SecretString> {
    if settings.auth.mode == AuthMode::Open {
        tracing::warn!(
            "auth.mode = open: anyone can log in as anyone with a username alone. Use only for local development"
        );
    }
    if let Some(secret) = &settings.auth.jwt_secret {
        if secret.expose_secret().len() < MIN_SECRET_BYTES {
            // validate() refuses this outside open mode.
            tracing::warn!(
                "auth.jwt_secret is shorter than {MIN_SECRET_BYTES} bytes; accepted only because auth.mode = open"
            );
        }
        return Ok(secret.clone());
    }
    match store.kept_signing_secret().await? {
        Some(kept) => {
            tracing::info!(path = %kept.location, "using the signing secret kept next to the database");
            Ok(kept.secret)
        }
        None => anyhow::bail!(
            "auth.jwt_secret (JWT_SECRET) must be set: the {} database keeps no signing secret. \
             Generate one with `openssl rand -base64 48` and give every node the same value",
            store.describe()
        ),
    }
}
