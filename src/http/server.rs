//! The accept loop. Plain `axum::serve` does not enforce hyper's header
//! read timeout, so connections are served with hyper-util directly.
//!
//! * Every connection must send its first byte within the header read
//!   timeout (hyper's own timer starts only after it) and its request
//!   headers within the same timeout after that: a connection that never
//!   speaks costs a socket for a bounded time.
//! * At most `max_connections` client connections are open per listener
//!   (HTTP connections here plus open WebSockets, which outlive their HTTP
//!   connection); one more is closed at once and counted.
//! * HTTP/1.1 always; cleartext HTTP/2 only when enabled, with keep-alive
//!   pings. WebSocket upgrades; graceful shutdown of in-flight requests.
//! * A connection whose writes make no progress for `write_timeout` (the
//!   client stopped reading) is closed, freeing what it held.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::stall::StallTimeout;
use crate::telemetry::metrics as m;
use crate::ws::hub::Hub;

/// How a listener serves its connections.
pub struct ServeOptions {
    /// Time to the first byte, and from it to the end of the request headers.
    pub header_read_timeout: Duration,
    /// Most open connections (HTTP here plus `websockets`).
    pub max_connections: usize,
    /// Serve cleartext HTTP/2 as well.
    pub http2: bool,
    /// A connection whose writes make no progress this long is closed.
    pub write_timeout: Duration,
    /// How long in-flight requests may take after `stop`.
    pub grace: Duration,
    /// Open WebSockets count against `max_connections` (main listener).
    pub websockets: Option<Arc<Hub>>,
}

/// HTTP/2 keep-alive: a ping this often, the connection closed when one is
/// not answered within the same time.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// Serves `router` on `listener` until `stop` is cancelled, then lets
/// in-flight requests finish (at most `options.grace`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    stop: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    if options.http2 {
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_timeout(H2_KEEPALIVE);
    } else {
        builder = builder.http1_only();
    }
    let open = Arc::new(AtomicUsize::new(0));

    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "accept_failed")
                        .increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let websockets = options
            .websockets
            .as_ref()
            .map_or(0, |hub| hub.connection_count() as usize);
        if open.load(Ordering::Relaxed) + websockets >= options.max_connections {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "max_connections").increment(1);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(req)
        });
        let guard = OpenGuard::new(&open);
        let deadline = options.header_read_timeout;
        let write_timeout = options.write_timeout;
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _guard = guard;
            if !first_byte_within(&stream, deadline).await {
                metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "silent").increment(1);
                return;
            }
            let conn = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(StallTimeout::new(stream, write_timeout)),
                    service,
                )
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(options.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight HTTP requests did not finish within the grace period");
    }
}

/// Waits until the peer sends something; false when it closes first or
/// stays silent past `deadline`.
async fn first_byte_within(stream: &TcpStream, deadline: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(deadline, stream.peek(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// Counts one open connection for as long as it lives.
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> OpenGuard {
        open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(open.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
