//! Extractors that turn bad input into [`ApiError`]s with the house JSON shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::app::AppState;

/// A JSON request body. Malformed JSON or a wrong shape is 400
/// `invalid_request`; a body over `server.max_body_bytes` is 413. The
/// `Content-Type` is not insisted on, so seed clients that omit it work.
pub struct AppJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::InvalidRequest(format!("could not read the request body: {rej}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(AppJson)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))
    }
}

/// Parses a positive 64-bit id (`1` ..= `9223372036854775807`).
pub fn parse_id(name: &str, raw: &str) -> Result<i64, ApiError> {
    match raw.parse::<i64>() {
        Ok(id) if id > 0 && raw.bytes().all(|b| b.is_ascii_digit()) => Ok(id),
        _ => Err(ApiError::InvalidRequest(format!(
            "{name} must be a positive integer no greater than 9223372036854775807, got {raw:?}"
        ))),
    }
}

/// The `{chat_id}` path segment, validated.
pub struct ChatIdPath(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for ChatIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("invalid path: {e}")))?;
        parse_id("chat_id", &raw).map(ChatIdPath)
    }
}

/// The caller, authenticated by `Authorization: Bearer <token>`. A missing
/// header is 401 `missing_token`; anything wrong with the token is 401
/// `invalid_token`. Never silently anonymous.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: i64,
    pub username: String,
}

impl AuthUser {
    /// Verifies a raw token.
    pub fn from_token(state: &AppState, token: &str) -> Result<AuthUser, ApiError> {
        let (id, username) = state.jwt.verify(token).map_err(|_| {
            crate::telemetry::metrics::auth_failure("invalid_token");
            ApiError::InvalidToken
        })?;
        Ok(AuthUser { id, username })
    }

    /// The bearer token of the `Authorization` header, if there is a header.
    pub fn bearer(headers: &HeaderMap) -> Option<Result<&str, ApiError>> {
        let value = headers.get(AUTHORIZATION)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::InvalidToken);
        Some(token)
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = AuthUser::bearer(&parts.headers).ok_or_else(|| {
            crate::telemetry::metrics::auth_failure("missing_token");
            ApiError::MissingToken
        })??;
        AuthUser::from_token(state, token)
    }
}
