//! `GET /ws`: authenticates the upgrade request (no or bad token is 401
//! and no upgrade), sizes the socket's buffers, and hands the socket to
//! the WebSocket protocol ([`crate::ws::serve`]).

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{bearer, parse_id};
use crate::app::AppState;
use crate::ids::MessageId;

#[derive(Debug, Deserialize)]
pub struct WsParams {
    /// For browsers, which cannot set `Authorization` on an upgrade.
    access_token: Option<String>,
    /// Resume: replay every message with a greater id first.
    since: Option<String>,
}

pub async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<WsParams>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::InvalidRequest(format!("invalid query: {e}")))?;
    let token = match bearer(&headers) {
        Some(t) => t?,
        None => params
            .access_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::MissingToken)?,
    };
    let user = state.accounts.authenticate(token).await?;
    if state.hub.connections_of(user.id) >= state.settings.ws.max_connections_per_user {
        return Err(ApiError::TooManyConnections);
    }
    let since = match params.since.as_deref() {
        None => None,
        Some("0") => Some(MessageId(0)),
        Some(raw) => Some(MessageId(parse_id("since", raw)?)),
    };
    let ws = ws.map_err(|e| {
        ApiError::InvalidRequest(format!("this endpoint needs a WebSocket upgrade: {e}"))
    })?;
    let limits = &state.settings.ws;
    Ok(ws
        // Small buffers: an idle connection keeps its read buffer resident
        // (tungstenite zero-fills it before each read), and the defaults
        // are 128 KiB. 1 KiB holds a typical frame; larger frames are
        // reserved in full and read in 1 KiB steps.
        .read_buffer_size(1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| crate::ws::serve(socket, state, user, since))
        .into_response())
}
