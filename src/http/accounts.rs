//! `POST /login` and `POST /register` (the rules: `domain::accounts`).

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{AppJson, AuthUser};
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

#[derive(Debug, Deserialize, ToSchema)]
pub struct PasswordChange {
    #[schema(example = "correct horse battery staple")]
    pub old_password: String,
    #[schema(example = "another horse battery staple")]
    pub new_password: String,
}

/// A new token for the caller's valid one; the old one stays valid until
/// it expires.
#[utoipa::path(
    post, path = "/token/refresh", tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A new token", body = LoginResponse),
        (status = 401, description = "`missing_token`, `invalid_token`", body = ErrorBody),
    )
)]
pub async fn refresh(State(state): State<AppState>, user: AuthUser) -> Json<LoginResponse> {
    Json(state.accounts.refresh(&user).into())
}

/// Change the password; every token issued before is revoked and the
/// caller's WebSockets on this node close with 4001.
#[utoipa::path(
    post, path = "/account/password", tag = "auth",
    security(("bearer" = [])),
    request_body = PasswordChange,
    responses(
        (status = 200, description = "Changed; a new token", body = LoginResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `invalid_credentials` (wrong old password)", body = ErrorBody),
        (status = 422, description = "`invalid_password` (the new one)", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
    )
)]
pub async fn change_password(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    user: AuthUser,
    AppJson(req): AppJson<PasswordChange>,
) -> Result<Json<LoginResponse>, ApiError> {
    let session = state
        .accounts
        .change_password(addr.ip(), &user, req.old_password, req.new_password)
        .await?;
    state.hub.end_sessions(user.id, None);
    Ok(Json(session.into()))
}

/// Revoke the caller's token; its WebSockets on this node close with 4001.
#[utoipa::path(
    post, path = "/logout", tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "`missing_token`, `invalid_token`", body = ErrorBody),
    )
)]
pub async fn logout(State(state): State<AppState>, user: AuthUser) -> Result<StatusCode, ApiError> {
    state.accounts.logout(&user).await?;
    state.hub.end_sessions(user.id, Some(&user.token.jti));
    Ok(StatusCode::NO_CONTENT)
}
