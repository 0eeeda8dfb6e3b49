//! Extractors that turn bad input into [`ApiError`]s with the house JSON shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::app::AppState;
use crate::auth::Identity;
use crate::ids::{ChatId, UserId};

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
    crate::ids::parse_positive(name, raw).map_err(ApiError::InvalidRequest)
}

/// The `{chat_id}` path segment, validated.
pub struct ChatIdPath(pub ChatId);

impl<S: Send + Sync> FromRequestParts<S> for ChatIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("invalid path: {e}")))?;
        parse_id("chat_id", &raw).map(|id| ChatIdPath(ChatId(id)))
    }
}

/// The `{chat_id}` and `{user_id}` path segments, validated.
pub struct ChatMemberPath(pub ChatId, pub UserId);

impl<S: Send + Sync> FromRequestParts<S> for ChatMemberPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path((chat, user)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("invalid path: {e}")))?;
        Ok(ChatMemberPath(
            ChatId(parse_id("chat_id", &chat)?),
            UserId(parse_id("user_id", &user)?),
        ))
    }
}

/// The caller, authenticated by `Authorization: Bearer <token>`. A missing
/// header is 401 `missing_token`; anything wrong with the token is 401
/// `invalid_token`. Never silently anonymous.
#[derive(Debug, Clone)]
pub struct AuthUser(pub Identity);

impl std::ops::Deref for AuthUser {
    type Target = Identity;
    fn deref(&self) -> &Identity {
        &self.0
    }
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

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or_else(|| {
            crate::telemetry::metrics::auth_failure("missing_token");
            ApiError::MissingToken
        })??;
        Ok(AuthUser(state.accounts.authenticate(token).await?))
    }
}
