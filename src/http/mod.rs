//! The HTTP surface: router, handlers, errors, extractors.

mod accounts;
pub mod budget;
mod chats;
pub mod error;
mod extract;
mod health;
mod openapi;
pub mod schema;
pub mod server;
mod stall;
mod web;
mod ws;

use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::Response;
use axum::routing::{get, patch, post};
use axum::{Router, middleware};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::telemetry;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The public router: API, WebSocket, probes, OpenAPI and (unless
/// disabled) metrics, with their middleware.
pub fn router(state: AppState) -> Router {
    let settings = &state.settings;
    let timeout = Duration::from_millis(settings.server.request_timeout_ms);
    // Request/response calls get a time limit; the WebSocket route does not.
    let api = Router::new()
        .route("/login", post(accounts::login))
        .route("/register", post(accounts::register))
        .route("/token/refresh", post(accounts::refresh))
        .route("/account/password", post(accounts::change_password))
        .route("/logout", post(accounts::logout))
        .route("/chats", get(chats::list).post(chats::create))
        .route("/chats/initiate", post(chats::initiate))
        .route("/chats/{chat_id}", get(chats::get).patch(chats::rename))
        .route("/chats/{chat_id}/messages", get(chats::history))
        .route("/chats/{chat_id}/members", post(chats::add_member))
        .route(
            "/chats/{chat_id}/members/{user_id}",
            patch(chats::set_role).delete(chats::remove_member),
        )
        .route("/chats/{chat_id}/read", post(chats::read))
        .route("/openapi.json", get(openapi::spec))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    error::ApiError::RequestTimeout
                }))
                .layer(tower::timeout::TimeoutLayer::new(timeout)),
        );
    let mut app = Router::new()
        .merge(api)
        .merge(ops_routes(settings.metrics.on_main_port))
        .route("/ws", get(ws::upgrade));
    if settings.web.enabled {
        app = app.merge(web::routes());
    }
    app = app
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(settings.server.max_body_bytes));
    if let Some(cors) = cors(&settings.server.cors_allowed_origins) {
        app = app.layer(cors);
    }
    with_observability(app).with_state(state)
}

/// Probes and metrics only, for `metrics.listen`.
pub fn ops_router(state: AppState) -> Router {
    with_observability(ops_routes(true)).with_state(state)
}

fn ops_routes(metrics: bool) -> Router<AppState> {
    let mut r = Router::new()
        .route("/healthz", get(health::live))
        .route("/livez", get(health::live))
        .route("/readyz", get(health::ready));
    if metrics {
        r = r.route("/metrics", get(health::metrics));
    }
    r
}

/// Request ids, request spans and HTTP metrics.
fn with_observability(router: Router<AppState>) -> Router<AppState> {
    router
        .layer(middleware::from_fn(telemetry::metrics::track_http))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(record_response),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
        ])
        .expose_headers([REQUEST_ID, axum::http::header::RETRY_AFTER]);
    Some(if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
        layer.allow_origin(AllowOrigin::list(list))
    })
}

/// The server span, named `"{METHOD} {route}"` with OpenTelemetry
/// semantic-convention attributes, continuing the caller's W3C
/// `traceparent`. It records the path, never the query string (which may
/// carry `access_token`).
fn request_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let method = req.method();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "http_request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        url.path = req.uri().path(),
        url.scheme = "http",
        network.protocol.version = ?req.version(),
        user_agent.original = req
            .headers()
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
        request_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    telemetry::continue_trace(&span, req.headers());
    span
}

fn record_response(res: &Response, latency: Duration, span: &tracing::Span) {
    let status = res.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    tracing::debug!(
        status = status.as_u16(),
        latency_ms = latency.as_millis() as u64,
        "response"
    );
}
