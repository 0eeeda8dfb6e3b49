//! The HTTP error type. Every error renders as
//! `{"error": "<message>", "code": "<snake_case_code>"}` with its status;
//! internal errors are logged with their cause and answered with an opaque 500.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::DomainError;
use crate::store::StoreError;

/// Error body of every non-2xx response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Human-readable message.
    #[schema(example = "chat not found")]
    pub error: String,
    /// Stable machine-readable code.
    #[schema(example = "chat_not_found")]
    pub code: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    MissingToken,
    #[error("invalid or expired token")]
    InvalidToken,
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("user not found")]
    UserNotFound,
    #[error("chat not found")]
    ChatNotFound,
    #[error("{0}")]
    Forbidden(String),
    #[error("no route for this path")]
    RouteNotFound,
    #[error("method not allowed for this path")]
    MethodNotAllowed,
    #[error("username is already taken")]
    UsernameTaken,
    #[error("request body is too large")]
    PayloadTooLarge,
    /// 422 with a specific code (`invalid_username`, `invalid_password`, ...).
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("too many attempts; retry later")]
    RateLimited { retry_after: Duration },
    #[error("too many open WebSocket connections for this account")]
    TooManyConnections,
    #[error("service is not ready")]
    NotReady,
    #[error("the request took too long")]
    RequestTimeout,
    #[error("internal server error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::MissingToken | ApiError::InvalidToken | ApiError::InvalidCredentials => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::UserNotFound | ApiError::ChatNotFound | ApiError::RouteNotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UsernameTaken => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } | ApiError::TooManyConnections => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::MissingToken => "missing_token",
            ApiError::InvalidToken => "invalid_token",
            ApiError::InvalidCredentials => "invalid_credentials",
            ApiError::UserNotFound => "user_not_found",
            ApiError::ChatNotFound => "chat_not_found",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::RouteNotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::UsernameTaken => "username_taken",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unprocessable { code, .. } => code,
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::TooManyConnections => "too_many_connections",
            ApiError::NotReady => "not_ready",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::Internal(_) => "internal_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            tracing::error!(error = ?cause, "request failed");
        }
        let status = self.status();
        let body = ErrorBody {
            error: self.to_string(),
            code: self.code(),
        };
        let mut res = (status, Json(body)).into_response();
        if let ApiError::RateLimited { retry_after } = self {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        res
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Invalid { code, message } => ApiError::Unprocessable { code, message },
            DomainError::InvalidCredentials => ApiError::InvalidCredentials,
            DomainError::InvalidToken => ApiError::InvalidToken,
            DomainError::BadRequest(message) => ApiError::InvalidRequest(message),
            e @ DomainError::Forbidden => ApiError::Forbidden(e.to_string()),
            DomainError::UsernameTaken => ApiError::UsernameTaken,
            DomainError::UserNotFound => ApiError::UserNotFound,
            DomainError::ChatNotFound => ApiError::ChatNotFound,
            DomainError::RateLimited { retry_after } => ApiError::RateLimited { retry_after },
            DomainError::Unavailable => ApiError::NotReady,
            DomainError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        DomainError::from(e).into()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

pub async fn route_not_found() -> ApiError {
    ApiError::RouteNotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
