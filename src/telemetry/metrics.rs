//! Prometheus metrics: the recorder, the metric names, and the HTTP
//! middleware. Labels carry route templates, methods, statuses and reasons,
//! never a user, chat or message id.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_DURATION: &str = "http_server_request_duration_seconds";
pub const HTTP_ACTIVE: &str = "http_server_active_requests";
pub const WS_CONNECTIONS: &str = "shindensen_ws_connections";
pub const WS_OPENED: &str = "shindensen_ws_connections_opened_total";
pub const WS_CLOSED: &str = "shindensen_ws_connections_closed_total";
pub const CONNECTIONS_REFUSED: &str = "shindensen_connections_refused_total";
pub const CONNECTIONS_WRITE_TIMEOUT: &str = "shindensen_connections_write_timeout_total";
pub const MESSAGES_ACCEPTED: &str = "shindensen_messages_accepted_total";
pub const MESSAGES_DUPLICATE: &str = "shindensen_messages_duplicate_total";
pub const MESSAGES_REJECTED: &str = "shindensen_messages_rejected_total";
pub const MESSAGES_DELIVERED: &str = "shindensen_messages_delivered_total";
pub const DELIVERY_SECONDS: &str = "shindensen_message_delivery_seconds";
pub const DB_BATCH_SIZE: &str = "shindensen_db_write_batch_size";
pub const DB_COMMIT_SECONDS: &str = "shindensen_db_commit_duration_seconds";
pub const DB_CHECKPOINT_SECONDS: &str = "shindensen_db_checkpoint_duration_seconds";
pub const AUTH_FAILURES: &str = "shindensen_auth_failures_total";
pub const FANOUT_CONNECTIONS: &str = "shindensen_message_fanout_connections";
pub const MESSAGE_ENCODINGS: &str = "shindensen_message_encodings_total";
pub const SEQUENCER_POSITION: &str = "shindensen_stream_released_position";
pub const SEQUENCER_READ_BACK: &str = "shindensen_stream_read_back_total";
pub const SEQUENCER_READ_ERRORS: &str = "shindensen_stream_read_errors_total";
pub const DB_POOL_CONNECTIONS: &str = "shindensen_db_pool_connections";
pub const SEQUENCER_FROM_PEERS: &str = "shindensen_stream_from_peers_total";
pub const SEQUENCER_GAP_READS: &str = "shindensen_stream_gap_reads_total";
pub const NATS_CONNECTED: &str = "shindensen_cluster_nats_connected";
pub const NATS_PUBLISHED: &str = "shindensen_cluster_published_total";
pub const NATS_DROPPED: &str = "shindensen_cluster_publish_dropped_total";
pub const NATS_RECEIVED: &str = "shindensen_cluster_received_total";
pub const NATS_DECODE_ERRORS: &str = "shindensen_cluster_decode_errors_total";
pub const CHAT_EVENTS: &str = "shindensen_chat_events_total";
pub const EPHEMERAL_FRAMES: &str = "shindensen_ws_ephemeral_frames_total";
pub const TYPING_THROTTLED: &str = "shindensen_ws_typing_throttled_total";
pub const READ_MARKERS: &str = "shindensen_read_markers_moved_total";
pub const BUILD_INFO: &str = "shindensen_build_info";

/// OpenTelemetry semantic-convention buckets for HTTP server durations.
const HTTP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
const FAST_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
const FANOUT_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

struct Registry {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls reuse it).
pub fn install() -> &'static PrometheusHandle {
    &REGISTRY
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), HTTP_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(DELIVERY_SECONDS.into()), FAST_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(DB_COMMIT_SECONDS.into()), FAST_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(DB_CHECKPOINT_SECONDS.into()),
                        FAST_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(DB_BATCH_SIZE.into()), BATCH_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(FANOUT_CONNECTIONS.into()),
                        FANOUT_BUCKETS,
                    )
                })
                .expect("static bucket lists are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist in embedding programs; ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            let process = metrics_process::Collector::default();
            process.describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            // Unlabelled series exist from the start, so rates are 0, not absent.
            for name in [
                WS_OPENED,
                MESSAGES_ACCEPTED,
                MESSAGES_DUPLICATE,
                MESSAGES_DELIVERED,
                TYPING_THROTTLED,
                READ_MARKERS,
                MESSAGE_ENCODINGS,
            ] {
                counter!(name).absolute(0);
            }
            gauge!(WS_CONNECTIONS).set(0.0);
            Registry { handle, process }
        })
        .handle
}

/// The exposition text, with fresh process metrics.
pub fn render() -> String {
    let handle = install();
    if let Some(r) = REGISTRY.get() {
        r.process.collect();
    }
    handle.render()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Duration of HTTP server requests."
    );
    describe_gauge!(HTTP_ACTIVE, "HTTP server requests in flight.");
    describe_gauge!(WS_CONNECTIONS, "Open WebSocket connections.");
    describe_counter!(WS_OPENED, "WebSocket connections opened.");
    describe_counter!(WS_CLOSED, "WebSocket connections closed, by reason.");
    describe_counter!(
        CONNECTIONS_WRITE_TIMEOUT,
        "Client connections closed because their writes made no progress for server.write_timeout_ms."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Client connections closed before a request: max_connections, silent (no first byte in time), accept_failed."
    );
    describe_counter!(MESSAGES_ACCEPTED, "Messages committed to the database.");
    describe_counter!(
        MESSAGES_DUPLICATE,
        "Resends answered with the original ack."
    );
    describe_counter!(
        MESSAGES_REJECTED,
        "Sends refused with an error frame, by reason."
    );
    describe_counter!(
        MESSAGES_DELIVERED,
        "Message frames queued to recipient connections."
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        Unit::Seconds,
        "From COMMIT to enqueue on a recipient connection."
    );
    describe_histogram!(DB_BATCH_SIZE, "Messages per group commit.");
    describe_histogram!(
        DB_COMMIT_SECONDS,
        Unit::Seconds,
        "Duration of one group-commit transaction."
    );
    describe_histogram!(
        DB_CHECKPOINT_SECONDS,
        Unit::Seconds,
        "Duration of one WAL checkpoint (SQLite), by where it ran."
    );
    describe_counter!(AUTH_FAILURES, "Authentication failures, by reason.");
    describe_histogram!(
        FANOUT_CONNECTIONS,
        "Connections on this node one message was queued to."
    );
    describe_counter!(CHAT_EVENTS, "Timeline events committed, by kind.");
    describe_gauge!(
        SEQUENCER_POSITION,
        "PostgreSQL: the next stream position this node releases (every id below it is delivered)."
    );
    describe_counter!(
        SEQUENCER_READ_BACK,
        "PostgreSQL: messages this node read back from the database to deliver (other nodes' commits)."
    );
    describe_counter!(
        SEQUENCER_READ_ERRORS,
        "PostgreSQL: failed reads of committed messages (retried)."
    );
    describe_counter!(
        SEQUENCER_FROM_PEERS,
        "Cluster: messages this node delivered as other nodes announced them over NATS."
    );
    describe_counter!(
        SEQUENCER_GAP_READS,
        "Cluster: reads of positions missing from what NATS brought (lost or late announcements)."
    );
    describe_gauge!(
        NATS_CONNECTED,
        "Cluster: 1 while this node is connected to NATS, 0 while it falls back to polling the database."
    );
    describe_counter!(
        NATS_PUBLISHED,
        "Cluster: announcements published to NATS, by kind (commits, ephemeral)."
    );
    describe_counter!(
        NATS_DROPPED,
        "Cluster: announcements not published (NATS down or the queue full); other nodes read the database instead."
    );
    describe_counter!(
        NATS_RECEIVED,
        "Cluster: announcements received from other nodes, by kind."
    );
    describe_counter!(
        NATS_DECODE_ERRORS,
        "Cluster: announcements that could not be decoded (ignored)."
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "PostgreSQL: connections of each pool, by pool and state (idle, in_use)."
    );
    describe_counter!(
        MESSAGE_ENCODINGS,
        "Message frames encoded for fan-out (once per message, once more for the sender's own copy when it has a client_msg_id)."
    );
    describe_counter!(
        EPHEMERAL_FRAMES,
        "Typing and read frames queued to connections, by type."
    );
    describe_counter!(
        TYPING_THROTTLED,
        "Typing frames dropped by the per-user, per-chat interval."
    );
    describe_counter!(READ_MARKERS, "Read markers moved forward.");
    describe_gauge!(BUILD_INFO, "Build information; the value is always 1.");
}

/// Middleware: request duration by method, route template and status, and
/// requests in flight. Unmatched paths are labelled `unmatched`.
pub async fn track_http(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().as_str().to_string();
    let active = gauge!(HTTP_ACTIVE, "method" => method.clone());
    active.increment(1.0);
    let start = Instant::now();
    let res = next.run(req).await;
    active.decrement(1.0);
    histogram!(
        HTTP_DURATION,
        "method" => method,
        "route" => route,
        "status" => res.status().as_u16().to_string()
    )
    .record(start.elapsed().as_secs_f64());
    res
}

/// Counts an authentication failure.
pub fn auth_failure(reason: &'static str) {
    counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}
