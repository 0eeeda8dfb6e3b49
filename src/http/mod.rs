//! The HTTP surface: router, handlers, errors, extractors.

pub mod auth;
pub mod chats;
pub mod error;
pub mod extract;
pub mod health;
pub mod openapi;

use axum::Router;
use axum::extract::DefaultBodyLimit;
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
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
