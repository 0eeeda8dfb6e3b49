//! `POST /login` and `POST /register`.
//!
//! Login attempts draw on two token buckets, per client address and per
//! username (case-insensitive); a successful attempt gives its tokens back,
//! so only wrong guesses use up the budget and passwords cannot be guessed at
//! speed. Over budget: 429 `rate_limited` with `Retry-After`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::AppJson;
use crate::app::AppState;
use crate::config::AuthMode;
use crate::store::User;
use crate::telemetry::metrics::auth_failure;

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

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    /// HS256 JWT for `Authorization: Bearer`.
    pub token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
    pub user: User,
    /// True when this call created the account.
    pub created: bool,
}

/// 1–32 characters from `A–Z a–z 0–9 _ . -`.
pub fn validate_username(name: &str) -> Result<(), ApiError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_username",
            "username must be 1-32 characters from A-Z a-z 0-9 _ . -",
        ))
    }
}

/// 8–128 characters.
pub fn validate_password(password: &str) -> Result<(), ApiError> {
    if (8..=128).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_password",
            "password must be 8-128 characters",
        ))
    }
}

fn password_required() -> ApiError {
    ApiError::unprocessable("password_required", "password is required")
}

impl AppState {
    fn login_body(&self, user: User, created: bool) -> LoginResponse {
        LoginResponse {
            token: self.jwt.issue(user.id, &user.username),
            token_type: "Bearer",
            expires_in: self.jwt.ttl_secs(),
            user,
            created,
        }
    }

    /// Runs `attempt` under the login budgets of `addr` and `username`;
    /// a success gives the tokens back.
    async fn limited<T>(
        &self,
        addr: SocketAddr,
        username: &str,
        attempt: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let ip = addr.ip();
        let name = username.to_ascii_lowercase();
        let limited = |retry_after| {
            auth_failure("rate_limited");
            ApiError::RateLimited { retry_after }
        };
        self.login_ip.try_take(&ip).map_err(limited)?;
        if let Err(retry_after) = self.login_user.try_take(&name) {
            self.login_ip.give_back(&ip);
            return Err(limited(retry_after));
        }
        let result = attempt.await;
        // Only a wrong guess (credentials, or probing for taken names) spends
        // the budget; successes and validation errors give it back.
        let guess = matches!(
            result,
            Err(ApiError::InvalidCredentials | ApiError::UsernameTaken)
        );
        if guess {
            auth_failure(match result {
                Err(ApiError::UsernameTaken) => "username_taken",
                _ => "invalid_credentials",
            });
        } else {
            self.login_ip.give_back(&ip);
            self.login_user.give_back(&name);
        }
        result
    }

    /// Creates the account, or reports that the name is taken.
    async fn create_account(
        &self,
        username: &str,
        password: Option<String>,
    ) -> Result<Option<User>, ApiError> {
        let hash = match password {
            Some(p) => Some(self.hasher.hash(p).await?),
            None => None,
        };
        Ok(self.store.create_user(username, hash).await?)
    }

    async fn check_password(
        &self,
        stored: Option<String>,
        password: String,
    ) -> Result<(), ApiError> {
        let ok = match stored {
            Some(hash) => self.hasher.verify(password, hash).await?,
            None => self.hasher.verify_dummy(password).await?,
        };
        if ok {
            Ok(())
        } else {
            Err(ApiError::InvalidCredentials)
        }
    }

    async fn login_password(
        &self,
        username: &str,
        password: String,
    ) -> Result<LoginResponse, ApiError> {
        if let Some(rec) = self.store.user_by_name(username).await? {
            self.check_password(rec.password_hash, password).await?;
            return Ok(self.login_body(rec.user, false));
        }
        if !self.settings.auth.auto_register {
            self.hasher.verify_dummy(password).await?;
            return Err(ApiError::InvalidCredentials);
        }
        validate_password(&password)?;
        match self
            .create_account(username, Some(password.clone()))
            .await?
        {
            Some(user) => Ok(self.login_body(user, true)),
            // Created concurrently by another request: log in against it.
            None => {
                let rec = self
                    .store
                    .user_by_name(username)
                    .await?
                    .ok_or(ApiError::InvalidCredentials)?;
                self.check_password(rec.password_hash, password).await?;
                Ok(self.login_body(rec.user, false))
            }
        }
    }

    async fn login_open(
        &self,
        username: &str,
        password: Option<String>,
    ) -> Result<LoginResponse, ApiError> {
        if let Some(rec) = self.store.user_by_name(username).await? {
            return Ok(self.login_body(rec.user, false));
        }
        if !self.settings.auth.auto_register {
            return Err(ApiError::InvalidCredentials);
        }
        if let Some(p) = &password {
            validate_password(p)?;
        }
        match self.create_account(username, password).await? {
            Some(user) => Ok(self.login_body(user, true)),
            None => {
                let rec = self
                    .store
                    .user_by_name(username)
                    .await?
                    .ok_or(ApiError::InvalidCredentials)?;
                Ok(self.login_body(rec.user, false))
            }
        }
    }
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
    validate_username(&req.username)?;
    let mode = state.settings.auth.mode;
    if mode == AuthMode::Password && req.password.is_none() {
        return Err(password_required());
    }
    let body = state
        .limited(addr, &req.username, async {
            match mode {
                AuthMode::Password => {
                    let password = req.password.clone().unwrap_or_default();
                    state.login_password(&req.username, password).await
                }
                AuthMode::Open => state.login_open(&req.username, req.password.clone()).await,
            }
        })
        .await?;
    Ok(Json(body))
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
    validate_username(&req.username)?;
    let password = req.password.ok_or_else(password_required)?;
    validate_password(&password)?;
    let body = state
        .limited(addr, &req.username, async {
            if state.store.user_by_name(&req.username).await?.is_some() {
                return Err(ApiError::UsernameTaken);
            }
            match state.create_account(&req.username, Some(password)).await? {
                Some(user) => Ok(state.login_body(user, true)),
                None => Err(ApiError::UsernameTaken),
            }
        })
        .await?;
    Ok((StatusCode::CREATED, Json(body)))
}
