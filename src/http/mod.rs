//! The HTTP surface: router, handlers, errors, extractors.

pub mod auth;
pub mod chats;
pub mod error;
pub mod extract;
pub mod health;
pub mod openapi;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::routing::{get, post};
use tower_http::trace::TraceLayer;

use crate::app::AppState;

/// The application's routes with their middleware.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.server.max_body_bytes;
    Router::new()
        .route("/login", post(auth::login))
        .route("/register", post(auth::register))
        .route("/chats", get(chats::list))
        .route("/chats/initiate", post(chats::initiate))
        .route("/chats/{chat_id}/messages", get(chats::history))
        .route("/healthz", get(health::live))
        .route("/livez", get(health::live))
        .route("/readyz", get(health::ready))
        .route("/openapi.json", get(openapi::spec))
        .route("/ws", get(crate::ws::upgrade))
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// The request span records the route template and the path, never the
/// query string (which may carry `access_token`).
fn request_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    tracing::info_span!(
        "request",
        method = %req.method(),
        route,
        path = req.uri().path(),
    )
}
