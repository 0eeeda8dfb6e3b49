//! `POST /login` and `POST /register` (the rules: `domain::accounts`).

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::AppJson;
use super::schema::LoginResponse;
use crate::app::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    #[schema(example = "alice")]
    pub username: String,
    /// Required in `password` mode; optional in `open` mode.
    #[serde(default)]
    #[schema(example = "correct horse battery staple")]
    pub password: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterRequest {
    #[schema(example = "alice")]
    pub username: String,
    #[serde(default)]
    #[schema(example = "correct horse battery staple")]
    pub password: Option<String>,
}

/// Log in; an unknown username is registered with this password (unless
/// `auth.auto_register = false`).
#[utoipa::path(
    post, path = "/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in (or registered)", body = LoginResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "`invalid_credentials`", body = ErrorBody),
        (status = 422, description = "`invalid_username`, `invalid_password`, `password_required`", body = ErrorBody),
        (status = 429, description = "`rate_limited`, see `Retry-After`", body = ErrorBody),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    AppJson(req): AppJson<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let session = state
        .accounts
        .login(addr.ip(), &req.username, req.password)
        .await?;
    Ok(Json(session.into()))
}

/// Create an account and log in.
#[utoipa::path(
    post, path = "/register", tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Account created", body = LoginResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "`username_taken`", body = ErrorBody),
        (status = 422, description = "`invalid_username`, `invalid_password`, `password_required`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    AppJson(req): AppJson<RegisterRequest>,
) -> Result<(StatusCode, Json<LoginResponse>), ApiError> {
    let session = state
        .accounts
        .register(addr.ip(), &req.username, req.password)
        .await?;
    Ok((StatusCode::CREATED, Json(session.into())))
}
